"""The reference every lmsprint speed claim is measured against: nanoGPT's own ``train.py`` on enwiki2015.

Measured with karpathy/nanoGPT (commit 3adf61e, unchanged) on one H200, torch 2.11, with the shared 32K BPE
tokenizer and validation shard (``../shared/data/enwiki2015/REFERENCE.md``). Its training time excludes
evaluation, like lmsprint's ``train_time``. Each validation point is nanoGPT's estimate from 20 random batches of
16 x 1024 tokens, so points are noisy by a few hundredths.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    """A measured training curve: validation loss and training time at steps."""

    name: str
    final_loss: float  # the speed target: the loss at the end of the run
    curve: dict[int, tuple[float, float]]  # step -> (training seconds, validation loss)

    @property
    def train_time(self) -> float:
        return self.curve[max(self.curve)][0]

    def time_to(self, target: float) -> float | None:
        """Training seconds at which the curve first reaches ``target`` (linear between evaluations), or None.

        The run reaches its own ``final_loss`` at its end by definition (the last point is that loss up to rounding:
        nanoGPT's 4.5882 is the target 4.588)."""
        points = sorted(self.curve.values())
        points[-1] = (points[-1][0], min(points[-1][1], self.final_loss))
        for (t0, l0), (t1, l1) in zip([(0.0, float("inf")), *points], points):
            if l1 <= target:
                return t1 if l0 == float("inf") else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
        return None


NANOGPT = Reference(
    name="nanoGPT train.py on enwiki2015, one H200",
    final_loss=4.588,
    curve={100: (12.0, 6.5129), 200: (24.1, 6.0232), 300: (36.2, 5.7175), 400: (48.3, 5.3747), 500: (60.3, 5.1336),
           600: (72.4, 4.9757), 700: (84.4, 4.8034), 800: (96.5, 4.6997), 900: (108.6, 4.6534),
           1000: (120.6, 4.5882)},
)


@dataclass
class CurveCheck:
    """How closely runs (several seeds) follow a reference curve."""

    rows: list[tuple[int, float, list[float]]]  # step, reference loss, each seed's loss
    mean_diff: float  # mean over the compared steps of (seed-mean loss - reference)
    max_diff: float  # largest |seed loss - reference| at a compared step
    final_diff: float  # seed-mean final loss - reference final loss
    passed: bool

    def table(self) -> str:
        seeds = len(self.rows[0][2]) if self.rows else 0
        lines = ["| step | nanoGPT | " + " | ".join(f"seed {i}" for i in range(seeds)) + " | mean - nanoGPT |",
                 "|---:|---:|" + "---:|" * (seeds + 1)]
        for step, ref, losses in self.rows:
            lines.append(f"| {step} | {ref:.4f} | " + " | ".join(f"{v:.4f}" for v in losses)
                         + f" | {statistics.fmean(losses) - ref:+.4f} |")
        verdict = "follows" if self.passed else "does NOT follow"
        lines += ["", f"Mean difference from the first compared step on: {self.mean_diff:+.4f} (bound ±0.05); "
                      f"largest single difference: {self.max_diff:.4f} (bound 0.08); final loss difference "
                      f"(mean of seeds): {self.final_diff:+.4f} (bound ±0.05): the run {verdict} the reference."]
        return "\n".join(lines)


def check_curve(runs: list[dict[int, float]], ref: Reference = NANOGPT, *, from_step: int = 300,
                mean_tol: float = 0.05, max_tol: float = 0.08, final_tol: float = 0.05) -> CurveCheck:
    """Compare seeds' validation curves (step -> loss, each with the reference's steps) with ``ref``.

    From ``from_step`` on: the mean difference of the seed-mean curve within ``mean_tol``, no single seed's point
    off by more than ``max_tol``, and the seed-mean final loss within ``final_tol`` of the reference's.
    """
    steps = [s for s in sorted(ref.curve) if s >= from_step]
    missing = [s for s in steps if any(s not in run for run in runs)]
    if not runs or missing:
        raise ValueError(f"runs lack validation losses at steps {missing or steps} of the reference curve")
    shown = [s for s in sorted(ref.curve) if all(s in run for run in runs)]  # earlier steps too, when evaluated
    rows = [(s, ref.curve[s][1], [run[s] for run in runs]) for s in shown]
    compared = [(r, losses) for s, r, losses in rows if s >= from_step]
    diffs = [statistics.fmean(losses) - r for r, losses in compared]
    mean_diff = statistics.fmean(diffs)
    max_diff = max(abs(v - r) for r, losses in compared for v in losses)
    final_diff = diffs[-1] if steps[-1] == max(ref.curve) else float("nan")
    passed = abs(mean_diff) <= mean_tol and max_diff <= max_tol and abs(final_diff) <= final_tol
    return CurveCheck(rows, mean_diff, max_diff, final_diff, passed)
