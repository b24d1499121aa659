"""Atomic, checksummed checkpoints.

A checkpoint is a directory ``RUN/checkpoints/step_NNNNNNNN/`` holding ``model.safetensors`` (the unwrapped
model's weights, tied weights once), ``state.pt`` (optimizer, schedule, loader, RNG, scaler and trainer state)
and ``meta.json`` (step, model shape and a SHA-256 of each file). It is written into a temporary directory,
every file fsynced, then renamed into place: a checkpoint directory that exists is complete, and a corrupt or
truncated one is detected by its checksums. The newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmsprint.errors import CheckpointError
from lmsprint.model import GPT, GPTConfig

PREFIX = "step_"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def model_state(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights for saving: contiguous CPU tensors, a tied head stored once (as the embedding)."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def load_model_state(model: GPT, state: dict[str, torch.Tensor]) -> None:
    """Load weights saved by :func:`model_state` (checks that the shapes match)."""
    expected = model.state_dict()
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, model has "
                       f"{tuple(expected[wrong[0]].shape)}")
        raise CheckpointError(f"checkpoint weights do not fit this model ({detail}); resume with the model "
                              "settings the run was started with")
    model.load_state_dict(state, strict=not model.config.tie_embeddings)


def save_checkpoint(ckpt_root: Path, step: int, *, model_sd: dict[str, torch.Tensor], state: dict[str, Any],
                    model_config: GPTConfig, keep: int) -> Path:
    """Write a checkpoint atomically and prune old ones; returns its directory."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step:08d}"
    tmp = ckpt_root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(model_sd, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        files = {}
        for name in ("model.safetensors", "state.pt"):
            _fsync_file(tmp / name)
            files[name] = _sha256(tmp / name)
        meta = {"step": step, "files": files, "model_config": asdict(model_config), "time": time.time(),
                "torch": torch.__version__}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _fsync_file(tmp / "meta.json")
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"disk full while writing checkpoint {final}; free space or lower "
                                  "--train.keep_checkpoints (earlier checkpoints are intact)") from None
        raise CheckpointError(f"could not write checkpoint {final} ({e.strerror or e}); check the run "
                              "directory's permissions and free space (earlier checkpoints are intact)") from None
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories, oldest first (temporary ones are never listed)."""
    if not ckpt_root.exists():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def clean_partial(ckpt_root: Path) -> None:
    """Remove temporary directories left by a process killed while writing."""
    if ckpt_root.exists():
        for p in ckpt_root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def verify(path: Path) -> dict[str, Any]:
    """Check a checkpoint's files against its checksums; returns its meta or raises CheckpointError."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        files = meta["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt (bad meta.json)") from None
    for name, digest in files.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is incomplete ({name} missing)")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt ({name} fails its checksum)")
    return meta


def latest_valid(ckpt_root: Path, warn: Any = print) -> Path | None:
    """The newest checkpoint that verifies; corrupt newer ones are reported through ``warn`` and skipped."""
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            warn(f"warning: {e}; falling back to the previous checkpoint")
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(meta, model weights, state) of a verified checkpoint."""
    meta = verify(path)
    try:
        weights = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.__class__.__name__}); delete it to fall back "
                              "to an earlier one") from None
    return meta, weights, state


def find_weights(path: Path) -> Path:
    """A checkpoint directory given a run directory, a checkpoints directory or a checkpoint itself."""
    if (path / "meta.json").exists() and (path / "model.safetensors").exists():
        return path
    root = path / "checkpoints" if (path / "checkpoints").exists() else path
    found = latest_valid(root)
    if found is None:
        raise CheckpointError(f"no valid checkpoint under {path}; pass a run directory that has trained")
    return found
