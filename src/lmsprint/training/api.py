"""The trainer's public types: what a run returns, the hooks it calls, and the error of a diverged run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmsprint.errors import LmsprintError


class TrainingDiverged(LmsprintError):
    """The guard rolled back more often than allowed."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float | None
    val_loss: float | None
    interrupted: bool = False
    skipped_steps: int = 0
    rollbacks: int = 0
    train_time: float = 0.0
    compile_time: float = 0.0
    val_history: list[tuple[int, float]] = field(default_factory=list)
    stop_signal: int | None = None
    """The signal (SIGINT, SIGTERM) that stopped the run early, if one did."""


class Callback:
    """Hooks for tests and experiments; the defaults do nothing."""

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Called with each micro-step's loss before backward; may return a different loss."""
        return loss

    def on_grads(self, step: int, model: torch.nn.Module) -> None:
        """Called after the backward passes of a step, before clipping and the update."""

    def on_eval(self, step: int, val_loss: float) -> bool:
        """Called after each evaluation; return True to end the run there (it is checkpointed)."""
        return False
