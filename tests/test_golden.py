"""Golden runs: fixed tiny CPU trainings whose per-step losses, metrics and final checkpoint are pinned.

A refactor that changes behaviour (an extra RNG draw, a reordered update, a changed checkpoint field, a metric
computed differently) changes these numbers. The pinned values live in ``golden.json`` beside this file; after an
intended change of behaviour (or a new torch version) record them again with ``python tests/test_golden.py``.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_docs, tiny_config  # noqa: E402

from lmsprint.training import checkpoint as ckpt  # noqa: E402
from lmsprint.training.metrics import read_metrics  # noqa: E402
from lmsprint.training.run import train  # noqa: E402
from lmsprint.training.trainer import Callback  # noqa: E402

GOLDEN = Path(__file__).with_name("golden.json")
pytestmark = pytest.mark.usefixtures("one_thread")  # the matmuls' sums, and so the losses, do not depend on cores
VOLATILE = {"time", "wall", "tokens_per_s", "train_time", "compile_time", "seconds", "torch", "checkpoint"}
"""Metric fields that depend on the clock, the torch build or the temporary directory."""

RUNS: dict[str, dict[str, object]] = {
    # AdamW with gradient accumulation (2 micro-batches per step), evaluations and checkpoints
    "adamw": {"train__batch_size": 4, "train__micro_batch_size": 2, "train__steps": 12, "train__eval_every": 4,
              "train__ckpt_every": 4, "train__log_every": 3},
    # Muon, wsd, best-fit rows with document masks and a sequence-length curriculum
    "muon": {"optim__name": "muon", "optim__lr": 0.01, "schedule__name": "wsd", "data__batching": "best-fit",
             "data__doc_mask": True, "data__seq_schedule": "linear", "data__seq_start": 16, "data__seq_multiple": 8,
             "data__seq_warmup": 0.5, "train__steps": 12, "train__ckpt_every": 3, "train__eval_every": 6},
    # a loss spike at step 7 rolls the run back to its step-5 checkpoint, with a halved lr and reshuffled data
    "rollback": {"train__ckpt_every": 5, "guard__spike_factor": 3, "guard__spike_warmup": 2,
                 "guard__rollback_lr_factor": 0.5, "train__steps": 10, "optim__weight_decay_mode": "horizon",
                 "optim__wd_horizon": 0.5},
}
RESUME_AT = {"adamw": 8, "muon": 6, "rollback": 5}
"""The resumed twin of each run stops at this step (``--train.stop_at_step``; one that the run evaluates and
checkpoints anyway) and continues with ``--resume``."""


class Spike(Callback):
    """Multiplies the loss of step 7 by 100 the first time the run gets there."""

    def __init__(self) -> None:
        self.done = False

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step == 7 and not self.done:
            self.done = True
            return loss * 100
        return loss


def _digest(obj: Any, h: Any) -> None:
    """Feed a nested structure of tensors and plain values into a hash, deterministically."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(f"K{k!r}".encode())
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    else:
        h.update(repr(obj).encode())


def checkpoint_digests(run_dir: Path) -> dict[str, Any]:
    """The newest checkpoint's content, part by part (its run-time and timestamp left out)."""
    path = ckpt.latest_valid(run_dir / "checkpoints")
    assert path is not None
    meta, weights, state = ckpt.load_checkpoint(path)
    state["trainer"].pop("train_time")
    state.pop("config")  # the resumed twin's config differs only in stop_at_step
    out = {"dir": path.name, "model_config": meta["model_config"], "files": sorted(meta["files"])}
    for name, part in [("weights", weights), *sorted(state.items())]:
        h = hashlib.sha256()
        _digest(part, h)
        out[name] = h.hexdigest()
    out["trainer"] = state["trainer"]
    out["loader"] = state["loader"]
    out["guard"] = state["guard"]
    return out


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every metrics record without its volatile fields."""
    out = []
    for r in read_metrics(run_dir / "metrics.jsonl"):
        r = {k: v for k, v in r.items() if k not in VOLATILE}
        if r["kind"] == "config":
            r["config"]["train"].pop("stop_at_step")
            r["config"]["data"].pop("source")
        out.append(r)
    return out


def run_golden(name: str, root: Path, corpus: Path, *, resume: bool) -> dict[str, Any]:
    overrides = RUNS[name]
    torch.manual_seed(0)  # the checkpoint holds the global generators' states: start them alike
    random.seed(0)
    callbacks = [Spike()] if name == "rollback" else []
    run_dir = root / f"{name}-{'resumed' if resume else 'straight'}"
    if resume:
        first = train(tiny_config(corpus, train__stop_at_step=RESUME_AT[name], **overrides), run_dir=run_dir,
                      callbacks=callbacks)
        assert first.step == RESUME_AT[name]
    result = train(tiny_config(corpus, **overrides), run_dir=run_dir, resume=resume, callbacks=callbacks)
    records = metrics(run_dir)
    return json.loads(json.dumps({  # as stored: tuples become lists
        "result": {"step": result.step, "train_loss": result.train_loss, "val_loss": result.val_loss,
                   "skipped_steps": result.skipped_steps, "rollbacks": result.rollbacks,
                   "val_history": [list(v) for v in result.val_history]},
        "losses": [[r["step"], r["loss"]] for r in records if r["kind"] == "train"],
        "checkpoint": checkpoint_digests(run_dir),
        "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
        "metrics": records,
    }))


def write_corpus(path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(60)))
    return path


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())




@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_run(name: str, tmp_path: Path, golden: dict[str, Any]) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    got = run_golden(name, tmp_path, corpus, resume=False)
    want = golden[name]
    assert got["losses"] == want["losses"]
    assert got["result"] == want["result"]
    assert got["checkpoints"] == want["checkpoints"]
    assert got["checkpoint"] == want["checkpoint"]
    assert got["metrics"] == want["metrics"]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_run_resumed_from_a_mid_checkpoint(name: str, tmp_path: Path, golden: dict[str, Any]) -> None:
    """Stopped at a checkpoint and resumed: the same losses after it and the same final checkpoint."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    got = run_golden(name, tmp_path, corpus, resume=True)
    want = golden[name]
    resumed_from = max(i for i, (step, _) in enumerate(got["losses"]) if step <= RESUME_AT[name]) + 1
    assert got["losses"][resumed_from:] == want["losses"][-len(got["losses"][resumed_from:]):]
    assert got["result"] == want["result"]
    assert got["checkpoint"] == want["checkpoint"]
    assert got["checkpoints"] == want["checkpoints"]


def record() -> None:
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["LMSPRINT_CACHE"] = str(Path(tmp) / "cache")
        corpus = write_corpus(Path(tmp) / "corpus.jsonl")
        out = {name: run_golden(name, Path(tmp), corpus, resume=False) for name in sorted(RUNS)}
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    record()
