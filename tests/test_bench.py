"""The time-to-target benchmark on CPU: tiny recipes, tiny target."""

import json
import math
from pathlib import Path

import pytest

from lmsprint import bench as B
from lmsprint.config import RunConfig, to_toml
from lmsprint.training import trainer as T

TINY = {
    "data": {"tokenizer": "byte", "seq_len": 32, "val_fraction": 0.1},
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32},
    "train": {"batch_size": 4, "steps": 12, "eval_every": 3, "eval_tokens": 256, "log_every": 3, "ckpt_every": 0,
              "device": "cpu"},
    "log": {"progress": False, "plot": False},
}


def recipe(tmp_path: Path, name: str, lr: float) -> str:
    cfg = RunConfig.from_dict(TINY)
    cfg.optim.lr = lr
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(cfg))
    return str(path)


def test_measure_interpolates_the_crossing() -> None:
    run = B.BenchRun("r", 0, "", 1.0, 10.0, 0.0, 40, 4000, 1.0, None, 1,
                     val=[{"step": 10, "tokens": 1000, "time": 2.0, "loss": 3.0},
                          {"step": 20, "tokens": 2000, "time": 4.0, "loss": 2.0},
                          {"step": 30, "tokens": 3000, "time": 6.0, "loss": 1.0}])
    run.measure(1.5)
    assert run.to_target == {"time": 5.0, "tokens": 2500.0, "step": 25.0}
    run.measure(0.5)
    assert run.to_target["time"] is None
    rows = B.summarize([run], 0.5)
    assert math.isnan(rows[0]["time"][0])
    assert "not reached" in B.table(rows, 0.5)


def test_to_target_columns_need_every_seed_to_reach_it() -> None:
    """One seed of two reaches the target: no time, tokens or steps to target (a mean over the seed that got
    there would flatter the recipe); the table says how many did."""
    val = [{"step": 10, "tokens": 1000, "time": 2.0, "loss": 3.0}, {"step": 20, "tokens": 2000, "time": 4.0,
                                                                     "loss": 1.0}]
    runs = [B.BenchRun("r", seed, "", 1.0, 10.0, 0.0, 40, 4000, 1.0, None, 1, val=[dict(v) for v in val])
            for seed in (0, 1)]
    runs[1].val[-1]["loss"] = 2.5
    for r in runs:
        r.measure(2.0)
    (row,) = B.summarize(runs, 2.0)
    assert row["reached"] == 1 and all(math.isnan(row[k][0]) for k in ("time", "tokens", "steps"))
    assert "| r | 2 | 1/2 seeds reached |" in B.table([row], 2.0)


def test_bench_runs_recipes_and_reports(tmp_path: Path, corpus: Path) -> None:
    slow, fast = recipe(tmp_path, "slow", 1e-4), recipe(tmp_path, "quick", 3e-3)
    out = tmp_path / "bench"
    result = B.bench([slow, fast], seeds=[0, 1], overrides=[f"--data.source={corpus}"], out_dir=out)
    runs = result["runs"]
    assert [(r.name, r.seed) for r in runs] == [("slow", 0), ("slow", 1), ("quick", 0), ("quick", 1)]
    # auto target: the reference recipe's mean final loss, which the faster recipe reaches sooner
    assert result["target"] == pytest.approx(sum(r.final_loss for r in runs[:2]) / 2)
    quick = [r for r in runs if r.name == "quick"]
    assert all(r.to_target["time"] is not None for r in quick)
    for name in ("bench.md", "bench.json", "bench.png"):
        assert (out / name).exists()
    data = json.loads((out / "bench.json").read_text())
    assert len(data["runs"]) == 4 and "quick" in (out / "bench.md").read_text()


def test_evaluation_time_is_excluded(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock jumps 1000 s inside every evaluation; the measured training time never sees it."""
    clock = [0.0]

    def fake_perf_counter() -> float:
        clock[0] += 1e-3
        return clock[0]

    evaluate = T.Trainer.evaluate

    def slow_evaluate(self: T.Trainer) -> float:
        clock[0] += 1000.0
        return evaluate(self)

    monkeypatch.setattr(T.time, "perf_counter", fake_perf_counter)
    monkeypatch.setattr(T.Trainer, "evaluate", slow_evaluate)
    run = B.run_one("r", recipe(tmp_path, "r", 1e-3), 0, overrides=[f"--data.source={corpus}"], out_dir=tmp_path)
    assert len(run.val) == 4
    assert run.train_time < 1.0  # 12 steps of fake milliseconds, none of the 4000 s spent evaluating
    assert all(v["time"] < 1.0 for v in run.val)


def test_stop_at_target_and_ablations(tmp_path: Path, corpus: Path) -> None:
    r = recipe(tmp_path, "r", 3e-3)
    run = B.run_one("r", r, 0, overrides=[f"--data.source={corpus}"], out_dir=tmp_path, stop_at=100.0)
    assert run.steps == 3  # stopped at the first evaluation, already under the (easy) target
    changed = B.ABLATIONS["architecture (rope/rmsnorm/swiglu -> GPT-2's)"]
    assert any("pos_emb=learned" in o for o in changed)
