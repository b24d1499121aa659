"""Sequence-length curriculum: short sequences first, growing to the full length.

Tensor shapes never change: a row of ``seq_len`` tokens is cut into ``seq_len / L`` sequences of length ``L``
(attention stays inside each, positions restart at each), so the number of sequences per step grows as ``L``
shrinks and the tokens per optimizer step stay constant, and ``torch.compile`` never recompiles.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeqLenSchedule:
    kind: str  # "none" | "linear" | "stages" | "tokens"
    seq_len: int
    start: int
    total_steps: int
    warmup: float = 0.25  # linear/stages: fraction of total_steps
    milestones: tuple[int, ...] = ()  # tokens: token counts at which the length doubles
    multiple: int = 64  # linear: lengths are multiples of this
    tokens_per_step: int = 0
    short_mix: float = 0.0  # after the curriculum: fraction of rows cut into `start`-long sequences

    def length_at(self, step: int) -> int:
        """Sequence length used at optimizer step ``step``."""
        if self.kind == "none":
            return self.seq_len
        if self.kind == "tokens":
            seen = step * self.tokens_per_step
            doublings = sum(seen >= m for m in self.milestones)
            return min(self.start * 2**doublings, self.seq_len)
        span = max(1, round(self.warmup * self.total_steps))
        frac = min(step / span, 1.0)
        if self.kind == "linear":
            length = self.start + (self.seq_len - self.start) * frac
            return max(self.start, min(self.seq_len, int(length // self.multiple * self.multiple)))
        # stages: equal-length stages of start, 2 start, 4 start, ... (capped at seq_len) reaching seq_len at the
        # end of warm-up; n = ceil(log2(seq_len / start)) doublings, so a ratio of 3 or 5 still ends at seq_len
        n = (-(-self.seq_len // self.start) - 1).bit_length()
        if n == 0:
            return self.seq_len
        return min(self.start * 2 ** min(int(frac * n), n), self.seq_len)
