"""Random restarts: ranking, continuation equal to an uninterrupted run, successive halving, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_cli, tiny_config

from lmsprint.errors import ConfigError
from lmsprint.restarts import RestartRun, restarts, train_command
from lmsprint.training.metrics import read_metrics
from lmsprint.training.run import train

SWEEP = {"train__steps": 12, "train__eval_every": 4, "train__ckpt_every": 4}


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def test_restarts_continue_the_best_probe_exactly(tmp_path: Path, corpus: Path) -> None:
    cfg = tiny_config(corpus, **SWEEP)
    result = restarts(cfg, n=3, keep=1, probe_steps=4, out_dir=tmp_path / "sweep", gpus=[], log=lambda s: None)

    assert result.budgets == [4, 12]
    best = min(result.runs, key=lambda r: r.val[4])
    assert result.winner is best and result.winner_dir == tmp_path / "sweep" / f"seed-{best.seed}"
    assert sorted(r.seed for r in result.runs) == [1337, 1338, 1339]
    for r in result.runs:
        assert r.continued == (r is best) and sorted(r.val) == ([4, 12] if r is best else [4])
    for name in ("restarts.md", "restarts.png", "restarts.json"):
        assert (tmp_path / "sweep" / name).exists(), name
    summary = json.loads((tmp_path / "sweep" / "restarts.json").read_text())
    assert summary["winner"] == best.seed and summary["budgets"] == [4, 12]
    assert "**winner**" in (tmp_path / "sweep" / "restarts.md").read_text()

    # the continued probe is exactly an uninterrupted run of its seed: the schedule spanned 12 steps from the start
    plain = train(tiny_config(corpus, train__seed=best.seed, **SWEEP), run_dir=tmp_path / "plain")
    a, b = train_losses(best.run_dir), train_losses(plain.run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    assert abs(best.val[12] - plain.val_loss) <= 1e-6

    # the winner is an ordinary run directory
    from lmsprint.sample import sample

    assert isinstance(sample(best.run_dir, prompt="the", max_new_tokens=4)[0], str)


def test_a_probe_with_a_non_finite_loss_ranks_last(tmp_path: Path, corpus: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN compares false with everything: a diverged seed must fail, not come out of the sort as the best."""
    import lmsprint.restarts as R

    read_curve = R._read_curve

    def nan_for_1337(run: RestartRun) -> list[tuple[int, float]]:
        return [(s, float("nan") if run.seed == 1337 else v) for s, v in read_curve(run)]

    monkeypatch.setattr(R, "_read_curve", nan_for_1337)
    result = restarts(tiny_config(corpus, **SWEEP), n=3, keep=1, probe_steps=4, out_dir=tmp_path / "sweep", gpus=[],
                      log=lambda s: None)
    diverged = next(r for r in result.runs if r.seed == 1337)
    assert diverged.error == "non-finite validation loss (nan) at step 4" and not diverged.continued
    assert result.winner is not None and result.winner.seed != 1337 and math.isfinite(result.winner.val[12])
    assert result.table.splitlines()[-1].startswith("| 3 | 1337 |")


def test_successive_halving(tmp_path: Path, corpus: Path) -> None:
    cfg = tiny_config(corpus, train__steps=8, train__eval_every=2, train__ckpt_every=0)
    result = restarts(cfg, n=4, keep=1, probe_steps=2, halving=True, out_dir=tmp_path / "sh", gpus=[],
                      log=lambda s: None)
    assert result.budgets == [2, 4, 8]
    by_probe = sorted(result.runs, key=lambda r: r.val[2])
    assert {r.seed for r in result.runs if 4 in r.val} == {r.seed for r in by_probe[:2]}  # the better half
    second = sorted((r for r in result.runs if 4 in r.val), key=lambda r: r.val[4])
    assert result.winner is second[0] and [r for r in result.runs if r.continued] == [second[0]]
    table = result.table.splitlines()
    assert table[0] == "| rank | seed | val @ 2 | val @ 4 | val @ 8 | status |"
    assert f"| 1 | {second[0].seed} |" in table[2] and "**winner**" in table[2]


def test_successive_halving_continues_only_keep_to_the_full_budget(tmp_path: Path, corpus: Path) -> None:
    """Doubling the probe reaches the full budget while two runs are left: only the best --keep=1 trains on."""
    cfg = tiny_config(corpus, train__steps=6, train__eval_every=3, train__ckpt_every=0)
    result = restarts(cfg, n=4, keep=1, probe_steps=3, halving=True, out_dir=tmp_path / "sh", gpus=[],
                      log=lambda s: None)
    assert result.budgets == [3, 6]
    best = min(result.runs, key=lambda r: r.val[3])
    assert [r for r in result.runs if r.continued] == [best] and result.winner is best
    assert [r.seed for r in result.runs if 6 in r.val] == [best.seed]


def test_restarts_bad_arguments(tmp_path: Path, corpus: Path) -> None:
    cfg = tiny_config(corpus, **SWEEP)
    with pytest.raises(ConfigError, match="--probe-steps"):
        restarts(cfg, n=2, probe_steps=12, out_dir=tmp_path / "a", gpus=[])
    with pytest.raises(ConfigError, match="not both"):
        restarts(cfg, n=2, probe_steps=2, probe_fraction=0.5, out_dir=tmp_path / "a", gpus=[])
    with pytest.raises(ConfigError, match="--keep"):
        restarts(cfg, n=2, keep=3, probe_steps=2, out_dir=tmp_path / "a", gpus=[])
    (tmp_path / "b" / "seed-1338").mkdir(parents=True)
    (tmp_path / "b" / "seed-1338" / "config.toml").write_text("")
    with pytest.raises(ConfigError, match="seed-1338"):
        restarts(cfg, n=2, probe_steps=2, out_dir=tmp_path / "b", gpus=[])


def test_gpu_ids_count_the_gpus_this_process_sees(tmp_path: Path, corpus: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CUDA_VISIBLE_DEVICES=4,5 GPU 1 is physical GPU 5; ids that are not visible are a clean error."""
    import torch

    import lmsprint.restarts as rs

    envs: list[dict[str, str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        envs.append(kwargs["env"])  # type: ignore[arg-type]
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(rs.subprocess, "run", fake_run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    run = RestartRun(7, tmp_path / "out" / "seed-7")
    rs._subprocess(tmp_path / "base.toml", run, 2, True, gpu=1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    rs._subprocess(tmp_path / "base.toml", run, 2, True, gpu=1)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["5", "1"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = tiny_config(corpus, train__device="auto", **SWEEP)
    for gpus in ([0, 2], [-1]):
        with pytest.raises(ConfigError, match="CUDA GPUs are visible"):
            restarts(cfg, n=2, probe_steps=2, out_dir=tmp_path / "g", gpus=gpus)
    assert not (tmp_path / "g").exists()


def test_cli_restarts_bad_input_is_one_line(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "a-file").write_text("")
    for args, message in ((["--n=2", "--keep=3"], "--keep"), (["--n=2", "--out=a-file"], "a-file")):
        proc = run_cli("restarts", str(corpus), "--train.device=cpu", "--data.tokenizer=byte", "--train.steps=4",
                       *args, cwd=tmp_path)
        assert_clean_error(proc, message)


def test_train_command() -> None:
    run = RestartRun(7, Path("out/seed-7"))
    first = train_command(Path("out/base.toml"), run, 4, first=True)
    assert first[1:4] == ["-m", "lmsprint", "train"]
    assert {"--config", "out/base.toml", "--train.seed=7", "--train.out_dir=out", "--train.run_name=seed-7",
            "--train.stop_at_step=4", "--sample=0"} <= set(first)
    assert "--resume" not in first
    cont = train_command(Path("out/base.toml"), run, None, first=False)
    assert cont[4:6] == ["--resume", "out/seed-7"] and "--train.stop_at_step=none" in cont
    assert "--config" not in cont and not any(a.startswith("--train.seed") for a in cont)


def test_cli_restarts_in_parallel_subprocesses(tmp_path: Path, corpus: Path) -> None:
    """`lmsprint restarts` with --gpus 0,1: each run a `python -m lmsprint train` subprocess (on CPU here)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    tiny = ["--data.tokenizer=byte", "--model.n_layer=1", "--model.n_embd=16", "--model.n_head=2",
            "--train.steps=4", "--log.progress=false", "--log.plot=false", "--train.device=cpu",
            "--data.seq_len=16", "--train.batch_size=2", "--train.eval_tokens=128"]
    proc = subprocess.run([sys.executable, "-m", "lmsprint", "restarts", str(corpus), *tiny, "--n=2", "--keep=1",
                           "--probe-steps=2", "--gpus=0,1", "--out=sweep"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| rank | seed | val @ 2 | val @ 4 | status |" in proc.stdout and "winner: " in proc.stdout
    out = tmp_path / "sweep"
    summary = json.loads((out / "restarts.json").read_text())
    winner = tmp_path / summary["winner_dir"]  # as given: relative to the working directory
    assert (winner / "checkpoints" / "step_00000004").is_dir()
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["seed-1337.log", "seed-1338.log"]
    assert (out / "restarts.md").exists() and (out / "restarts.png").exists()
