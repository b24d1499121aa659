"""Never lose a run: atomic checkpoints, corruption fallback, signals, SIGKILL at random points, GPU out of memory.

The subprocess tests drive ``python -m lmsprint train`` exactly as a user (or a cluster scheduler) would.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_docs, run_cli, screen_lines, tiny_config

from lmsprint.config import ModelConfig
from lmsprint.errors import CheckpointError
from lmsprint.model import build_model, resolve_model_config
from lmsprint.training import checkpoint as ckpt
from lmsprint.training import memory
from lmsprint.training.memory import GPUOutOfMemory, suggest_micro_batch
from lmsprint.training.metrics import read_metrics
from lmsprint.training.run import train
from lmsprint.training.trainer import Callback, Trainer

SRC = Path(__file__).resolve().parents[1] / "src"
# ~250 optimizer steps of a 1-layer model: a few seconds of training, long enough to interrupt on purpose
STEPS = 250
CLI_RUN = ["--data.tokenizer=byte", "--model.n_layer=1", "--model.n_embd=16", "--model.n_head=2",
           "--data.seq_len=16", "--train.batch_size=4", "--train.device=cpu", "--log.progress=false",
           "--log.plot=false", "--sample=0", f"--train.steps={STEPS}", "--train.log_every=1", "--train.eval_every=0",
           "--train.ckpt_every=7", "--train.keep_checkpoints=2"]


def train_losses(run_dir: Path) -> dict[int, float]:
    """The last logged training loss of each step (a resumed run logs the steps after its checkpoint again)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "event" and r.get("event") == name]


def assert_checkpoints_complete(run_dir: Path) -> list[Path]:
    """Every listed checkpoint verifies: none is ever half-written (temporary ``.tmp-*`` ones are not listed)."""
    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    assert all(not p.name.startswith(".") for p in found)
    for path in found:
        ckpt.verify(path)
    return found


def assert_same_losses(expected: dict[int, float], got: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected), (sorted(set(expected) ^ set(got)))
    worst = max(abs(expected[s] - got[s]) for s in expected)
    assert worst <= 1e-6, worst


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, float]]:
    """A corpus and the per-step losses of an uninterrupted CLI run of CLI_RUN on it."""
    root = tmp_path_factory.mktemp("reliability")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(60)))
    proc = run_cli("train", str(corpus), *CLI_RUN, "--train.run_name=reference", cwd=root)
    assert proc.returncode == 0, proc.stderr
    losses = train_losses(root / "runs" / "reference")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return corpus, losses


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmsprint", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def steps_logged_since_resume(run_dir: Path, resumes: int) -> list[int]:
    """The training steps logged after the ``resumes``-th resume event (all of them for ``resumes=0``)."""
    seen, steps = 0, []
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if r["kind"] == "event" and r.get("event") == "resume":
            seen, steps = seen + 1, []
        elif r["kind"] == "train" and seen >= resumes:
            steps.append(r["step"])
    return steps if seen >= resumes else []


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 60, resumes: int = 0) -> None:
    """Block until this process has logged a training record of ``step`` or later.

    A resumed process (the ``resumes``-th) counts only what it logged itself: the steps a killed earlier process
    logged past its last checkpoint are in the same file, and would otherwise end the wait before this one starts.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(steps_logged_since_resume(run_dir, resumes), default=0) >= step:
            return
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()}"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout}s")


# ----------------------------------------------------------------------------------------------------------
# checkpoints on disk


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus, run) of a 12-step in-process run with checkpoints at steps 4, 8 and 12."""
    root = tmp_path_factory.mktemp("finished")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(60)))
    cfg = tiny_config(corpus, train__steps=12, train__ckpt_every=4, train__keep_checkpoints=3)
    train(cfg, run_dir=root / "run")
    return corpus, root / "run"


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    offset %= len(raw)
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def _edit_meta(path: Path, edit: Any) -> None:
    """Rewrite meta.json as valid JSON with ``edit`` applied: a bit flip that still parses, or a wrong shape."""
    meta = json.loads((path / "meta.json").read_text())
    edit(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def _dir_instead_of(path: Path) -> None:
    path.unlink()
    path.mkdir()


DAMAGE = {
    "flip-weights": lambda p: _flip(p / "model.safetensors", -100),
    "flip-state": lambda p: _flip(p / "state.pt", 500),
    "truncate-state": lambda p: os.truncate(p / "state.pt", 100),
    "no-meta": lambda p: (p / "meta.json").unlink(),
    "meta-model-shape-changed": lambda p: _edit_meta(p, lambda m: m["model_config"].update(rope_base=90000.0)),
    "meta-files-a-list": lambda p: _edit_meta(p, lambda m: m.update(files=list(m["files"]))),
    "meta-unknown-model-key": lambda p: _edit_meta(p, lambda m: m["model_config"].update(depth=3)),
    "meta-no-model-config": lambda p: _edit_meta(p, lambda m: m.pop("model_config")),
    "weights-a-directory": lambda p: _dir_instead_of(p / "model.safetensors"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_corrupt_newest_checkpoint_is_skipped_and_resume_continues_exactly(
        tmp_path: Path, finished_run: tuple[Path, Path], damage: str, capsys: pytest.CaptureFixture) -> None:
    corpus, original = finished_run
    run = tmp_path / "run"
    shutil.copytree(original, run)
    newest = run / "checkpoints" / "step_00000012"
    DAMAGE[damage](newest)
    with pytest.raises(CheckpointError, match="step_00000012 is (corrupt|incomplete)"):
        ckpt.verify(newest)
    with pytest.raises(CheckpointError, match="pass the run directory"):
        ckpt.load_checkpoint(newest)
    warned: list[str] = []
    assert ckpt.latest_valid(run / "checkpoints", warn=warned.append) == run / "checkpoints" / "step_00000008"
    assert len(warned) == 1 and "falling back" in warned[0]

    cfg = tiny_config(corpus, train__steps=12, train__ckpt_every=4, train__keep_checkpoints=3)
    result = train(cfg, run_dir=run, resume=True)
    out = capsys.readouterr().out
    assert "step_00000012 is" in out and "falling back" in out and "resumed from" in out and "step 8" in out
    assert result.step == 12
    assert events(run, "resume")[-1]["step"] == 8
    assert_same_losses(train_losses(original), train_losses(run))
    assert [p.name for p in assert_checkpoints_complete(run)] == ["step_00000004", "step_00000008", "step_00000012"]


def test_sample_and_export_of_a_file_are_clean_errors(tmp_path: Path, finished_run: tuple[Path, Path]) -> None:
    from lmsprint.export import export
    from lmsprint.sample import sample

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(CheckpointError, match="afile is not a directory"):
        sample(afile)
    run = tmp_path / "run"
    shutil.copytree(finished_run[1], run)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("x")
    with pytest.raises(CheckpointError, match="no valid checkpoint under"):
        export(run, tmp_path / "hf")


def _save(root: Path, step: int, keep: int = 2) -> Path:
    config = resolve_model_config(ModelConfig(n_layer=1, n_head=2, n_embd=16), vocab_size=257, block_size=16)
    model = build_model(config, device=torch.device("cpu"), seed=step)  # a checkpoint's weights fit its meta.json
    return ckpt.save_checkpoint(root, step, model_sd=ckpt.model_state(model), state={"step": step},
                                model_config=config, keep=keep)


def test_keep_last_k_checkpoints(tmp_path: Path) -> None:
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    # a newer checkpoint skipped as corrupt on resume is stale once the run writes past its resume point
    (tmp_path / "step_00000009").mkdir()
    _save(tmp_path, 6, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000006"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_leftover_temporary_directories_are_never_listed_and_get_cleaned(tmp_path: Path) -> None:
    _save(tmp_path, 3)
    for name in (".tmp-step_00000004-1234", ".tmp-old-step_00000001-99", ".tmp-step_00000005-sharded"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003"]
    assert ckpt.latest_valid(tmp_path) == tmp_path / "step_00000003"
    ckpt.clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]


def test_interrupted_write_or_prune_leaves_no_partial_checkpoint(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A second Ctrl-C while a checkpoint is written, or while an old one is deleted, leaves only whole ones."""
    _save(tmp_path, 1)
    _save(tmp_path, 2)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ckpt.torch, "save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _save(tmp_path, 3, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]

    rmtree = shutil.rmtree

    def interrupted_deleting(path: Path, *args: object, **kwargs: object) -> None:
        if Path(path).name.startswith(".tmp-old-"):
            raise KeyboardInterrupt
        rmtree(path, *args, **kwargs)

    with monkeypatch.context() as m:  # killed while pruning step 1: it is already out of the listing
        m.setattr(ckpt.shutil, "rmtree", interrupted_deleting)
        with pytest.raises(KeyboardInterrupt):
            _save(tmp_path, 3)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002"]
    ckpt.verify(tmp_path / "step_00000002")
    ckpt.clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002"]
    _save(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]


def test_rewriting_a_step_replaces_it_whole(tmp_path: Path) -> None:
    """Resuming behind a corrupt newest checkpoint writes that step again: the new one replaces it."""
    _save(tmp_path, 4)
    _flip(tmp_path / "step_00000004" / "model.safetensors", -3)
    _save(tmp_path, 4)
    assert ckpt.verify(tmp_path / "step_00000004")["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]


def test_resume_before_the_first_checkpoint_starts_over_exactly(tmp_path: Path, corpus: Path) -> None:
    straight = tmp_path / "straight"
    train(tiny_config(corpus, train__ckpt_every=0), run_dir=straight)

    class Crash(Callback):
        def on_grads(self, step: int, model: torch.nn.Module) -> None:
            if step == 3:
                raise RuntimeError("killed")

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_config(corpus, train__ckpt_every=0), run_dir=run, callbacks=[Crash()])
    assert (run / "config.toml").exists() and not ckpt.list_checkpoints(run / "checkpoints")
    result = train(tiny_config(corpus, train__ckpt_every=0), run_dir=run, resume=True)
    assert result.step == 10
    assert_same_losses(train_losses(straight), train_losses(run))


def test_all_checkpoints_corrupt_is_an_error_that_names_the_fix(tmp_path: Path, finished_run: tuple[Path, Path]
                                                                ) -> None:
    corpus, original = finished_run
    run = tmp_path / "run"
    shutil.copytree(original, run)
    for path in ckpt.list_checkpoints(run / "checkpoints"):
        _flip(path / "state.pt", 10)
    before = (run / "config.toml").read_text(), (run / "metrics.jsonl").read_text()
    cfg = tiny_config(corpus, train__steps=20, train__ckpt_every=4, train__keep_checkpoints=3)
    with pytest.raises(CheckpointError, match=r"no valid checkpoint .* delete .* to train this run again"):
        train(cfg, run_dir=run, resume=True)
    assert ((run / "config.toml").read_text(), (run / "metrics.jsonl").read_text()) == before  # untouched


def test_metrics_line_cut_by_a_crash_does_not_swallow_the_next_record(tmp_path: Path, corpus: Path) -> None:
    run = tmp_path / "run"
    train(tiny_config(corpus, train__steps=4, train__ckpt_every=2), run_dir=run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # killed mid-write
    train(tiny_config(corpus, train__steps=6, train__ckpt_every=2), run_dir=run, resume=True)
    assert events(run, "resume")[-1]["step"] == 4
    assert sorted(train_losses(run)) == list(range(1, 7))


# ----------------------------------------------------------------------------------------------------------
# signals and SIGKILL, through the CLI


def test_sigint_checkpoints_at_the_step_boundary_and_resume_finishes_exactly(
        tmp_path: Path, reference: tuple[Path, dict[int, float]]) -> None:
    corpus, expected = reference
    run = tmp_path / "runs" / "r"
    proc = start_cli("train", str(corpus), *CLI_RUN, "--train.run_name=r", cwd=tmp_path)
    wait_for_step(proc, run, 10)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    stopped = events(run, "interrupted")
    assert len(stopped) == 1
    step = stopped[0]["step"]
    assert 10 <= step < STEPS
    assert f"stopped at step {step}; continue with: lmsprint train --resume" in err
    assert ckpt.verify(run / "checkpoints" / f"step_{step:08d}")["step"] == step
    assert_checkpoints_complete(run)

    done = run_cli("train", "--resume", str(run), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {run / 'checkpoints' / f'step_{step:08d}'} at step {step}" in done.stdout
    assert_same_losses(expected, train_losses(run))


def test_sigterm_checkpoints_and_exits_143(tmp_path: Path, reference: tuple[Path, dict[int, float]]) -> None:
    corpus, _ = reference
    run = tmp_path / "runs" / "r"
    proc = start_cli("train", str(corpus), *CLI_RUN, "--train.run_name=r", cwd=tmp_path)
    wait_for_step(proc, run, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    step = events(run, "interrupted")[0]["step"]
    assert ckpt.verify(run / "checkpoints" / f"step_{step:08d}")["step"] == step
    summary = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "summary"]
    assert summary and summary[-1]["step"] == step


def test_second_signal_exits_at_once_without_a_partial_checkpoint(
        tmp_path: Path, reference: tuple[Path, dict[int, float]]) -> None:
    corpus, _ = reference
    run = tmp_path / "runs" / "r"
    proc = start_cli("train", str(corpus), *CLI_RUN, "--train.run_name=r", cwd=tmp_path)
    wait_for_step(proc, run, 5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)  # the first one is being handled (the step finishing, or its checkpoint being written)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert max(train_losses(run)) < STEPS  # it stopped, not ran on to the end
    assert_checkpoints_complete(run)
    done = run_cli("train", "--resume", str(run), "--train.steps=40", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_sigint_under_a_progress_bar_is_announced_on_its_own_line_and_reported_once(
        tmp_path: Path, reference: tuple[Path, dict[int, float]]) -> None:
    corpus, _ = reference
    run = tmp_path / "runs" / "r"
    proc = start_cli("train", str(corpus), *CLI_RUN, "--log.progress=true", "--train.run_name=r", cwd=tmp_path)
    wait_for_step(proc, run, 10)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    step = events(run, "interrupted")[0]["step"]
    shown = screen_lines(out) + screen_lines(err)
    assert "stopping: checkpointing at the end of this step (signal again to stop at once)" in shown, err
    assert [line for line in shown if "stopped" in line] == [f"stopped at step {step}; continue with: lmsprint "
                                                            "train --resume runs/r"], shown


def test_two_signals_that_python_handles_as_one_stop_at_once(tmp_path: Path, corpus: Path) -> None:
    """A second Ctrl-C soon after the first, while a step's kernels run: Python calls its handler once for both
    signals, which must still stop the run at once (KeyboardInterrupt), not at the next step boundary."""

    class TwoSignals(Callback):
        def on_grads(self, step: int, model: torch.nn.Module) -> None:
            if step == 3:
                sent = threading.Event()

                def send() -> None:  # delivered to this helper thread: the main thread runs no handler meanwhile
                    for _ in range(2):
                        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
                    sent.set()

                threading.Thread(target=send).start()
                sent.wait()

    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN under nohup
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(corpus, train__steps=10, train__ckpt_every=2), run_dir=run, callbacks=[TwoSignals()])
    assert not events(run, "interrupted")
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000002"]
    assert signal.getsignal(signal.SIGINT) is before and signal.set_wakeup_fd(-1) == -1


def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(
        tmp_path: Path, reference: tuple[Path, dict[int, float]]) -> None:
    """The issue's fault test: kill -9 four times (once before the first checkpoint), resume each time."""
    corpus, expected = reference
    run = tmp_path / "runs" / "r"
    rng = random.Random(0)
    kill_at = [3] + sorted(rng.sample(range(15, STEPS - 20), 3))  # ckpt_every=7: the first lands before any
    for i, step in enumerate(kill_at):
        args = ["--resume", str(run)] if i else [str(corpus), *CLI_RUN, "--train.run_name=r"]
        proc = start_cli("train", *args, cwd=tmp_path)
        wait_for_step(proc, run, step, resumes=i)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert_checkpoints_complete(run)
    done = run_cli("train", "--resume", str(run), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(events(run, "resume")) == len(kill_at)
    assert_same_losses(expected, train_losses(run))
    assert [p.name for p in assert_checkpoints_complete(run)] == [f"step_{STEPS - STEPS % 7:08d}",
                                                                 f"step_{STEPS:08d}"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]  # cleaned on resume


# ----------------------------------------------------------------------------------------------------------
# GPU out of memory


def test_suggest_micro_batch() -> None:
    gib = 2**30
    # 80 GiB, 8 GiB fixed, 1 GiB a row: 0.9 * 80 - 8 = 64 rows fit; the largest divisor of 128 below 64 is 64,
    # but the micro-batch that failed was 64, so the suggestion is smaller
    assert suggest_micro_batch(gib, 8 * gib, 80 * gib, 128, current=64) == (64, 32)
    assert suggest_micro_batch(gib, 8 * gib, 80 * gib, 128, current=128) == (64, 64)
    assert suggest_micro_batch(gib, 8 * gib, 80 * gib, 96, current=96) == (64, 48)  # a divisor of the batch
    assert suggest_micro_batch(3 * gib, 8 * gib, 80 * gib, 96, current=96) == (21, 16)
    assert suggest_micro_batch(gib, 79 * gib, 80 * gib, 128, current=128) == (0, 0)  # the fixed part alone
    assert suggest_micro_batch(float("inf"), 10 * gib, 80 * gib, 128, current=2) == (1, 1)  # 1 row fits, 2 not
    assert suggest_micro_batch(float("inf"), float("inf"), 80 * gib, 128, current=1) == (0, 0)
    assert suggest_micro_batch(gib, 8 * gib, 80 * gib, 7, current=7) == (64, 1)  # a prime batch: 1


@pytest.fixture
def cpu_trainer(tmp_path: Path, corpus: Path) -> Trainer:
    cfg = tiny_config(corpus, train__batch_size=8, train__micro_batch_size=8)
    return Trainer(cfg, tmp_path / "run")


def test_out_of_memory_names_the_micro_batch_that_fits(cpu_trainer: Trainer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 2**30

    def oom() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cpu_trainer.device = torch.device("cuda")  # what run() checks; nothing else runs on it here
    monkeypatch.setattr(cpu_trainer, "_run", oom)
    monkeypatch.setattr(memory, "measure_memory", lambda *a, **k: (8.0 * gib, 10.0 * gib))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * gib, 141 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 20 * gib)
    with pytest.raises(GPUOutOfMemory) as e:
        cpu_trainer.run()
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("out of GPU memory at --train.micro_batch_size=8 (--data.seq_len=32, fp32)")
    # 0.9 * 80 GiB - 8 GiB = 64 GiB: 6 rows of 10 GiB; the largest divisor of 8 up to 6 is 4
    assert "about 6 rows fit in the 80 GiB this GPU has free: use --train.micro_batch_size=4" in message
    assert "--data.seq_len" in message

    monkeypatch.setattr(memory, "measure_memory", lambda *a, **k: (float("inf"), float("inf")))
    with pytest.raises(GPUOutOfMemory, match="not even one row fits .* lower --data.seq_len"):
        cpu_trainer.run()


def test_measure_memory_takes_the_peaks_of_one_and_two_rows(cpu_trainer: Trainer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The measuring sequence runs (on CPU, with the CUDA statistics faked from the rows seen)."""
    peak = {"now": 0}

    def forward_pre_hook(module: torch.nn.Module, args: tuple) -> None:
        peak["now"] = max(peak["now"], 1000 + 100 * args[0].shape[0])

    def step_pre_hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        peak["now"] = max(peak["now"], 1050)

    cpu_trainer.model.register_forward_pre_hook(forward_pre_hook)
    cpu_trainer.optimizer.register_step_pre_hook(step_pre_hook)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: peak.update(now=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak["now"])
    t = cpu_trainer
    assert memory.measure_memory(t.model, t.optimizer, seq_len=32, vocab=t.model.config.vocab_size, amp=t.amp,
                                 device=t.device) == (1000.0, 100.0)
    assert all(p.grad is None for p in cpu_trainer.model.parameters())


@pytest.mark.gpu
def test_gpu_out_of_memory_through_the_cli(tmp_path: Path, corpus: Path) -> None:
    """A micro-batch far too large for the GPU: one clear line naming a micro-batch that then trains."""
    from conftest import assert_clean_error

    big = ["--config=tiny-cpu", "--model.preset=small", "--data.seq_len=2048", "--data.tokenizer=byte",
           "--train.batch_size=2048", "--train.device=cuda", "--train.compile=false", "--log.progress=false",
           "--log.plot=false", "--train.steps=2", "--sample=0", "--train.eval_tokens=4096", "--train.run_name=oom"]
    proc = run_cli("train", str(corpus), *big, "--train.micro_batch_size=2048", cwd=tmp_path)
    assert_clean_error(proc, "out of GPU memory at --train.micro_batch_size=2048")
    line = proc.stderr.strip()
    assert "rows fit" in line and "--data.seq_len" in line, line
    micro = int(line.split("use --train.micro_batch_size=")[1].split()[0])
    assert 1 <= micro < 2048 and 2048 % micro == 0
    assert not (tmp_path / "runs" / "oom").exists()  # a run that never trained leaves no directory
    fits = run_cli("train", str(corpus), *big, f"--train.micro_batch_size={micro}", cwd=tmp_path)
    assert fits.returncode == 0, fits.stderr


def test_sigterm_while_preparing_data_leaves_nothing_half_written(tmp_path: Path) -> None:
    """SIGTERM before the training loop (here: in the middle of tokenizing) ends through the normal cleanup:
    exit 143, no temporary shard directory next to --out."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(60)))
    code = ("import os, signal, sys\n"
            "import lmsprint.data.prepare as P\n"
            "add = P._SplitWriter.add\n"
            "def add_then_term(self, ids):\n"
            "    add(self, ids)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "P._SplitWriter.add = add_then_term\n"
            "from lmsprint.cli import main\n"
            "sys.argv = ['lmsprint', 'prepare', sys.argv[1], '--out', sys.argv[2], '--data.tokenizer=byte']\n"
            "main()\n")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(corpus), str(tmp_path / "out" / "prep")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
