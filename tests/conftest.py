"""Shared fixtures: tiny corpora and configs made on the fly, an isolated cache, and the shared data dir."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmsprint.config import RunConfig, build_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny tensors gain nothing from more (they stall when other jobs share the cores), and
    the sums inside the matmuls, so the losses, do not depend on the core count."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Prepared data (and matplotlib's font cache) go to per-session temporary directories, never ~/.cache;
    session-scoped, so that they are in place before any fixture (module-scoped ones too) trains, prepares or plots.
    tests/test_home.py checks that the suite leaves nothing in $HOME."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMSPRINT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        mp.setenv("MPLCONFIGDIR", str(tmp_path_factory.getbasetemp() / "matplotlib"))
        yield


WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial bankers "
         "under silver moons and rivers carry old stories to distant harbours").split()


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) + "."
            for _ in range(n)]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A JSONL corpus of 60 short documents of varied length."""
    import json

    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(60)))
    return path


def tiny_config(source: str | Path, **overrides: object) -> RunConfig:
    """A few-second CPU config: byte tokenizer, 2-layer model, no progress bar, no plot."""
    args = {
        "data.source": str(source), "data.tokenizer": "byte", "data.seq_len": 32, "data.val_fraction": 0.1,
        "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "train.batch_size": 4, "train.steps": 10,
        "train.eval_every": 5, "train.eval_tokens": 256, "train.log_every": 1, "train.ckpt_every": 5,
        "train.device": "cpu", "log.progress": False, "log.plot": False, "schedule.warmup_steps": 2,
    }
    args.update({k.replace("__", "."): v for k, v in overrides.items()})
    return build_config(None, [f"--{k}={v}" for k, v in args.items()])


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.skip(f"shared corpora not found at {SHARED} (only present on the project's machines)")
    return SHARED


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m lmsprint ARGS`` in a subprocess, on this checkout's sources, output captured."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lmsprint", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def screen_lines(text: str) -> list[str]:
    """The non-blank lines a terminal shows for ``text``: a carriage return goes back to the start of the line and
    what follows overwrites it (how progress bars redraw and erase themselves)."""
    shown = []
    for line in text.split("\n"):
        cells: list[str] = []
        for part in line.split("\r"):
            col = 0
            for ch in part:
                if col < len(cells):
                    cells[col] = ch
                else:
                    cells.append(ch)
                col += 1
        if "".join(cells).strip():
            shown.append("".join(cells).rstrip())
    return shown


def assert_clean_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit code 2 and one stderr line, ``error: ...`` containing ``pattern``, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert pattern in lines[0], lines[0]
