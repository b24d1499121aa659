"""Figures: a run's loss curves, and where figures may be written. matplotlib is imported inside the functions
(Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmsprint.errors import LmsprintError
from lmsprint.training.metrics import latest_per_step, read_metrics

FIGURE_SUFFIXES = (".png", ".svg", ".pdf", ".jpg")


def check_figure_path(path: str | Path) -> Path:
    """``path``, if its suffix names a figure format; checked before any work, so that a typo costs nothing.

    Raises:
        LmsprintError: the suffix is not one of :data:`FIGURE_SUFFIXES`.
    """
    if Path(path).suffix.lower() not in FIGURE_SUFFIXES:
        raise LmsprintError(f"--png {path}: give a file name ending in {', '.join(FIGURE_SUFFIXES)}")
    return Path(path)


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure to ``path`` (its directory created).

    Raises:
        LmsprintError: ``path`` cannot be written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise LmsprintError(f"cannot write {path} ({e.strerror or e}); pass another --png") from None
    return path


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw train/val loss and the learning rate against steps to ``RUN/loss.png``."""
    records = read_metrics(run_dir / "metrics.jsonl")
    train = latest_per_step([r for r in records if r["kind"] == "train"])
    val = latest_per_step([r for r in records if r["kind"] == "val"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
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
        fig.savefig(out, dpi=110)
        return out
    finally:
        plt.close(fig)


def plot_restarts(curves: list[tuple[str, list[tuple[int, float]], bool, bool]], out: Path, *,
                  budgets: list[int] | None = None) -> Path:
    """Draw every run of a random-restarts sweep to ``out``: validation loss against steps.

    Args:
        curves: ``(label, [(step, val_loss), ...], continued, winner)`` per run; runs stopped at a probe are
            dashed, runs continued to the full budget solid, the winner thicker.
        out: the PNG to write.
        budgets: the rung budgets, drawn as dotted vertical lines.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
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
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
