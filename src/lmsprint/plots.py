"""Figures: a run's loss curves. matplotlib is imported inside the functions (Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path

from lmsprint.training.metrics import read_metrics


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _last_attempt(records: list[dict]) -> list[dict]:
    """Records in step order, those of steps a resume or rollback logged again replaced by the later ones."""
    out: list[dict] = []
    for r in records:
        while out and out[-1]["step"] >= r["step"]:
            out.pop()
        out.append(r)
    return out


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw train/val loss and the learning rate against steps to ``RUN/loss.png``."""
    records = read_metrics(run_dir / "metrics.jsonl")
    train = _last_attempt([r for r in records if r["kind"] == "train"])
    val = _last_attempt([r for r in records if r["kind"] == "val"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1, alpha=0.8)
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val loss", ms=3)
    for r in records:
        if r["kind"] == "event" and r.get("event") == "rollback":
            ax.axvline(r["step"], color="red", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    if train and any("lr" in r for r in train):
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in train], [r["lr"] for r in train], color="gray", ls="--", lw=1, label="lr")
        ax2.set_ylabel("learning rate")
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    else:
        ax.legend(loc="upper right")
    fig.tight_layout()
    out = out or run_dir / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
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
