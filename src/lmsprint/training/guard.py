"""Non-finite and loss-spike guard: decides, from each step's loss and gradient norm, whether to apply the
update, skip it, or roll the run back to its last good checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lmsprint.config import GuardConfig

Decision = Literal["ok", "skip", "rollback"]
OVERFLOWS_IN_ROW = 20
"""fp16: after this many scaler overflows in a row (the scale halved each time), a non-finite gradient is not an
overflow the scaler can fix but a bad step (a NaN in the gradients, not a too-large loss scale)."""


@dataclass
class Guard:
    cfg: GuardConfig
    bad_in_row: int = 0
    bad_total: int = 0
    spikes: int = 0
    rollbacks: int = 0
    ema: float | None = None
    seen: int = 0
    overflows_in_row: int = 0
    reason: str = ""
    """Why the last :meth:`check` did not return "ok" (for the log line and event); "" after an ok step."""

    def check(self, loss: float, grad_norm: float, *, overflow_expected: bool = False) -> Decision:
        """Judge one step.

        Args:
            loss: the step's mean training loss (all ranks).
            grad_norm: its global gradient norm before clipping.
            overflow_expected: fp16 loss scaling is on, so an inf gradient norm with a finite loss is the
                scaler's business (it skips the step and lowers the scale), not a bad step.
        """
        finite_loss, finite_norm = math.isfinite(loss), math.isfinite(grad_norm)
        self.overflows_in_row = self.overflows_in_row + 1 if overflow_expected and not finite_norm else 0
        overflow = overflow_expected and self.overflows_in_row <= OVERFLOWS_IN_ROW
        if not finite_loss or (not finite_norm and not overflow):
            self.bad_in_row += 1
            self.bad_total += 1
            self.reason = f"non-finite loss/grad norm ({loss:.4g}/{grad_norm:.4g}), {self.bad_in_row} in a row"
            if self.overflows_in_row > OVERFLOWS_IN_ROW:
                self.reason += f" after {OVERFLOWS_IN_ROW} loss-scale overflows in a row"
            return "rollback" if self.bad_in_row >= self.cfg.max_bad_steps else "skip"
        self.bad_in_row = 0
        if (self.cfg.spike_factor > 0 and self.ema is not None and self.seen >= self.cfg.spike_warmup
                and loss > self.cfg.spike_factor * self.ema):
            self.spikes += 1
            self.reason = f"loss spike {loss:.4g} > {self.cfg.spike_factor:g} x its moving average {self.ema:.4g}"
            return "rollback"
        self.reason = ""
        self.ema = loss if self.ema is None else self.cfg.ema * self.ema + (1 - self.cfg.ema) * loss
        self.seen += 1
        return "ok"

    def after_rollback(self) -> None:
        self.rollbacks += 1
        self.bad_in_row = self.overflows_in_row = 0

    def load_average(self, state: dict) -> None:
        """After a rollback: the loss moving average of a saved ``state``; the counters of the run so far stay."""
        self.ema, self.seen = state["ema"], state["seen"]

    def state_dict(self) -> dict[str, float | int | None]:
        return {"bad_in_row": self.bad_in_row, "bad_total": self.bad_total, "spikes": self.spikes,
                "rollbacks": self.rollbacks, "ema": self.ema, "seen": self.seen,
                "overflows_in_row": self.overflows_in_row}

    def load_state_dict(self, state: dict) -> None:
        for key in ("bad_in_row", "bad_total", "spikes", "rollbacks", "ema", "seen"):
            setattr(self, key, state[key])
        self.overflows_in_row = state.get("overflows_in_row", 0)  # absent from checkpoints of earlier versions
