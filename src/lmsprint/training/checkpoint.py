"""Atomic, checksummed checkpoints.

A checkpoint is a directory ``RUN/checkpoints/step_NNNNNNNN/`` holding ``model.safetensors`` (the unwrapped
model's weights, tied weights once), ``state.pt`` (optimizer, schedule, loader, RNG, scaler and trainer state),
``tokenizer.json`` (a copy of the run's tokenizer, the one that counts) and ``meta.json`` (step, model shape and
a SHA-256 of each file). A sharded (FSDP2) run adds ``dcp/``, the model and optimizer shards of every rank in
torch.distributed.checkpoint's format (``state.pt`` then holds no optimizer, ``model.safetensors`` the
consolidated weights); ``meta.json`` covers those files too. It is written into a temporary directory, every file
fsynced, then renamed into place: a checkpoint directory that exists is complete, and a corrupt or truncated one
is detected by its checksums. The newest ``keep`` checkpoints are kept.

Only the files ``meta.json`` lists are ever read, each after its checksum is verified, and none can run code:
weights are safetensors, ``state.pt`` is read with ``torch.load(weights_only=True)``, the DCP files through
:mod:`lmsprint.training.safe_dcp`; ``meta.json``'s model shape must be the one ``model.safetensors`` holds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lmsprint.data.tokenizer import TextTokenizer, load_tokenizer
from lmsprint.errors import CheckpointError
from lmsprint.model import GPT, GPTConfig

PREFIX = "step_"
TOKENIZER = "tokenizer.json"
DCP_METADATA = "dcp/.metadata"


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


def model_state(model: GPT, sd: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights for saving: contiguous CPU tensors, a tied head stored once (as the embedding).

    ``sd``: the whole state dict when ``model.state_dict()`` would hold shards (gathered from an FSDP2 model).
    """
    return {k: v.detach().to("cpu").contiguous() for k, v in _saved_tensors(model, sd).items()}


def _saved_tensors(model: GPT, sd: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a model's state that a checkpoint holds, as they are: a tied head left out."""
    sd = model.state_dict() if sd is None else dict(sd)
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def load_model_state(model: GPT, state: dict[str, torch.Tensor]) -> None:
    """Load weights saved by :func:`model_state` (checks that the shapes match)."""
    expected = _saved_tensors(model)
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


def sharded_temp_dir(ckpt_root: Path, step: int) -> Path:
    """The temporary directory every rank of a sharded run writes its part of step ``step`` into (a fixed name,
    so all ranks agree on it; created empty, by one rank, before the others write)."""
    tmp = ckpt_root / f".tmp-{PREFIX}{step:08d}-sharded"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(ckpt_root: Path, step: int, *, model_sd: dict[str, torch.Tensor], state: dict[str, Any],
                    model_config: GPTConfig, keep: int, tmp: Path | None = None,
                    protect_step: int | None = None, files: dict[str, bytes] | None = None,
                    shown_as: Path | None = None) -> Path:
    """Write a checkpoint atomically and prune old ones; returns its directory.

    ``tmp``: a :func:`sharded_temp_dir` already holding the other ranks' files, checksummed and renamed with the rest.
    ``files``: more files to write into it by name (the run's ``tokenizer.json``), checksummed like the others.
    ``shown_as``: where an error says the checkpoint was going (``best/``, written under a scratch root first).
    """
    final = ckpt_root / f"{PREFIX}{step:08d}"
    # the newest checkpoint at most protect_step (the guard's last judged-good one) is never pruned
    judged = [p for p in list_checkpoints(ckpt_root) if protect_step is not None
              and int(p.name[len(PREFIX):]) <= protect_step and p.name < final.name]
    protected = judged[-1] if judged else None
    given = tmp is not None
    if tmp is None:
        tmp = ckpt_root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
    if keep >= 2:  # what the pruning below would delete goes first: the disk holds keep checkpoints, not keep + 1
        for old in [p for p in list_checkpoints(ckpt_root) if p.name < final.name][: -(keep - 1)]:
            if old != protected:
                _discard(old)
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if not given:
            tmp.mkdir()
        save_file(model_sd, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_file(f)
            files[f.relative_to(tmp).as_posix()] = _sha256(f)
        for d in (p for p in tmp.rglob("*") if p.is_dir()):
            _fsync_dir(d)
        meta = {"step": step, "files": files, "model_config": asdict(model_config), "time": time.time(),
                "torch": torch.__version__}
        meta["meta_sha256"] = _meta_digest(meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _fsync_file(tmp / "meta.json")
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier attempt: set aside, then replaced
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a second Ctrl-C, a full disk...: nothing half-written stays
        if not isinstance(e, (OSError, RuntimeError, SafetensorError)):
            raise
        shown = shown_as or final
        resume = f"then continue with --resume {shown.parent.parent}"
        if _disk_full(e, ckpt_root):
            raise CheckpointError(f"disk full while writing checkpoint {shown} (earlier checkpoints are intact); "
                                  f"free space (or lower --train.keep_checkpoints, if above 1), {resume}") from None
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [e.__class__.__name__])[0]
        raise CheckpointError(f"could not write checkpoint {shown} ({reason}; earlier checkpoints are intact); "
                              f"check the run directory's permissions and free space, {resume}") from None
    # checkpoints of later steps are stale (a corrupt one skipped on resume): the run has moved past them
    for old in [p for p in list_checkpoints(ckpt_root) if p.name > final.name]:
        _discard(old)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        if old != protected:
            _discard(old)
    return final


def _discard(path: Path) -> None:
    """Delete a checkpoint directory: first renamed to a temporary name (atomic), so that a process killed while
    deleting never leaves a half-deleted ``step_*`` directory behind (:func:`clean_partial` finishes the job)."""
    aside = path.with_name(f".tmp-old-{path.name}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _disk_full(e: BaseException, where: Path) -> bool:
    """Whether a write failed for lack of space (safetensors and torch.save report it in their own words)."""
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "os error 28" in str(e):
        return True
    try:
        return shutil.disk_usage(where).free < 1 << 20  # torch.save: "unexpected pos ..." on a full disk
    except OSError:
        return False


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories, oldest first (temporary ones are never listed)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def clean_partial(ckpt_root: Path) -> None:
    """Remove temporary directories left by a process killed while writing."""
    if ckpt_root.exists():
        for p in ckpt_root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def _meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of meta.json's content without its own checksum (the model shape and file list are checked too)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _inside(name: Any) -> bool:
    """A file name of meta.json's list that stays inside the checkpoint directory."""
    return (isinstance(name, str) and name != "" and "\\" not in name and not PurePosixPath(name).is_absolute()
            and ".." not in PurePosixPath(name).parts)


def verify(path: Path) -> dict[str, Any]:
    """Check a checkpoint's files against its checksums, and that the model shape in meta.json is the one
    model.safetensors holds; returns its meta or raises CheckpointError. Files that meta.json does not list are
    never read (a planted ``dcp/`` folder, say)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        files = meta["files"]
        GPTConfig(**meta["model_config"])
        ok = (isinstance(files, dict) and {"model.safetensors", "state.pt"} <= files.keys()
              and all(_inside(name) and isinstance(digest, str) for name, digest in files.items())
              and meta.get("meta_sha256", _meta_digest(meta)) == _meta_digest(meta))  # older checkpoints: no field
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt (bad meta.json)")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete ({name} missing)")
        try:
            bad = _sha256(f) != digest
        except OSError as e:
            raise CheckpointError(f"checkpoint {path} cannot be read ({name}: {e.strerror or e})") from None
        if bad:
            raise CheckpointError(f"checkpoint {path} is corrupt ({name} fails its checksum)")
    _check_shape(path, GPTConfig(**meta["model_config"]))
    return meta


def _check_shape(path: Path, config: GPTConfig) -> None:
    """model.safetensors holds exactly the tensors of a model of ``config`` (read from its header, and compared
    with the model built on the meta device): a meta.json that claims another model, say a 51 GB one, is refused
    before that model is ever allocated."""
    corrupt = f"checkpoint {path} is corrupt: meta.json describes another model than model.safetensors holds"
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # safetensors raises its own errors on a bad header
        raise CheckpointError(f"checkpoint {path} is corrupt (model.safetensors has a bad header)") from None
    if not 0 < config.n_layer <= len(saved):  # a model of more layers than tensors: not worth building to see
        raise CheckpointError(f"{corrupt} ({config.n_layer} layers)")
    tables = _rotary_bytes(config)
    free = _available_memory()
    if free is not None and tables > free:
        raise CheckpointError(f"checkpoint {path}: the rotary tables alone of the model its meta.json describes "
                              f"(block_size {config.block_size}) need {tables / 2**30:.1f} GiB, more than the "
                              f"{free / 2**30:.1f} GiB of memory available: a corrupt meta.json, or a machine too "
                              "small for this model")
    try:
        # block_size only sizes rotary tables (real memory even on the meta device) and a learned wpe (a parameter)
        probe = replace(config, block_size=1) if config.pos_emb == "rope" else config
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in _saved_tensors(GPT(probe)).items()}
    except Exception:  # a shape no model can have (zero heads, ...)
        raise CheckpointError(f"{corrupt} (no model has its shape)") from None
    if expected != saved:
        wrong = sorted(set(expected) ^ set(saved)) or [k for k in expected if expected[k] != saved[k]]
        raise CheckpointError(f"{corrupt} ({wrong[0]})")


def _rotary_bytes(config: GPTConfig) -> int:
    """Memory of a model's rotary tables (cos and sin, float32, in every layer), which its weights do not show."""
    if config.pos_emb != "rope" or config.n_head <= 0:
        return 0
    return config.n_layer * 2 * max(config.block_size, 0) * (config.n_embd // config.n_head // 2) * 4


def _available_memory() -> int | None:
    """Bytes of memory available to allocate (None where the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def verified_file(path: Path, name: str) -> Path | None:
    """``path / name`` if the checkpoint's meta.json lists it and it passes its checksum (the rest of the checkpoint
    is not verified), else None."""
    try:
        digest = json.loads((path / "meta.json").read_text())["files"][name]
        return path / name if isinstance(digest, str) and _sha256(path / name) == digest else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_sharded(meta: dict[str, Any]) -> bool:
    """The checkpoint holds the DCP shards of an FSDP2 run (by meta.json's list, never by what lies on disk)."""
    return DCP_METADATA in meta["files"]


def checkpoint_tokenizer(path: Path, meta: dict[str, Any]) -> TextTokenizer:
    """The tokenizer of a verified checkpoint: its own copy, verified with it (whatever became of the run's
    tokenizer.json), or for a checkpoint written before checkpoints held one, the run's tokenizer.json, refused
    unless its vocabulary is the model's."""
    if TOKENIZER in meta["files"]:
        return load_tokenizer(path / TOKENIZER)
    tok_path = path.parent.parent / TOKENIZER
    if not tok_path.exists():
        raise CheckpointError(f"{tok_path.parent} has no tokenizer.json; the run directory is incomplete")
    tok, vocab = load_tokenizer(tok_path), meta["model_config"]["vocab_size"]
    if tok.vocab_size != vocab:
        raise CheckpointError(f"{tok_path} has {tok.vocab_size} tokens but the model was trained on {vocab}; the "
                              "run directory is inconsistent (restore the run's tokenizer.json)")
    return tok


def latest_valid(ckpt_root: Path, warn: Any = print, *, max_step: int | None = None) -> Path | None:
    """The newest checkpoint that verifies (of those at most ``max_step``); corrupt newer ones are reported through
    ``warn`` and skipped."""
    for path in reversed(list_checkpoints(ckpt_root)):
        if max_step is not None and int(path.name[len(PREFIX):]) > max_step:
            continue
        try:
            verify(path)
            return path
        except CheckpointError as e:
            warn(f"warning: {e}; falling back to the previous checkpoint")
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(meta, model weights, state) of a verified checkpoint."""
    try:
        meta = verify(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; pass the run directory to use its newest valid checkpoint") from None
    try:
        weights = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.__class__.__name__}); delete it to fall back "
                              "to an earlier one") from None
    return meta, weights, state


def find_weights(path: Path) -> Path:
    """A checkpoint directory given a run directory, a checkpoints directory or a checkpoint itself."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass a run directory (runs/NAME) or a checkpoint directory")
    if (path / "meta.json").exists() and (path / "model.safetensors").exists():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    skipped: list[str] = []
    found = latest_valid(root, warn=skipped.append)
    if found is None:
        if skipped:
            raise CheckpointError(f"no valid checkpoint under {path}: {len(skipped)} fail their checksums (corrupt or "
                                  "truncated); restore them from a copy, or train the run again")
        raise CheckpointError(f"no valid checkpoint under {path}; pass a run directory that has trained")
    for warning in skipped:
        print(warning, file=sys.stderr)
    return found
