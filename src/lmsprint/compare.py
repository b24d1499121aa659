"""Compare runs: their loss curves on one figure, and a Markdown table of how fast each reached a target loss.

Everything comes from each run's ``metrics.jsonl``. Times are training time as the trainer records it
(evaluation, checkpointing and compile warm-up left out), so a run that evaluates more often is not
penalised. A run that was resumed or rolled back logs some steps twice; the later record of a step wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmsprint.errors import CheckpointError
from lmsprint.plots import check_figure_path, plot_compare
from lmsprint.training.metrics import latest_per_step, read_metrics


def crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """The first x at which y falls to ``target`` or below, or None if it never does.

    Between the last point above the target and the first at or below it, x is interpolated linearly
    (evaluations are points of a curve, not steps of a staircase); a first point already at or below the
    target gives its own x. Points are taken in order; non-finite y values are skipped.

    Args:
        points: (x, y) pairs in increasing x, e.g. (training seconds, validation loss) per evaluation.
        target: the y to reach.
    """
    prev: tuple[float, float] | None = None
    for x, y in points:
        if not math.isfinite(y):
            continue
        if y <= target:
            if prev is None:
                return x
            x0, y0 = prev
            return x0 + (y0 - target) / (y0 - y) * (x - x0)  # y0 > target >= y, so no division by zero
        prev = (x, y)
    return None


@dataclass
class Run:
    """One run's curves, read from its metrics.jsonl."""

    name: str
    path: Path
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]

    def val_points(self, x: str) -> list[tuple[float, float]]:
        """(x, val loss) of every evaluation, x one of step, tokens, time."""
        return [(float(r[x]), float(r["loss"])) for r in self.val if x in r]

    @property
    def final_val(self) -> float | None:
        return float(self.val[-1]["loss"]) if self.val else None

    @property
    def best_val(self) -> float | None:
        finite = [float(r["loss"]) for r in self.val if math.isfinite(r["loss"])]
        return min(finite) if finite else None

    def mean(self, key: str) -> float | None:
        """Mean of ``key`` over the train records that have it (tokens_per_s, mfu)."""
        values = [float(r[key]) for r in self.train if isinstance(r.get(key), (int, float))]
        return sum(values) / len(values) if values else None


Warn = Callable[[str], None]


def load_run(path: str | Path, *, warn: Warn | None = None) -> Run:
    """Read a run directory's metrics (``warn`` hears of lines skipped as damaged).

    Raises:
        CheckpointError: ``path`` is not a run directory (no metrics.jsonl).
    """
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        raise CheckpointError(f"{path} is not a run directory (no metrics.jsonl); pass runs/NAME directories")
    records = read_metrics(metrics, warn=warn)
    train = latest_per_step([r for r in records if r["kind"] == "train"])
    val = latest_per_step([r for r in records if r["kind"] == "val"])
    return Run(path.name or str(path), path, train, val)


def load_runs(paths: Sequence[str | Path], *, warn: Warn | None = None) -> list[Run]:
    """Read several runs; runs with the same directory name are labelled by their full path. A directory that holds
    runs rather than being one (``lmsprint bench``'s or ``restarts``' --out) stands for the runs inside it."""
    expanded: list[Path] = []
    for p in map(Path, paths):
        inner = sorted(d for d in p.iterdir() if (d / "metrics.jsonl").is_file()) if p.is_dir() else []
        expanded += inner if not (p / "metrics.jsonl").exists() and inner else [p]
    runs = [load_run(p, warn=warn) for p in expanded]
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = str(r.path)
    return runs


def default_target(runs: Sequence[Run]) -> float | None:
    """The worst of the runs' final validation losses: a loss that every run reaches."""
    finals = [r.final_val for r in runs if r.final_val is not None and math.isfinite(r.final_val)]
    return max(finals) if finals else None


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.3g}s"
    if s < 3600:
        return f"{int(s // 60)}m{s % 60:04.1f}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _fmt_loss(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def table(runs: Sequence[Run], target: float | None) -> str:
    """A Markdown table: final and best validation loss, time and tokens to ``target``, tokens/s and MFU."""
    t = "-" if target is None else f"{target:.4f}"
    lines = [f"| run | final val loss | best val loss | time to {t} | tokens to {t} | tokens/s | MFU |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        to_time = crossing(r.val_points("time"), target) if target is not None else None
        to_tokens = crossing(r.val_points("tokens"), target) if target is not None else None
        mfu = r.mean("mfu")
        lines.append(f"| {r.name} | {_fmt_loss(r.final_val)} | {_fmt_loss(r.best_val)} | {_fmt_seconds(to_time)} | "
                     f"{_fmt_count(to_tokens)} | {_fmt_count(r.mean('tokens_per_s'))} | "
                     f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} |")
    return "\n".join(lines)


def compare(run_dirs: Sequence[str | Path], *, target: float | None = None, png: str | Path | None = None,
            warn: Warn | None = None) -> str:
    """Read runs, optionally draw them to ``png``, and return the Markdown comparison table.

    Args:
        run_dirs: run directories (each with a metrics.jsonl).
        target: the loss for "time/tokens to"; default the worst of the runs' final validation losses.
        png: where to draw the three-panel figure (None: no figure).
        warn: hears of metrics lines skipped as damaged (one message per run that has some).
    """
    if png is not None:
        check_figure_path(png)
    runs = load_runs(run_dirs, warn=warn)
    if target is None:
        target = default_target(runs)
    if png is not None:
        plot_compare(runs, png, target=target)
    return table(runs, target)
