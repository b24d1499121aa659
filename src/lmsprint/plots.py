"""Every figure lmsprint draws: a run's loss curves, runs compared, a benchmark, random restarts and a learning-rate
schedule. One style: matplotlib's object API on the Agg canvas (headless, no pyplot global state), imported inside
the functions so that importing lmsprint does not import matplotlib."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmsprint.errors import LmsprintError
from lmsprint.training.metrics import latest_per_step, read_metrics

if TYPE_CHECKING:  # annotations only
    from matplotlib.figure import Figure

    from lmsprint.bench import BenchRun
    from lmsprint.compare import Run
    from lmsprint.schedules import Schedule

DPI = 110
FIGURE_SUFFIXES = (".png", ".svg", ".pdf", ".jpg")


def check_figure_path(path: str | Path) -> Path:
    """``path``, if its suffix names a figure format; checked before any work, so that a typo costs nothing.

    Raises:
        LmsprintError: the suffix is not one of :data:`FIGURE_SUFFIXES`.
    """
    if Path(path).suffix.lower() not in FIGURE_SUFFIXES:
        raise LmsprintError(f"--png {path}: give a file name ending in {', '.join(FIGURE_SUFFIXES)}")
    return Path(path)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a figure to ``path`` (its directory created).

    Raises:
        LmsprintError: ``path`` cannot be written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    except OSError as e:
        raise LmsprintError(f"cannot write {path} ({e.strerror or e}); pass another --png") from None
    return path


def _figure(**kwargs: Any) -> Figure:
    """A figure on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(dpi=DPI, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw train/val loss and the learning rate against steps to ``RUN/loss.png``."""
    records = read_metrics(run_dir / "metrics.jsonl")
    train = latest_per_step([r for r in records if r["kind"] == "train"])
    val = latest_per_step([r for r in records if r["kind"] == "val"])
    fig = _figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1, alpha=0.8)
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val loss", ms=3)
    for r in records:
        if r["kind"] == "event" and r.get("event") == "rollback" and "step" in r:
            ax.axvline(r["step"], color="red", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()[0]
    lr = [(r["step"], r["lr"]) for r in train if "lr" in r]
    if lr:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lr), color="gray", ls="--", lw=1, label="lr")
        ax2.set_ylabel("learning rate")
        lines += ax2.get_legend_handles_labels()[0]
    if lines:
        ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    fig.tight_layout()
    out = out or run_dir / "loss.png"
    fig.savefig(out)
    return out


def plot_restarts(curves: list[tuple[str, list[tuple[int, float]], bool, bool]], out: Path, *,
                  budgets: list[int] | None = None) -> Path:
    """Draw every run of a random-restarts sweep to ``out``: validation loss against steps.

    Args:
        curves: ``(label, [(step, val_loss), ...], continued, winner)`` per run; runs stopped at a probe are
            dashed, runs continued to the full budget solid, the winner thicker.
        out: the PNG to write.
        budgets: the rung budgets, drawn as dotted vertical lines.
    """
    fig = _figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for b in budgets or []:
        ax.axvline(b, color="gray", ls=":", lw=1)
    for label, curve, continued, winner in curves:
        if not curve:
            continue
        steps, losses = zip(*curve)
        ax.plot(steps, losses, "-" if continued else "--", marker="o", ms=2.5, lw=2.2 if winner else 1.2,
                alpha=1.0 if continued else 0.6, label=label + (" (winner)" if winner else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("random restarts: probes dashed, continued runs solid")
    ax.grid(alpha=0.3)
    if len(curves) <= 16:
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    return out


def plot_compare(runs: Sequence[Run], png: str | Path, *, target: float | None = None) -> Path:
    """Draw validation (markers) and training (faint) loss of every run against steps, tokens and time."""
    fig = _figure(figsize=(16, 4.8))
    axes = fig.subplots(1, 3, sharey=True)
    axes_x = (("step", "step"), ("tokens", "tokens"), ("time", "training time (s, evaluation excluded)"))
    for i, r in enumerate(runs):
        color = f"C{i}"
        for ax, (key, _) in zip(axes, axes_x):
            train = [(x[key], x["loss"]) for x in r.train if key in x]
            if train:
                ax.plot(*zip(*train), color=color, lw=0.8, alpha=0.35)
            val = r.val_points(key)
            if val:
                ax.plot(*zip(*val), "o-", color=color, ms=3, lw=1.5, label=r.name)
    for ax, (_, label) in zip(axes, axes_x):
        if target is not None:
            ax.axhline(target, color="gray", ls=":", lw=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    # the first training steps (loss ~ ln vocab) would squash the curves: scale to the validation losses
    losses = [float(v["loss"]) for r in runs for v in r.val if math.isfinite(v["loss"])]
    losses += [float(x["loss"]) for r in runs for x in r.train[len(r.train) // 10:] if math.isfinite(x["loss"])]
    if losses:
        lo, hi = min(losses), max(losses)
        pad = 0.05 * (hi - lo) or 0.05 * max(abs(hi), 1.0)  # one value: a margin that its float can show
        axes[0].set_ylim(lo - pad, hi + pad)
    if any(r.val for r in runs):
        axes[0].legend(loc="upper right", fontsize="small")
    suffix = "" if target is None else f"; dotted: target {target:.4f}"
    fig.suptitle(f"validation loss (markers) and training loss (faint){suffix}")
    fig.tight_layout()
    return save_figure(fig, png)


def plot_bench(runs: list[BenchRun], target: float, path: Path) -> None:
    """Validation loss of every benchmark run against training wall time and tokens, with the target."""
    fig = _figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    colors = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(r.name for r in runs))}
    for ax, key, label in ((axes[0], "time", "training wall time (s)"), (axes[1], "tokens", "training tokens")):
        for r in runs:
            xs = [v[key] for v in r.val]
            first = r is next(x for x in runs if x.name == r.name)
            ax.plot(xs, [v["loss"] for v in r.val], "o-", ms=2, lw=1, color=colors[r.name],
                    label=r.name if first else None, alpha=0.85)
        ax.axhline(target, color="k", ls=":", lw=1, label=f"target {target:.3f}")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        lo = min(v["loss"] for r in runs for v in r.val)
        ax.set_ylim(lo - 0.1, min(max(v["loss"] for r in runs for v in r.val), target + 2.5))
    axes[0].legend(fontsize=8)
    fig.suptitle("lmsprint bench: validation loss against wall time and tokens")
    fig.tight_layout()
    fig.savefig(path)


def plot_schedule(scheds: dict[str, Schedule], main: Schedule, *, peak_lr: float, steps: list[int],
                  path: Path) -> None:
    """The learning rate of one schedule (its tabulated steps marked) or of several compared, over the run."""
    total = main.total
    n = min(total, 2000)  # plot points: every step for short runs, 2000 evenly spaced otherwise
    xs = sorted({round(i * total / n) for i in range(n + 1)} | {main.warmup, main.decay_start})
    names = {"cosine": "cosine", "sqrt": "square-root", "linear": "linear", "constant": "constant",
             "wsd": f"wsd ({main.decay_shape} cool-down)"}

    fig = _figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    for shape, fn in scheds.items():
        ax.plot(xs, [peak_lr * fn(x) for x in xs], label=names.get(shape, shape),
                lw=2.4 if shape == main.shape else 1.6)
    if len(scheds) == 1:
        ax.plot(steps, [peak_lr * main(s) for s in steps], "o", color="black", ms=4, label="tabulated steps")
    if main.warmup > 0:
        ax.axvline(main.warmup, color="grey", ls=":", lw=1, gid="warm-up")
        # above the peak, where no curve goes (every multiplier is at most 1), on the side of the line with room
        right = main.warmup < total / 2
        ax.annotate(" end of warm-up " if right else "end of warm-up ", (main.warmup, 1.08 * peak_lr), fontsize=8,
                    color="grey", ha="left" if right else "right", va="center")
    floor = min(fn.floor for fn in scheds.values()) * peak_lr  # constant's "floor" is its peak
    ax.axhline(floor, color="grey", ls="--", lw=0.8, label="floor")
    ax.set_xlim(0, total)
    ax.set_ylim(0, peak_lr * 1.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    what = "decay shapes compared" if len(scheds) > 1 else f"{names.get(main.shape, main.shape)} schedule"
    ax.set_title(f"Learning rate: {what}\n{total} steps, warm-up {main.warmup} steps from {main.start_factor:g} x "
                 f"peak {peak_lr:.3g}, floor {floor:.3g}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the axes: never hides a curve
    save_figure(fig, path)
