"""The trainer's own resumable state: its counters and the global random generators."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from lmsprint.training.metrics import Stopwatch


@dataclass
class TrainState:
    """Where the run is: its step, tokens, training time, the guard's lr scale and the evaluations so far."""

    clock: Stopwatch
    step: int = 0
    tokens_seen: int = 0
    lr_scale: float = 1.0
    """The product of the rollbacks' lr factors: every group's peak lr is scaled by it."""
    good_step: int = 0
    """The newest step whose weights passed the guard: a rollback goes to a checkpoint no newer than it."""
    val_history: list[tuple[int, float]] = field(default_factory=list)

    @property
    def train_time(self) -> float:
        return self.clock.total

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "train_time": self.train_time,
                "lr_scale": self.lr_scale, "val_history": self.val_history, "good_step": self.good_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollback_to(state)
        self.clock.total = float(state["train_time"])
        self.lr_scale = float(state["lr_scale"])
        # a checkpoint's own weights are judged by the step after it: not yet good (as in the uninterrupted run)
        self.good_step = int(state.get("good_step", self.step - 1))

    def rollback_to(self, state: dict[str, Any]) -> None:
        """Back to a saved position; the run's own history (training time, lr scale) stays."""
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.val_history = [tuple(v) for v in state["val_history"]]  # type: ignore[misc]


class RNGState:
    """The global generators (torch's, Python's and, on a GPU, CUDA's): saved so a resume continues them."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if self.cuda else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if self.cuda and state["cuda"]:
            torch.cuda.set_rng_state_all(state["cuda"])
