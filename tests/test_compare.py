"""Comparing runs (crossing points, the table, the figure, the CLI) and TensorBoard logging."""

import json
from pathlib import Path

import pytest
from conftest import tiny_config

from lmsprint.cli import main
from lmsprint.compare import compare, crossing, default_target, load_run, load_runs, table
from lmsprint.errors import LmsprintError
from lmsprint.training.run import train


def test_crossing_interpolates_linearly() -> None:
    points = [(0.0, 5.0), (10.0, 4.0), (20.0, 2.0), (30.0, 1.0)]
    assert crossing(points, 3.0) == pytest.approx(15.0)  # halfway from 4.0 at x=10 to 2.0 at x=20
    assert crossing(points, 3.5) == pytest.approx(12.5)
    assert crossing(points, 2.0) == pytest.approx(20.0)  # reached exactly at an evaluation
    assert crossing(points, 1.0) == pytest.approx(30.0)


def test_crossing_at_the_first_point_and_never() -> None:
    points = [(100.0, 2.5), (200.0, 2.0)]
    assert crossing(points, 3.0) == 100.0  # already below at the first evaluation: no extrapolation before it
    assert crossing(points, 1.9) is None
    assert crossing([], 1.0) is None


def test_crossing_uses_the_first_crossing_and_skips_non_finite() -> None:
    assert crossing([(0, 4.0), (1, 2.0), (2, 5.0), (3, 1.0)], 3.0) == pytest.approx(0.5)  # not a later one
    assert crossing([(0, 4.0), (1, float("nan")), (2, 2.0)], 3.0) == pytest.approx(1.0)


def _write_metrics(run: Path, records: list[dict]) -> Path:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_table_from_synthetic_metrics(tmp_path: Path) -> None:
    a = _write_metrics(tmp_path / "a", [
        {"kind": "config", "step": 0},
        {"kind": "train", "step": 10, "loss": 5.0, "tokens": 1000, "time": 1.0, "tokens_per_s": 1000.0, "mfu": 0.2},
        {"kind": "val", "step": 10, "loss": 4.0, "tokens": 1000, "time": 1.0},
        {"kind": "train", "step": 20, "loss": 3.0, "tokens": 2000, "time": 2.0, "tokens_per_s": 3000.0, "mfu": 0.4},
        {"kind": "val", "step": 20, "loss": 2.0, "tokens": 2000, "time": 2.0},
        {"kind": "summary", "step": 20},
    ])
    b = _write_metrics(tmp_path / "b", [
        {"kind": "train", "step": 10, "loss": 4.0, "tokens": 500, "time": 4.0, "tokens_per_s": 125.0},
        {"kind": "val", "step": 10, "loss": 3.5, "tokens": 500, "time": 4.0},
        {"kind": "val", "step": 20, "loss": 3.0, "tokens": 1000, "time": 8.0},
        {"kind": "val", "step": 30, "loss": 3.2, "tokens": 1500, "time": 12.0},
    ])
    runs = load_runs([a, b])
    assert default_target(runs) == 3.2  # the worst final val loss
    rows = table(runs, 3.0).splitlines()
    assert rows[0] == "| run | final val loss | best val loss | time to 3.0000 | tokens to 3.0000 | tokens/s | MFU |"
    # a: 4.0 at (1s, 1000 tokens) -> 2.0 at (2s, 2000 tokens): 3.0 halfway; tokens/s and MFU are means
    assert rows[2] == "| a | 2.0000 | 2.0000 | 1.5s | 1.5k | 2k | 30.0% |"
    assert rows[3] == "| b | 3.2000 | 3.0000 | 8s | 1k | 125 | - |"
    assert "| b | 3.2000 | 3.0000 | - | - |" in table(runs, 2.5)


def test_superseded_records_are_dropped(tmp_path: Path) -> None:
    """A resumed run logs steps after its checkpoint twice: the later records win."""
    run = _write_metrics(tmp_path / "r", [
        {"kind": "train", "step": 1, "loss": 4.0, "tokens": 10, "time": 1.0},
        {"kind": "train", "step": 2, "loss": 3.0, "tokens": 20, "time": 2.0},
        {"kind": "val", "step": 2, "loss": 3.5, "tokens": 20, "time": 2.0},
        {"kind": "train", "step": 3, "loss": 9.0, "tokens": 30, "time": 3.0},  # crashed after this
        {"kind": "event", "event": "resume", "step": 2},
        {"kind": "train", "step": 3, "loss": 2.5, "tokens": 30, "time": 3.1},
        {"kind": "val", "step": 3, "loss": 2.4, "tokens": 30, "time": 3.1},
    ])
    r = load_run(run)
    assert [(x["step"], x["loss"]) for x in r.train] == [(1, 4.0), (2, 3.0), (3, 2.5)]
    assert r.val_points("step") == [(2, 3.5), (3, 2.4)]


BAD_LINES = {
    "loss-null": b'{"kind": "val", "step": 2, "loss": null, "tokens": 20, "time": 2.0}',
    "a-list": b"[1, 2]",
    "step-a-string": b'{"kind": "val", "step": "x", "loss": 1.0, "tokens": 20, "time": 2.0}',
    "not-utf8": b'{"kind": "val", "step": 2, "loss": 1.0, "note": "\xff\xfe"}',
    "tokens-a-string": b'{"kind": "val", "step": 2, "loss": 1.0, "tokens": "many", "time": 2.0}',
    "huge-integer": b"7" * 5000,
    "loss-beyond-float32": b'{"kind": "val", "step": 2, "loss": 1e308, "tokens": 20, "time": 2.0}',
    "step-beyond-int64": b'{"kind": "val", "step": 9223372036854775808, "loss": 1.0, "tokens": 20, "time": 2.0}',
}


@pytest.mark.parametrize("bad", sorted(BAD_LINES))
def test_compare_skips_a_malformed_metrics_line_with_one_warning(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 bad: str) -> None:
    run = tmp_path / "a"
    run.mkdir()
    good = [{"kind": "val", "step": s, "loss": loss, "tokens": 10 * s, "time": float(s)} for s, loss in ((1, 3.0),
                                                                                                         (3, 2.0))]
    (run / "metrics.jsonl").write_bytes(json.dumps(good[0]).encode() + b"\n" + BAD_LINES[bad] + b"\n" +
                                        json.dumps(good[1]).encode() + b"\n")
    with pytest.raises(SystemExit) as e:
        main(["compare", str(run), "--png", str(tmp_path / "c.png")])
    out, err = capsys.readouterr()
    assert e.value.code == 0 and (tmp_path / "c.png").exists()
    assert err.splitlines() == [f"warning: skipped 1 line of {run / 'metrics.jsonl'} that holds no metrics record "
                                "(line 2)"]
    assert "| a | 2.0000 | 2.0000 |" in out


@pytest.mark.filterwarnings("error")
def test_one_huge_loss_is_plotted_without_warnings(tmp_path: Path) -> None:
    """A single validation loss whose float cannot show a +-0.05 margin: the axis gets a margin it can show."""
    run = _write_metrics(tmp_path / "r", [{"kind": "val", "step": 1, "loss": 880270964658496.0, "tokens": 1,
                                           "time": 1.0}])
    compare([run], png=tmp_path / "c.png")
    assert (tmp_path / "c.png").exists()


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(LmsprintError, match="not a run directory"):
        load_run(tmp_path)


def test_compare_two_tiny_runs(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture) -> None:
    for name, lr in (("slow", 1e-3), ("quick", 1e-2)):
        cfg = tiny_config(corpus, train__steps=12, train__eval_every=4, train__ckpt_every=0, optim__lr=lr)
        train(cfg, run_dir=tmp_path / name)
    runs = [tmp_path / "slow", tmp_path / "quick"]
    png = tmp_path / "plots" / "compare.png"
    text = compare(runs, png=png)
    assert png.exists() and png.stat().st_size > 10_000
    lines = text.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| slow |") and lines[3].startswith("| quick |")
    target = default_target(load_runs(runs))
    assert f"time to {target:.4f}" in lines[0]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        # every run reaches the default target (the worst final loss); only MFU (none on CPU) is missing
        assert cells[-1] == "-" and "-" not in cells[:-1], line

    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *map(str, runs), "--png", str(tmp_path / "cli.png"), "--target", "100"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "time to 100.0000" in out and (tmp_path / "cli.png").exists()


def test_tensorboard_event_files(tmp_path: Path, corpus: Path) -> None:
    pytest.importorskip("tensorboard")
    cfg = tiny_config(corpus, train__steps=4, train__eval_every=2, train__ckpt_every=0, log__tensorboard="true")
    train(cfg, run_dir=tmp_path / "run")
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "val/loss" in tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_tensorboard_shows_replayed_steps_once(tmp_path: Path, corpus: Path) -> None:
    """Resumed from step 4 after steps 5-8 were logged: TensorBoard keeps the second attempt's 5-8 only."""
    pytest.importorskip("tensorboard")
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(corpus, train__steps=8, train__eval_every=0, train__ckpt_every=4, log__tensorboard="true")
    train(cfg, run_dir=tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000008")
    train(cfg, run_dir=tmp_path / "run", resume=True)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))


def test_a_directory_of_runs_stands_for_the_runs_inside(tmp_path: Path) -> None:
    """`lmsprint compare runs/*` with runs/bench (bench's --out, holding runs) among them."""
    rec = [{"kind": "val", "step": 10, "loss": 3.0, "tokens": 100, "time": 1.0}]
    a = _write_metrics(tmp_path / "a", rec)
    _write_metrics(tmp_path / "bench" / "baseline-s0", rec)
    _write_metrics(tmp_path / "bench" / "fast-s0", rec)
    (tmp_path / "bench" / "bench.md").write_text("report")
    assert [r.path for r in load_runs([a, tmp_path / "bench"])] == [
        a, tmp_path / "bench" / "baseline-s0", tmp_path / "bench" / "fast-s0"]
    with pytest.raises(LmsprintError, match="not a run directory"):
        load_runs([tmp_path / "bench" / "bench.md"])
