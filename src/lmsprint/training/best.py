"""The best checkpoint: ``RUN/checkpoints/best/``, the weights of the evaluation with the lowest validation loss.

It sits beside the run's newest checkpoints (``step_*``), in the same checksummed format, and holds the weights
only (its ``state.pt`` has the step and the loss): a resume always continues from the newest ``step_*``, while
``lmsprint sample`` and ``lmsprint export`` use ``best/`` when a run has one (:func:`find_weights`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lmsprint import distributed as D
from lmsprint.errors import CheckpointError
from lmsprint.model import GPT, GPTConfig
from lmsprint.training import checkpoint as ckpt
from lmsprint.training.metrics import read_metrics

NAME = "best"


def _verifies(path: Path) -> bool:
    try:
        ckpt.verify(path)
        return True
    except CheckpointError:
        return False


def read(path: Path) -> tuple[int, float] | None:
    """(step, validation loss) of a best checkpoint directory that verifies, else None (for a resumed run:
    the loss is in its ``state.pt``, loaded as tensors and plain values only)."""
    try:
        meta = ckpt.verify(path)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        return int(meta["step"]), float(state["val_loss"])
    except (CheckpointError, OSError, KeyError, TypeError, ValueError, RuntimeError):
        return None


class BestCheckpoint:
    """Keeps ``best/`` up to date as a run evaluates (every rank calls :meth:`update`; rank 0 writes).

    Args:
        ckpt_root: the run's checkpoints directory.
        model: the unwrapped model (DTensor parameters under FSDP2: then every rank takes part in gathering them).
        model_config: its shape, written to meta.json.
        sharded: the parameters are FSDP2 shards.
        is_main: this process writes.
        files: more files each checkpoint holds by name (the run's ``tokenizer.json``, the copy that counts).
    """

    def __init__(self, ckpt_root: Path, *, model: GPT, model_config: GPTConfig, sharded: bool, is_main: bool,
                 files: dict[str, bytes] | None = None) -> None:
        self.root, self.path, self.files = ckpt_root, ckpt_root / NAME, files
        self.model, self.model_config, self.sharded, self.is_main = model, model_config, sharded, is_main
        found = read(self.path)  # a resumed run keeps the best it had
        self.step, self.loss = found if found is not None else (None, math.inf)

    def update(self, step: int, val_loss: float) -> bool:
        """Save the weights as ``best/`` if ``val_loss`` is the lowest so far; True when it was."""
        if not (math.isfinite(val_loss) and val_loss < self.loss):
            return False
        full_sd = None
        if self.sharded:
            from lmsprint.training.checkpointer import full_model_state

            full_sd = full_model_state(self.model)  # collective: every rank
        if self.is_main:
            self._write(step, ckpt.model_state(self.model, full_sd), {"step": step, "val_loss": val_loss})
        D.barrier()
        self.step, self.loss = step, val_loss
        return True

    def _write(self, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Write the checkpoint under a temporary root, then swap it in for the old ``best/`` (a crash between the
        two renames leaves no ``best/``, and the temporary directories are cleared at the next start)."""
        scratch = self.root / f".tmp-{NAME}-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            written = ckpt.save_checkpoint(scratch, step, model_sd=weights, state=state,
                                           model_config=self.model_config, keep=1, files=self.files,
                                           shown_as=self.path)
            old = self.root / f".tmp-old-{NAME}-{os.getpid()}"
            if self.path.exists():
                os.replace(self.path, old)
            os.replace(written, self.path)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def find_weights(path: Path) -> Path:
    """The checkpoint to sample or export: a checkpoint directory as given; for a run directory (or its checkpoints
    directory) ``best/`` when it verifies, else the newest valid checkpoint."""
    path = Path(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not (path / "meta.json").exists() and _verifies(root / NAME):
        return root / NAME
    return ckpt.find_weights(path)


def describe(found: Path) -> str:
    """Which checkpoint a command used, in words (from its meta.json and the run's metrics.jsonl: nothing is
    unpickled)."""
    try:
        step = json.loads((found / "meta.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"checkpoint {found}"
    if found.name != NAME:
        return f"checkpoint {found} (step {step})"
    losses = [r["loss"] for r in read_metrics(found.parent.parent / "metrics.jsonl")
              if r.get("kind") == "val" and r.get("step") == step]
    loss = f"validation loss {losses[-1]:.4f} at " if losses else ""
    return f"the best checkpoint {found} ({loss}step {step})"
