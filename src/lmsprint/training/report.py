"""What a run tells while it trains: a progress bar and log lines (rank 0 only), and its metrics records."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmsprint.config import LogConfig
from lmsprint.progress import progress_bar
from lmsprint.training.metrics import MetricsLog


def main_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the hidden-matrix group (the first group's when there is none)."""
    for group in optimizer.param_groups:
        if group.get("role") == "matrix":
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])


class Report:
    """The run's progress bar, log lines and ``metrics.jsonl`` (every method is a no-op on ranks other than 0).

    Args:
        run_dir: the run directory (metrics.jsonl, loss.png).
        log: the ``[log]`` section: bar, TensorBoard, plot.
        is_main: this process reports (rank 0).
    """

    def __init__(self, run_dir: Path, log: LogConfig, *, is_main: bool) -> None:
        self.run_dir, self.log, self.is_main = run_dir, log, is_main
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", tensorboard=log.tensorboard) if is_main else None
        self.bar: tqdm | None = None

    def line(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def event(self, kind: str, **values: Any) -> None:
        """A metrics record."""
        if self.metrics:
            self.metrics.write(kind, **values)

    def replay_from(self, step: int) -> None:
        """Steps from ``step`` on are logged again (a resume or rollback)."""
        if self.metrics:
            self.metrics.replay_from(step)

    @contextlib.contextmanager
    def progress(self, total: int, initial: int) -> Iterator[tqdm]:
        """The progress bar of the training loop (erased if the loop fails: the error stays one line)."""
        with progress_bar(enabled=self.log.progress and self.is_main, total=total, initial=initial, desc="train",
                          dynamic_ncols=True) as self.bar:
            yield self.bar

    def train(self, record: dict[str, Any]) -> None:
        self.event("train", **record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)

    def val(self, *, step: int, loss: float, tokens: int, time: float, last_loss: float | None) -> None:
        self.event("val", step=step, loss=loss, tokens=tokens, time=time)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{last_loss or float('nan'):.3f}", val=f"{loss:.3f}", refresh=False)

    def stopped(self, step: int, total: int, *, by_signal: bool) -> None:
        """The loop ended before the last step, or by a signal."""
        if by_signal:  # (the CLI says where it stopped and how to continue)
            self.event("event", event="interrupted", step=step)
        elif step < total:
            self.line(f"stopped at step {step} of {total}; --resume continues it")
            self.event("event", event="stopped", step=step)

    def summary(self, **values: Any) -> None:
        """The last record; then the metrics file is closed and the loss plot drawn."""
        if self.metrics:
            self.metrics.write("summary", **values)
            self.metrics.close()
            if self.log.plot:
                from lmsprint.plots import plot_run

                plot_run(self.run_dir)
