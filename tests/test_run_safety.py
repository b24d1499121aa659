"""What a run directory can do to lmsprint, and what lmsprint does to it (issue 16, part B).

- Nothing in a run directory runs code: pickles planted in every file of a run (DCP metadata and shards, state.pt,
  the tokenizer, meta.json, ...) stay inert through ``train --resume``, ``sample`` and ``export``, also when
  meta.json is rewritten to vouch for them; the checkpoint's copy of the tokenizer is the one that counts.
- One owner per run: a second process is refused while one trains a run; a crashed holder's lock is taken over.
- Resume is honest: an override is applied for real (--optim.lr trains on the new peak) or refused in one line,
  and a refused resume writes nothing.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, make_docs, run_cli, tiny_config

from lmsprint.config import RunConfig
from lmsprint.errors import CheckpointError, DataError
from lmsprint.model import GPT, GPTConfig
from lmsprint.optim import build_optimizer
from lmsprint.training import checkpoint as ckpt
from lmsprint.training.checkpointer import save_sharded
from lmsprint.training.lock import LOCK, RunLock
from lmsprint.training.metrics import read_metrics
from lmsprint.training.run import resume_config, train
from lmsprint.training.trainer import Trainer

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus and a trained run (``good``: checkpoints at steps 2 and 4, AdamW), made once."""
    root = tmp_path_factory.mktemp("run-safety")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(60)))
    with pytest.MonkeyPatch.context() as mp:  # the same isolated cache as conftest's per-test fixture
        mp.setenv("LMSPRINT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        train(tiny_config(corpus, train__steps=4, train__ckpt_every=2), run_dir=root / "good")
    return root


@pytest.fixture
def run(assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the trained run, the corpus beside it, the working directory there."""
    shutil.copy(assets / "corpus.jsonl", tmp_path / "corpus.jsonl")
    shutil.copytree(assets / "good", tmp_path / "good")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "good"


def _cli(*args: str, capsys: pytest.CaptureFixture) -> subprocess.CompletedProcess:
    """``lmsprint ARGS`` in this process (the working directory is the test's)."""
    from lmsprint.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, e.value.code, out.out, out.err)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _checkpoints(run: Path) -> list[Path]:
    return ckpt.list_checkpoints(run / "checkpoints")


def _reseal(path: Path) -> None:
    """Rewrite a checkpoint's meta.json to list and vouch for every file it holds now (what an attacker who can
    write the run directory can do too)."""
    meta = json.loads((path / "meta.json").read_text())
    meta["files"] = {f.relative_to(path).as_posix(): ckpt._sha256(f) for f in sorted(path.rglob("*"))
                     if f.is_file() and f.name != "meta.json"}
    meta["meta_sha256"] = ckpt._meta_digest(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def _model_and_optimizer(path: Path) -> tuple[GPT, torch.optim.Optimizer]:
    """The model and optimizer of a checkpoint, loaded."""
    meta, weights, state = ckpt.load_checkpoint(path)
    cfg = RunConfig.from_dict(state["config"])
    model = GPT(GPTConfig(**meta["model_config"]))
    ckpt.load_model_state(model, weights)
    optimizer = build_optimizer(model.named_parameters(), cfg.optim, total_steps=cfg.train.steps)
    optimizer.load_state_dict(state["optimizer"])
    return model, optimizer


def _make_sharded(run: Path) -> None:
    """Turn every checkpoint of a run into the form an FSDP run writes: the model and optimizer as DCP shards
    (``dcp/.metadata``, ``dcp/__0_0.distcp``), no optimizer in state.pt."""
    for path in _checkpoints(run):
        model, optimizer = _model_and_optimizer(path)
        save_sharded(model, optimizer, path / "dcp")
        state = torch.load(path / "state.pt", weights_only=True)
        state["optimizer"] = None
        torch.save(state, path / "state.pt")
        _reseal(path)


def _old_style(run: Path) -> None:
    """Checkpoints as lmsprint wrote them before they held a tokenizer or named their optimizer (and before runs
    kept a best/ checkpoint)."""
    shutil.rmtree(run / "checkpoints" / "best")
    for path in _checkpoints(run):
        (path / ckpt.TOKENIZER).unlink()
        state = torch.load(path / "state.pt", weights_only=True)
        del state["optimizer_name"]
        torch.save(state, path / "state.pt")
        _reseal(path)


# ----------------------------------------------------------------------------------------------------------
# nothing in a run directory runs code


class Payload:
    """Unpickled, it creates the marker file (a stand-in for any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _pickle(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def _torch_pickle(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"optimizer": Payload(marker)}, buf)
    return buf.getvalue()


def _dcp_with_payload(path: Path, marker: Path) -> None:
    """The checkpoint in the sharded form, its DCP files valid but an optimizer hyperparameter (a non-tensor value,
    which DCP pickles) the payload."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, optimizer = _model_and_optimizer(path)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    state["optim"]["param_groups"][0]["lr"] = Payload(marker)
    dcp.save(state, checkpoint_id=str(path / "dcp"))
    saved = torch.load(path / "state.pt", weights_only=True)
    saved["optimizer"] = None
    torch.save(saved, path / "state.pt")


# (file of the run, what it becomes, meta.json rewritten to vouch for it, the run is sharded)
PLANTS = {
    "dcp-metadata-unlisted": ("dcp/.metadata", _pickle, False, False),  # the case: a dcp/ folder planted
    "dcp-metadata": ("dcp/.metadata", _pickle, True, True),
    "dcp-shard-value": ("dcp", _dcp_with_payload, True, False),
    "state": ("state.pt", _torch_pickle, True, False),
    "state-raw-pickle": ("state.pt", _pickle, True, False),
    "weights": ("model.safetensors", _pickle, True, False),
    "meta": ("meta.json", _pickle, False, False),
    "checkpoint-tokenizer": ("tokenizer.json", _pickle, True, False),
    "run-tokenizer": ("../../tokenizer.json", _pickle, False, False),
    "config": ("../../config.toml", _pickle, False, False),
    "metrics": ("../../metrics.jsonl", _pickle, False, False),
}


def _plant(run: Path, name: str, marker: Path) -> None:
    rel, payload, reseal, sharded = PLANTS[name]
    if sharded:
        _make_sharded(run)
    for path in _checkpoints(run):  # every checkpoint: falling back to an older one meets a payload too
        if payload is _dcp_with_payload:
            payload(path, marker)
        else:
            (path / rel).parent.mkdir(exist_ok=True)
            (path / rel).write_bytes(payload(marker))
        if reseal:
            _reseal(path)


def _assert_inert(proc: subprocess.CompletedProcess, marker: Path) -> None:
    assert not marker.exists(), f"the payload ran: {proc.args}"
    assert "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("warning: ")]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_payloads_planted_in_a_run_never_run(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             plant: str) -> None:
    marker = tmp_path / "PWNED"
    _plant(run, plant, marker)
    for args in (("train", "--resume", "good", "--train.steps=4", "--sample=0"),
                 ("sample", "good", "--tokens", "2"), ("export", "good", "--out", "hf")):
        _assert_inert(_cli(*args, capsys=capsys), marker)
        shutil.rmtree(tmp_path / "hf", ignore_errors=True)


def test_payloads_in_every_file_at_once_never_run(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "PWNED"
    _make_sharded(run)
    for f in [f for f in run.rglob("*") if f.is_file()]:
        f.write_bytes(_pickle(marker))
    for args in (("train", "--resume", "good", "--sample=0"), ("sample", "good"), ("export", "good", "--out", "hf")):
        proc = _cli(*args, capsys=capsys)
        _assert_inert(proc, marker)
        assert proc.returncode == 2


def test_a_sharded_checkpoint_still_resumes(run: Path, capsys: pytest.CaptureFixture) -> None:
    """The safe DCP reader reads what DCP writes: model and optimizer state, every hyperparameter."""
    want = _model_and_optimizer(_checkpoints(run)[-1])[1].state_dict()
    _make_sharded(run)
    assert ckpt.is_sharded(ckpt.verify(_checkpoints(run)[-1]))
    trainer = Trainer(resume_config(run, ["--train.steps=6"]), run, resume=True)
    got = trainer.optimizer.state_dict()
    assert trainer.state.step == 4 and sorted(got["state"]) == sorted(want["state"])
    for i, entry in want["state"].items():
        for k, v in entry.items():
            assert torch.equal(got["state"][i][k], v) if isinstance(v, torch.Tensor) else got["state"][i][k] == v
    settings = [[{k: v for k, v in g.items() if k not in ("params", "lr")} for g in sd["param_groups"]]
                for sd in (got, want)]
    assert settings[0] == settings[1]


def test_a_planted_dcp_folder_is_never_read(run: Path) -> None:
    """Only what meta.json lists is read: a dcp/ folder it does not list leaves the checkpoint whole-weight."""
    (_checkpoints(run)[-1] / "dcp").mkdir()
    (_checkpoints(run)[-1] / "dcp" / ".metadata").write_bytes(b"not even a pickle")
    trainer = Trainer(resume_config(run, ["--train.steps=6"]), run, resume=True)
    assert trainer.state.step == 4 and trainer.optimizer.state


def _sample(run: Path, capsys: pytest.CaptureFixture, *prompt: str) -> subprocess.CompletedProcess:
    return _cli("sample", str(run), "--tokens", "8", *prompt, capsys=capsys)


@pytest.mark.parametrize("damage", ["flipped-byte", "larger-tokenizer"])
def test_the_checkpoint_copy_of_the_tokenizer_is_the_one_that_counts(run: Path, capsys: pytest.CaptureFixture,
                                                                     damage: str) -> None:
    prompt = ("--prompt", "the quick brown fox jumps over the lazy dog")
    intact = _sample(run, capsys, *prompt)
    assert intact.returncode == 0
    tok = run / "tokenizer.json"
    if damage == "flipped-byte":
        raw = bytearray(tok.read_bytes())
        raw[100] ^= 1
        tok.write_bytes(bytes(raw))
    else:
        from lmsprint.data.tokenizer import train_bpe

        train_bpe(iter(make_docs(200) * 3), vocab_size=600).save(tok)
    for _ in range(2):  # sample and export use the checkpoint's copy: the same text as before the damage
        assert _sample(run, capsys, *prompt).stdout == intact.stdout
    assert _cli("export", "good", "--out", "hf", capsys=capsys).returncode == 0
    proc = _cli("train", "--resume", "good", "--train.steps=6", "--sample=0", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert "tokenizer.json is not the tokenizer the run was trained with" in proc.stdout
    assert tok.read_bytes() == (_checkpoints(run)[-1] / ckpt.TOKENIZER).read_bytes()  # restored


def test_an_older_checkpoint_without_a_tokenizer_copy_is_checked_against_the_model(
        run: Path, capsys: pytest.CaptureFixture) -> None:
    _old_style(run)
    assert _sample(run, capsys).returncode == 0
    from lmsprint.data.tokenizer import train_bpe

    train_bpe(iter(make_docs(200) * 3), vocab_size=600).save(run / "tokenizer.json")
    for proc in (_sample(run, capsys, "--prompt", "the quick brown fox"),
                 _cli("export", "good", "--out", "hf", capsys=capsys)):
        assert_clean_error(proc, "tokens but the model was trained on 257; the run directory is inconsistent")


def _claim(run: Path, **shape: int) -> None:
    """meta.json of every checkpoint (best/ too) claims another model shape (its own checksum recomputed)."""
    for path in [*_checkpoints(run), run / "checkpoints" / "best"]:
        meta = json.loads((path / "meta.json").read_text())
        meta["model_config"].update(shape)
        meta["meta_sha256"] = ckpt._meta_digest(meta)
        (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(("shape", "message"), [
    ({"n_embd": 2**17, "n_head": 2**10}, "meta.json describes another model than model.safetensors holds"),  # 800 GB
    ({"n_layer": 10**6}, "meta.json describes another model than model.safetensors holds (1000000 layers)"),
    ({"n_head": 0}, "meta.json describes another model than model.safetensors holds (no model has its shape)"),
    ({"block_size": 10**13}, "rotary tables alone"),
])
def test_a_meta_json_claiming_another_model_is_refused_before_it_is_built(
        run: Path, capsys: pytest.CaptureFixture, shape: dict, message: str) -> None:
    _claim(run, **shape)
    for args in (("sample", "good"), ("export", "good", "--out", "hf")):
        assert_clean_error(_cli(*args, capsys=capsys), "no valid checkpoint under good: 2 fail their checksums")
    for path in _checkpoints(run):
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ckpt.verify(path)


# ----------------------------------------------------------------------------------------------------------
# one owner per run

HOLD = ("import sys, time; from pathlib import Path; from lmsprint.training.lock import RunLock; "
        "lock = RunLock.acquire(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")


def _holder(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_held_run_is_refused_naming_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    proc = _holder(run)
    try:
        with pytest.raises(CheckpointError) as e:
            RunLock.acquire(run)
        message = str(e.value)
        assert f"run directory {run} is in use by process {proc.pid} on host {socket.gethostname()}" in message
        assert "one process trains a run at a time" in message and "\n" not in message
    finally:
        proc.kill()  # a crash: the lock file stays, naming a dead process
        proc.wait()
    assert json.loads((run / LOCK).read_text())["pid"] == proc.pid
    with RunLock.acquire(run) as lock:
        assert lock is not None and json.loads((run / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(CheckpointError, match=f"in use by process {os.getpid()}"):
            RunLock.acquire(run)  # the same process twice (two in-process runs) is refused as well
    assert not (run / LOCK).exists()  # released: nothing left behind


def test_without_flock_the_holders_pid_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmsprint.training import lock as L

    monkeypatch.setattr(L, "fcntl", None)
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))
    with pytest.raises(CheckpointError, match=f"in use by process {os.getpid()}"):
        RunLock.acquire(run)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    RunLock.acquire(run).release()  # a stale lock of this host: taken over
    (run / LOCK).write_text(json.dumps({"pid": dead.pid, "host": "another-host", "since": "then"}))
    with pytest.raises(CheckpointError, match="on host another-host"):
        RunLock.acquire(run)  # another host's process cannot be checked: it holds the run


def test_two_resumes_of_one_run_the_second_is_refused(run: Path, tmp_path: Path) -> None:
    env = {"LMSPRINT_CACHE": os.environ["LMSPRINT_CACHE"]}
    first = subprocess.Popen([sys.executable, "-m", "lmsprint", "train", "--resume", "good", "--train.steps=100000",
                              "--train.log_every=1000", "--sample=0"], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **env},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(r.get("event") == "resume"
                                                 for r in read_metrics(run / "metrics.jsonl")):
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        second = run_cli("train", "--resume", "good", "--train.steps=100000", cwd=tmp_path, env_extra=env)
        assert_clean_error(second, f"run directory good is in use by process {first.pid} on host")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143
    assert not (run / LOCK).exists()
    resumes = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [4]  # one process trained it


def test_only_rank_0_takes_the_lock(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun every rank calls train(); rank 0 owns the run (the others would be refused by it)."""
    from lmsprint.training import run as T

    taken = []
    monkeypatch.setattr(T.RunLock, "acquire", classmethod(lambda cls, path, create: taken.append(path)))
    monkeypatch.setattr(T.D, "launch_rank", lambda: 1)
    train(resume_config(run, []), run_dir=run, resume=True)
    monkeypatch.setattr(T.D, "launch_rank", lambda: 0)
    train(resume_config(run, []), run_dir=run, resume=True)
    assert taken == [run]


# ----------------------------------------------------------------------------------------------------------
# honest resume


def _lrs(run: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


def test_resume_with_a_new_lr_trains_on_it(tmp_path: Path, corpus: Path) -> None:
    """--optim.lr given with --resume is the peak from then on: the lrs of steps 5-8 are those of a run that had
    that peak from the start, and config.toml says so."""
    new = tiny_config(corpus, train__steps=8, optim__lr=0.03)
    train(new, run_dir=tmp_path / "reference")
    train(tiny_config(corpus, train__steps=8, train__stop_at_step=4), run_dir=tmp_path / "run")
    assert _lrs(tmp_path / "run")[4] == pytest.approx(_lrs(tmp_path / "reference")[4] / 10)
    train(resume_config(tmp_path / "run", ["--optim.lr=0.03", "--train.stop_at_step=none"]), run_dir=tmp_path / "run",
          resume=True)
    got, want = _lrs(tmp_path / "run"), _lrs(tmp_path / "reference")
    assert [got[s] for s in range(5, 9)] == pytest.approx([want[s] for s in range(5, 9)], rel=1e-12)
    assert resume_config(tmp_path / "run", []).optim.lr == 0.03


def test_a_rollback_behind_the_resume_keeps_the_new_lr(tmp_path: Path, corpus: Path) -> None:
    """A spike after a resume with a new --optim.lr rolls back to the checkpoint written before it: the run goes
    on with the new peak, not the one that checkpoint's optimizer state brings back."""
    from lmsprint.training.trainer import Callback

    kw = dict(train__steps=10, train__ckpt_every=4, guard__spike_factor=3, guard__spike_warmup=2)
    train(tiny_config(corpus, optim__lr=0.03, **kw), run_dir=tmp_path / "reference")
    train(tiny_config(corpus, train__stop_at_step=4, **kw), run_dir=tmp_path / "run")

    class Spike(Callback):
        done = False

        def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
            if step == 6 and not self.done:
                self.done = True
                return loss * 100
            return loss

    trainer = Trainer(resume_config(tmp_path / "run", ["--optim.lr=0.03", "--train.stop_at_step=none"]),
                      tmp_path / "run", resume=True, callbacks=[Spike()])
    assert trainer.run().rollbacks == 1
    rollback = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "rollback"]
    assert [r["step"] for r in rollback] == [4]
    got, want = _lrs(tmp_path / "run"), _lrs(tmp_path / "reference")
    assert [got[s] for s in range(5, 11)] == pytest.approx([want[s] for s in range(5, 11)], rel=1e-12)


def test_resume_with_unchanged_settings_keeps_the_saved_peaks_bit_for_bit(tmp_path: Path, corpus: Path) -> None:
    straight = train(tiny_config(corpus, train__steps=8), run_dir=tmp_path / "straight")
    train(tiny_config(corpus, train__steps=8, train__stop_at_step=4), run_dir=tmp_path / "run")
    resumed = train(resume_config(tmp_path / "run", ["--train.stop_at_step=none"]), run_dir=tmp_path / "run",
                    resume=True)
    assert _lrs(tmp_path / "run") == _lrs(tmp_path / "straight")
    assert resumed.val_loss == straight.val_loss


@pytest.mark.parametrize("optimizer", ["muon", "soap", "lion", "ademamix"])
def test_changing_the_optimizer_on_resume_is_refused_and_writes_nothing(run: Path, capsys: pytest.CaptureFixture,
                                                                       optimizer: str) -> None:
    before = _snapshot(run)
    proc = _cli("train", "--resume", "good", f"--optim.name={optimizer}", "--train.steps=6", capsys=capsys)
    assert_clean_error(proc, f"resume cannot change --optim.name (adamw -> {optimizer}): the checkpoint holds "
                             "adamw's state; pass --resume-fresh-optimizer")
    assert _snapshot(run) == before


def test_resume_fresh_optimizer_switches_the_optimizer(run: Path, capsys: pytest.CaptureFixture) -> None:
    proc = _cli("train", "--resume", "good", "--optim.name=muon", "--resume-fresh-optimizer", "--train.steps=6",
                "--sample=0", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert "with a fresh optimizer state" in proc.stdout
    assert resume_config(run, []).optim.name == "muon"
    event = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "resume"][-1]
    assert event["step"] == 4 and event["fresh_optimizer"] is True
    state = ckpt.load_checkpoint(_checkpoints(run)[-1])[2]
    assert state["optimizer_name"] == "muon" and any(g.get("use_muon") for g in state["optimizer"]["param_groups"])
    # from now on the run is a Muon run: a plain resume continues it, going back to AdamW is refused
    assert _cli("train", "--resume", "good", "--train.steps=8", "--sample=0", capsys=capsys).returncode == 0
    assert_clean_error(_cli("train", "--resume", "good", "--optim.name=adamw", capsys=capsys),
                       "resume cannot change --optim.name (muon -> adamw)")


def test_a_fresh_optimizer_resume_that_died_before_its_first_checkpoint(run: Path) -> None:
    """config.toml says muon, the checkpoint holds AdamW's state: a plain resume refuses to load one into the other
    (and says how to go on)."""
    Trainer(resume_config(run, ["--optim.name=muon"], fresh_optimizer=True), run, resume=True, fresh_optimizer=True)
    assert resume_config(run, []).optim.name == "muon"  # then killed, before it checkpointed
    with pytest.raises(CheckpointError, match=r"holds the state of another optimizer \(adamw\) than this run's "
                                              r"\(muon\); .* --resume-fresh-optimizer"):
        Trainer(resume_config(run, []), run, resume=True)


def test_an_older_checkpoint_of_another_optimizer_is_told_by_its_groups(run: Path) -> None:
    _old_style(run)
    (run / "config.toml").write_text((run / "config.toml").read_text().replace('name = "adamw"', 'name = "lion"'))
    with pytest.raises(CheckpointError, match=r"holds the state of another optimizer \(one with other settings\)"):
        Trainer(resume_config(run, []), run, resume=True)


@pytest.mark.parametrize(("args", "message"), [
    (("--config", "nosuch.toml"), "--config does not apply to --resume"),
    (("--config", "fast"), "--config does not apply to --resume"),
    (("--train.seed=7",), "resume cannot change --train.seed"),
    (("--train.run_name=other",), "resume cannot change --train.run_name: the run stays in good"),
    (("--train.out_dir=elsewhere",), "resume cannot change --train.out_dir"),
    (("--train.steps=3",), "the run is at step 4 already, past the 3 steps"),
    (("--train.steps=3", "--log.tensorboard=true"), "the run is at step 4 already"),  # no event file either
    (("--train.stop_at_step=4",), "--train.stop_at_step=4 is not after the step the run is at (4)"),
    (("--optim.name=soap", "--resume-fresh-optimizer", "--optim.max_precond_dim=8", "--train.steps=3"),
     "the run is at step 4 already"),
    (("--data.tokenizer=bpe", "--data.vocab_size=300"), "is tokenized with another tokenizer"),
])
def test_refused_resumes_write_nothing(run: Path, capsys: pytest.CaptureFixture, args: tuple[str, ...],
                                       message: str) -> None:
    before = _snapshot(run)
    assert_clean_error(_cli("train", "--resume", "good", *args, capsys=capsys), message)
    assert _snapshot(run) == before


def test_resume_fresh_optimizer_needs_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert_clean_error(_cli("train", "--resume-fresh-optimizer", capsys=capsys), "applies to --resume RUN_DIR")


@pytest.mark.parametrize("old", [False, True])
def test_a_failed_resume_writes_no_tokenizer(run: Path, capsys: pytest.CaptureFixture, old: bool) -> None:
    """The issue's case: the run's tokenizer.json removed, --data.tokenizer=bpe given: refused, and no
    tokenizer.json written (sample would print garbage with it); the checkpoint's copy is untouched."""
    if old:
        _old_style(run)
    (run / "tokenizer.json").unlink()
    before = _snapshot(run)
    proc = _cli("train", "--resume", "good", "--data.tokenizer=bpe", "--data.vocab_size=300", capsys=capsys)
    assert_clean_error(proc, "holds a different model shape" if old else "tokenized with another tokenizer")
    assert _snapshot(run) == before
    if not old:  # and a plain resume brings the run's tokenizer.json back, from its checkpoint
        assert _cli("train", "--resume", "good", "--train.steps=6", "--sample=0", capsys=capsys).returncode == 0
        assert (run / "tokenizer.json").read_bytes() == (_checkpoints(run)[-1] / ckpt.TOKENIZER).read_bytes()


# ----------------------------------------------------------------------------------------------------------
# data that cannot make the run's rows or a validation loss


def test_a_sequence_longer_than_the_corpus_fails_at_once(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    proc = _cli("train", str(corpus), "--data.tokenizer=byte", "--data.seq_len=1000000", "--train.device=cpu",
                "--log.progress=false", "--sample=0", capsys=capsys)
    assert_clean_error(proc, "--data.seq_len=1,000,000 is not shorter than the training data (")
    assert not (tmp_path / "runs").exists()


def test_a_validation_set_without_targets_is_refused() -> None:
    from types import SimpleNamespace

    from lmsprint.config import build_config
    from lmsprint.training import batches as B

    cfg = build_config(None, ["--data.seq_len=8"])
    tokens = SimpleNamespace(n_tokens=100)
    B.check_streams(cfg, tokens, SimpleNamespace(n_tokens=2))  # one target: fine
    with pytest.raises(DataError, match="the validation data holds 1 token"):
        B.check_streams(cfg, tokens, SimpleNamespace(n_tokens=1))
    with pytest.raises(DataError, match="is not shorter than the training data"):
        B.check_streams(cfg, SimpleNamespace(n_tokens=8), SimpleNamespace(n_tokens=100))
    B.check_streams(build_config(None, ["--data.seq_len=8", "--data.batching=pad"]), SimpleNamespace(n_tokens=8),
                    SimpleNamespace(n_tokens=100))  # padded rows are as long as their documents
