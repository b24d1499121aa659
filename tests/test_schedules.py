import math
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LambdaLR, LinearLR, SequentialLR

from lmsprint import schedules
from lmsprint.config import ScheduleConfig
from lmsprint.errors import ConfigError, LmsprintError
from lmsprint.optim.ademamix import ademamix_alpha, ademamix_beta3
from lmsprint.optim.muon import muon_momentum
from lmsprint.schedule_report import schedule_report
from lmsprint.schedules import (
    GroupSchedule,
    LRSchedule,
    build_schedule,
    lr_multiplier,
    resolve_schedule,
)

REL, ABS = 1e-6, 1e-12


def _sgd(*lrs: float) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)


def _lrs(opt: torch.optim.Optimizer, sched, steps: int) -> list[list[float]]:
    """The lr of every group at steps 0..steps (step s = after s scheduler steps)."""
    out = [[g["lr"] for g in opt.param_groups]]
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append([g["lr"] for g in opt.param_groups])
    return out


def _assert_close(ours: list[list[float]], ref: list[list[float]]) -> None:
    assert len(ours) == len(ref)
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert a == pytest.approx(b, rel=REL, abs=ABS), f"step {step}: {a} != {b}"


# ----------------------------------------------------------------------------------------------------------
# equivalence with torch's own schedulers


@pytest.mark.parametrize(
    ("total", "warmup", "start_factor", "peak", "eta_min"),
    [
        (100, 10, 0.1, 1e-2, 1e-4),  # the acceptance setting
        (100, 10, 0.1, 6e-4, 6e-5),  # nanoGPT's peak and floor: 6e-4 * (6e-5 / 6e-4) != 6e-5
        (100, 1, 0.5, 3e-3, 0.0),
        (200, 25, 0.01, 6e-4, 6e-5),
        (64, 63, 0.2, 1.0, 0.1),  # one decay step
    ],
)
def test_cosine_matches_sequential_lr(total: int, warmup: int, start_factor: float, peak: float, eta_min: float):
    ref_opt = _sgd(peak)
    ref = SequentialLR(
        ref_opt,
        [
            LinearLR(ref_opt, start_factor=start_factor, end_factor=1.0, total_iters=warmup),
            CosineAnnealingLR(ref_opt, T_max=total - warmup, eta_min=eta_min),
        ],
        milestones=[warmup],
    )
    opt = _sgd(peak)
    cfg = ScheduleConfig(name="cosine", warmup_steps=warmup, start_factor=start_factor, min_lr=eta_min)
    sched = build_schedule(opt, cfg, total_steps=total, peak_lr=peak)
    ours = _lrs(opt, sched, total)
    _assert_close(ours, _lrs(ref_opt, ref, total))
    assert ours[0][0] == pytest.approx(start_factor * peak, rel=1e-15)
    assert ours[total][0] == eta_min  # exactly the floor, not one ulp below


def test_cosine_without_warmup_matches_cosine_annealing():
    ref_opt, opt = _sgd(1e-3), _sgd(1e-3)
    ref = CosineAnnealingLR(ref_opt, T_max=50, eta_min=2e-5)
    sched = build_schedule(opt, ScheduleConfig(warmup_steps=0, min_lr=2e-5), total_steps=50, peak_lr=1e-3)
    _assert_close(_lrs(opt, sched, 50), _lrs(ref_opt, ref, 50))


@pytest.mark.parametrize(("total", "warmup", "start_factor", "min_ratio"), [(100, 10, 0.1, 0.1), (80, 5, 0.3, 0.0)])
def test_linear_matches_chained_linear_lr(total: int, warmup: int, start_factor: float, min_ratio: float):
    ref_opt = _sgd(1e-2)
    ref = SequentialLR(
        ref_opt,
        [
            LinearLR(ref_opt, start_factor=start_factor, end_factor=1.0, total_iters=warmup),
            LinearLR(ref_opt, start_factor=1.0, end_factor=min_ratio, total_iters=total - warmup),
        ],
        milestones=[warmup],
    )
    opt = _sgd(1e-2)
    cfg = ScheduleConfig(name="linear", warmup_steps=warmup, start_factor=start_factor, min_lr_ratio=min_ratio)
    sched = build_schedule(opt, cfg, total_steps=total, peak_lr=1e-2)
    _assert_close(_lrs(opt, sched, total), _lrs(ref_opt, ref, total))


def test_constant_matches_constant_lr_and_lambda_lr():
    total, warmup = 60, 7
    ref_opt = _sgd(2e-3)
    ref = SequentialLR(
        ref_opt,
        [
            LinearLR(ref_opt, start_factor=0.25, end_factor=1.0, total_iters=warmup),
            ConstantLR(ref_opt, factor=1.0, total_iters=total),
        ],
        milestones=[warmup],
    )
    lam_opt = _sgd(2e-3)
    lam = LambdaLR(lam_opt, lambda s: min(1.0, 0.25 + 0.75 * s / warmup))
    opt = _sgd(2e-3)
    cfg = ScheduleConfig(name="constant", warmup_steps=warmup, start_factor=0.25, min_lr_ratio=0.0)
    sched = build_schedule(opt, cfg, total_steps=total, peak_lr=2e-3)
    ours = _lrs(opt, sched, total + 5)
    _assert_close(ours, _lrs(ref_opt, ref, total + 5))
    _assert_close(ours, _lrs(lam_opt, lam, total + 5))
    assert ours[total] == [2e-3]  # the floor of constant is the peak


@pytest.mark.parametrize("decay_shape", ["linear", "cosine"])
def test_wsd_matches_sequential_lr(decay_shape: str):
    total, warmup, decay_fraction, ratio, peak = 100, 10, 0.2, 0.05, 1e-2
    cooldown = 20
    ref_opt = _sgd(peak)
    if decay_shape == "linear":
        decay = LinearLR(ref_opt, start_factor=1.0, end_factor=ratio, total_iters=cooldown)
    else:
        decay = CosineAnnealingLR(ref_opt, T_max=cooldown, eta_min=ratio * peak)
    ref = SequentialLR(
        ref_opt,
        [LinearLR(ref_opt, start_factor=0.1, end_factor=1.0, total_iters=warmup), LambdaLR(ref_opt, lambda s: 1.0),
         decay],
        milestones=[warmup, total - cooldown],
    )
    opt = _sgd(peak)
    cfg = ScheduleConfig(name="wsd", warmup_steps=warmup, start_factor=0.1, min_lr_ratio=ratio,
                         decay_fraction=decay_fraction, decay_shape=decay_shape)  # type: ignore[arg-type]
    sched = build_schedule(opt, cfg, total_steps=total, peak_lr=peak)
    _assert_close(_lrs(opt, sched, total), _lrs(ref_opt, ref, total))


# ----------------------------------------------------------------------------------------------------------
# closed forms and shape properties

TOTAL, WARMUP, SF, M = 110, 10, 0.2, 0.1  # decay of T = 100 steps, midpoint at step 60


@pytest.mark.parametrize(
    ("shape", "mid"),
    [
        ("cosine", M + (1 - M) * 0.5 * (1 + math.cos(math.pi / 2))),
        ("sqrt", M + (1 - M) * math.sqrt(0.5)),
        ("linear", M + (1 - M) * 0.5),
        ("constant", 1.0),
    ],
)
def test_shape_key_points(shape: str, mid: float):
    f = partial(lr_multiplier, total=TOTAL, warmup=WARMUP, shape=shape, start_factor=SF, min_ratio=M)
    floor = 1.0 if shape == "constant" else M
    assert f(0) == pytest.approx(SF)
    assert f(WARMUP // 2) == pytest.approx(SF + (1 - SF) * 0.5)
    assert f(WARMUP) == 1.0
    assert f(WARMUP + 50) == pytest.approx(mid)
    assert f(TOTAL) == floor  # exactly the floor at the last step ...
    assert f(TOTAL + 1) == f(10 * TOTAL) == floor  # ... and after it
    assert f(TOTAL - 1) > floor or shape == "constant"


@pytest.mark.parametrize("decay_shape", ["linear", "cosine", "sqrt"])
def test_wsd_key_points(decay_shape: str):
    f = partial(lr_multiplier, total=TOTAL, warmup=WARMUP, shape="wsd", start_factor=SF, min_ratio=M,
                decay_fraction=0.2, decay_shape=decay_shape)
    start = TOTAL - 22  # round(0.2 * 110) = 22 cool-down steps
    assert f(0) == pytest.approx(SF)
    assert f(WARMUP) == f(start - 1) == f(start) == 1.0
    assert f(start + 1) < 1.0
    mid = {"linear": 0.5, "cosine": 0.5, "sqrt": math.sqrt(0.5)}[decay_shape]
    assert f(start + 11) == pytest.approx(M + (1 - M) * mid)
    assert f(TOTAL) == f(TOTAL + 3) == M


@pytest.mark.parametrize("shape", ["cosine", "sqrt", "linear", "constant", "wsd"])
@pytest.mark.parametrize("decay_shape", ["linear", "cosine", "sqrt"])
def test_monotone(shape: str, decay_shape: str):
    values = [lr_multiplier(s, total=TOTAL, warmup=WARMUP, shape=shape, start_factor=SF, min_ratio=M,
                            decay_shape=decay_shape) for s in range(TOTAL + 5)]
    warm, rest = values[: WARMUP + 1], values[WARMUP:]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert all(a >= b for a, b in zip(rest, rest[1:]))
    assert min(values) >= (SF if shape == "constant" else M) - 1e-15


def test_no_warmup_starts_at_peak():
    assert lr_multiplier(0, total=10, warmup=0, shape="linear", start_factor=0.1, min_ratio=0.0) == 1.0
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_multiplier(-1, total=10, warmup=0, shape="linear")


def test_resolve_warmup_and_floor():
    s = resolve_schedule(ScheduleConfig(warmup_fraction=0.05, min_lr=3e-4), total_steps=1000, peak_lr=3e-3)
    assert (s.warmup, s.min_ratio, s.floor) == (50, pytest.approx(0.1), pytest.approx(0.1))
    s = resolve_schedule(ScheduleConfig(warmup_steps=7, warmup_fraction=0.5), total_steps=1000, peak_lr=1.0)
    assert s.warmup == 7  # warmup_steps overrides the fraction
    s = resolve_schedule(ScheduleConfig(name="wsd", decay_fraction=0.25), total_steps=1000, peak_lr=1.0)
    assert s.decay_start == 750


# ----------------------------------------------------------------------------------------------------------
# torch wrappers


def test_param_groups_keep_their_ratios():
    opt = _sgd(1e-2, 3e-3, 5e-4)
    sched = build_schedule(opt, ScheduleConfig(warmup_steps=5), total_steps=40, peak_lr=1e-2)
    s = resolve_schedule(ScheduleConfig(warmup_steps=5), total_steps=40, peak_lr=1e-2)
    for step, lrs in enumerate(_lrs(opt, sched, 45)):
        assert lrs == pytest.approx([1e-2 * s(step), 3e-3 * s(step), 5e-4 * s(step)], rel=1e-15)
    assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize("scheduler_first", [False, True])
def test_state_dict_round_trip(scheduler_first: bool):
    cfg = ScheduleConfig(name="wsd", warmup_steps=8, decay_fraction=0.3, decay_shape="sqrt", min_lr_ratio=0.0)

    def make(peaks=(1e-3, 4e-4)):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW([{"params": [model.weight], "lr": peaks[0]}, {"params": [model.bias], "lr": peaks[1]}])
        return model, opt, build_schedule(opt, cfg, total_steps=100, peak_lr=1e-3)

    def train(model, opt, sched, steps: int) -> list[list[float]]:
        lrs = []
        for _ in range(steps):
            lrs.append([g["lr"] for g in opt.param_groups])
            model(torch.ones(2, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        return lrs

    full = train(*make(), 100)

    model, opt, sched = make()
    first = train(model, opt, sched, 37)
    assert sched.state_dict() == {"last_epoch": 37}
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()

    model2, opt2, sched2 = make(peaks=(5e-3, 5e-3))  # the saved peaks (initial_lr) must win
    model2.load_state_dict(model.state_dict())
    if scheduler_first:
        sched2.load_state_dict(saved_sched)
        opt2.load_state_dict(saved_opt)
    else:
        opt2.load_state_dict(saved_opt)
        sched2.load_state_dict(saved_sched)
    assert [g["lr"] for g in opt2.param_groups] == full[37]
    assert first + train(model2, opt2, sched2, 63) == full
    assert sched2.last_epoch == 100


def test_tensor_lr_stays_a_tensor():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=torch.tensor(1e-2), foreach=False)
    lr = opt.param_groups[0]["lr"]
    sched = build_schedule(opt, ScheduleConfig(warmup_steps=2, min_lr_ratio=0.0), total_steps=10, peak_lr=1e-2)
    s = resolve_schedule(ScheduleConfig(warmup_steps=2, min_lr_ratio=0.0), total_steps=10, peak_lr=1e-2)
    for step in range(11):
        assert lr.item() == pytest.approx(1e-2 * s(step), rel=1e-6, abs=1e-12)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] is lr  # updated in place (capturable / fused / CUDA-graph friendly)
    sched.load_state_dict({"last_epoch": 5})
    assert lr.item() == pytest.approx(1e-2 * s(5), rel=1e-6)


def test_lr_schedule_takes_any_function():
    opt = _sgd(1.0)
    sched = LRSchedule(opt, lambda s: 1.0 / (1 + s))
    assert [lrs[0] for lrs in _lrs(opt, sched, 3)] == [1.0, 0.5, 1 / 3, 0.25]


def test_group_schedule_sets_key_and_round_trips():
    opt = _sgd(1e-2, 1e-3)
    fn = partial(muon_momentum, momentum=0.95, warmup=10)
    sched = GroupSchedule(opt, "momentum", fn)
    assert [g["momentum"] for g in opt.param_groups] == [0.85, 0.85]
    for _ in range(4):
        sched.step()
    assert [g["momentum"] for g in opt.param_groups] == pytest.approx([fn(4)] * 2)
    assert sched.state_dict() == {"last_epoch": 4}
    assert sched.get_last_value() == fn(4)

    opt2 = _sgd(1e-2, 1e-3)
    sched2 = GroupSchedule(opt2, "momentum", fn)
    opt2.load_state_dict(opt.state_dict())  # replaces the group dicts: the schedule must follow
    sched2.load_state_dict(sched.state_dict())
    assert [g["momentum"] for g in opt2.param_groups] == pytest.approx([fn(4)] * 2)
    for _ in range(20):
        sched.step()
        sched2.step()
    assert [g["momentum"] for g in opt2.param_groups] == [g["momentum"] for g in opt.param_groups] == [0.95, 0.95]


def test_group_schedule_only_groups_with_the_key():
    opt = _sgd(1e-2, 1e-3)
    opt.param_groups[0]["beta3"] = torch.tensor(0.0)  # a tensor hyperparameter stays a tensor
    fn = partial(ademamix_beta3, beta1=0.9, beta3=0.9999, warmup=100)
    sched = GroupSchedule(opt, "beta3", fn)
    sched.step()
    assert isinstance(opt.param_groups[0]["beta3"], torch.Tensor)
    assert opt.param_groups[0]["beta3"].item() == pytest.approx(fn(1))
    assert "beta3" not in opt.param_groups[1]
    with pytest.raises(ValueError, match="'alpha'"):
        GroupSchedule(opt, "alpha", partial(ademamix_alpha, alpha=5.0, warmup=10))


def test_optimizer_schedules_unchanged():
    assert muon_momentum(0, momentum=0.95, warmup=300) == 0.85
    assert muon_momentum(150, momentum=0.95, warmup=300) == pytest.approx(0.9)
    assert muon_momentum(999, momentum=0.95, warmup=300) == muon_momentum(5, momentum=0.95, warmup=0) == 0.95
    assert ademamix_alpha(50, alpha=5.0, warmup=100) == 2.5
    assert ademamix_alpha(500, alpha=5.0, warmup=100) == ademamix_alpha(0, alpha=5.0, warmup=0) == 5.0
    assert ademamix_beta3(0, beta1=0.9, beta3=0.9999, warmup=100) == pytest.approx(0.9)
    assert ademamix_beta3(100, beta1=0.9, beta3=0.9999, warmup=100) == pytest.approx(0.9999)


def test_ademamix_beta3_warmup_from_beta1_zero_is_the_formulas_limit():
    """beta1 = 0 (the reference code's memory-saving setting) takes the limit of the half-life formula."""
    for step in (0, 1, 37, 100, 500):
        got = ademamix_beta3(step, beta1=0.0, beta3=0.9999, warmup=100)
        near = ademamix_beta3(step, beta1=1e-300, beta3=0.9999, warmup=100)
        assert got == pytest.approx(near, rel=1e-2, abs=1e-12)
    assert ademamix_beta3(0, beta1=0.0, beta3=0.9999, warmup=100) == 0.0
    assert ademamix_beta3(100, beta1=0.0, beta3=0.9999, warmup=100) == 0.9999
    assert ademamix_beta3(50, beta1=0.9, beta3=0.0, warmup=100) == 0.0


# ----------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("cfg", "total", "message"),
    [
        (ScheduleConfig(warmup_steps=200), 100,
         "--schedule.warmup_steps=200 is longer than the run (100 steps); shorten the warm-up or train longer"),
        (ScheduleConfig(warmup_steps=100), 100, "--schedule.warmup_steps=100 is as long as the run (100 steps)"),
        (ScheduleConfig(warmup_fraction=0.999), 100, "--schedule.warmup_fraction=0.999 (100 steps) is as long"),
        (ScheduleConfig(warmup_steps=-5), 100, "--schedule.warmup_steps must be >= 0, got -5"),
        (ScheduleConfig(), 0, "--train.steps=0: the run must have at least one step"),
        (ScheduleConfig(), -3, "--train.steps=-3"),
        (ScheduleConfig(min_lr=2e-2), 100, "--schedule.min_lr=0.02 must be between 0 and the peak --optim.lr=0.01"),
        (ScheduleConfig(min_lr=-1e-5), 100, "--schedule.min_lr=-1e-05 must be between 0 and the peak"),
        (ScheduleConfig(min_lr=float("nan")), 100, "--schedule.min_lr must be a finite number, got nan"),
        (ScheduleConfig(min_lr_ratio=1.5), 100, "--schedule.min_lr_ratio must be in [0, 1], got 1.5"),
        (ScheduleConfig(start_factor=0.0), 100, "--schedule.start_factor must be in (0, 1], got 0.0"),
        (ScheduleConfig(name="wsd", decay_fraction=0.0), 100, "--schedule.decay_fraction must be in (0, 1], got 0.0"),
        (ScheduleConfig(name="wsd", decay_fraction=1.5), 100, "--schedule.decay_fraction must be in (0, 1], got 1.5"),
        (ScheduleConfig(name="wsd", warmup_steps=30, decay_fraction=0.8), 100,
         "--schedule.decay_fraction=0.8 makes the 80-step cool-down overlap the 30-step warm-up; use a "
         "decay_fraction of at most 0.7"),
        (ScheduleConfig(name="step"), 100, "--schedule.name: 'step' is not one of cosine"),  # type: ignore[arg-type]
    ],
)
def test_bad_settings(cfg: ScheduleConfig, total: int, message: str):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        build_schedule(_sgd(1e-2), cfg, total_steps=total, peak_lr=1e-2)
    assert "\n" not in str(e.value)


def test_wsd_whole_run_cooldown_is_allowed_without_warmup():
    s = resolve_schedule(ScheduleConfig(name="wsd", warmup_steps=0, decay_fraction=1.0, min_lr_ratio=0.0),
                         total_steps=10, peak_lr=1.0)
    assert [s(i) for i in (0, 5, 10)] == [1.0, 0.5, 0.0]


# ----------------------------------------------------------------------------------------------------------
# `lmsprint schedule`


def test_schedule_report_table_and_png(tmp_path: Path):
    png = tmp_path / "plots" / "lr.png"
    cfg = ScheduleConfig(warmup_steps=10, start_factor=0.1, min_lr=1e-4)
    text = schedule_report(cfg, peak_lr=1e-2, total_steps=100, at_steps=[0, 10, 55, 100, 150], png=png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = text.splitlines()
    assert lines[0].startswith("cosine schedule: peak 0.01, 100 steps, warm-up 10 steps")
    rows = {int(line.split()[0]): line.split()[1:] for line in lines[2:]}
    assert rows[0] == ["1.0000e-03", "0.1000"]
    assert rows[10] == ["1.0000e-02", "1.0000"]
    assert rows[55] == ["5.0500e-03", "0.5050"]
    assert rows[100] == rows[150] == ["1.0000e-04", "0.0100"]


def test_schedule_report_compare(tmp_path: Path):
    png = tmp_path / "compare.png"
    cfg = ScheduleConfig(name="constant", warmup_steps=10, min_lr_ratio=0.0)
    text = schedule_report(cfg, peak_lr=1.0, total_steps=100, png=png, compare=True)
    assert png.stat().st_size > 10_000
    header = text.splitlines()[1].split()
    assert header == ["step", "lr:constant", "lr:cosine", "lr:sqrt", "lr:linear", "lr:wsd"]
    last = text.splitlines()[-1].split()  # step 100: every shape at its floor
    assert last == ["100", "1.0000e+00"] + ["0.0000e+00"] * 4
    with pytest.raises(ConfigError, match="step -1 is negative"):
        schedule_report(cfg, peak_lr=1.0, total_steps=100, at_steps=[-1])


@pytest.mark.parametrize(("warmup", "total", "compare"), [(5, 500, False), (80, 100, False), (10, 100, True),
                                                       (300, 1000, True)])
def test_the_warm_up_label_is_drawn_over_no_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warmup: int,
                                                  total: int, compare: bool) -> None:
    from lmsprint import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    schedule_report(ScheduleConfig(warmup_steps=warmup), peak_lr=3e-3, total_steps=total, png=tmp_path / "lr.png",
                    compare=compare)
    fig = figures[0]
    fig.draw_without_rendering()  # lays the figure out
    ax = fig.axes[0]
    label = next(t for t in ax.texts if "end of warm-up" in t.get_text())
    box = label.get_window_extent(fig.canvas.get_renderer())
    assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)
    for line in ax.lines:
        if line.get_gid() != "warm-up":  # the dotted line it labels
            path = line.get_transform().transform_path(line.get_path())
            assert not path.intersects_bbox(box, filled=False), line.get_label()


def test_schedule_png_errors(tmp_path: Path) -> None:
    cfg = ScheduleConfig(warmup_steps=10)
    with pytest.raises(LmsprintError, match=r"^--png .*/x.notimage: give a file name ending in .png, .svg, .pdf"):
        schedule_report(cfg, peak_lr=1.0, total_steps=100, png=tmp_path / "x.notimage")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(LmsprintError, match="cannot write .*afile/lr.png .*; pass another --png"):
        schedule_report(cfg, peak_lr=1.0, total_steps=100, png=tmp_path / "afile" / "lr.png")


def test_import_is_light():
    src = str(Path(schedules.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = "import sys, lmsprint.schedules; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_cli_schedule_prints_and_draws(tmp_path: Path) -> None:
    """`lmsprint schedule` tabulates the lr and draws the PNG (by default schedule.png); --compare adds the other
    shapes to the table."""
    from conftest import run_cli

    proc = run_cli("schedule", "--train.steps=100", "--optim.lr=1e-2", "--schedule.warmup_steps=10",
                   "--schedule.start_factor=0.1", "--schedule.min_lr=1e-4", "--at", "0,10,100", "--compare",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "schedule.png").stat().st_size > 0
    for shape in ("cosine", "sqrt", "linear"):
        assert shape in proc.stdout
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.split()[:1] and
            line.split()[0].isdigit()}
    assert rows["0"][0] == "1.0000e-03" and rows["10"][0] == "1.0000e-02" and rows["100"][0] == "1.0000e-04"


@pytest.mark.parametrize(("total", "warmup"), [(1, 0), (10, 2), (300, 60), (500, 100), (1000, 200), (2000, 200),
                                               (10000, 200), (20000, 400), (100000, 2000)])
def test_default_warmup_rule(total: int, warmup: int) -> None:
    """A run that sets no warm-up warms up over 20% of the run, at most max(2%, 200 steps) (docs/schedules.md's
    measurements), with nanoGPT's shape lr (it+1)/(W+1); an explicit fraction or length still wins."""
    s = resolve_schedule(ScheduleConfig(), total_steps=total, peak_lr=1.0)
    assert s.warmup == warmup and s.start_factor == pytest.approx(1 / (warmup + 1))
    if warmup:
        assert [s(i) for i in (0, warmup - 1, warmup)] == pytest.approx([1 / (warmup + 1), warmup / (warmup + 1), 1])
    assert resolve_schedule(ScheduleConfig(warmup_fraction=0.01), total_steps=total, peak_lr=1.0).warmup == \
        round(0.01 * total)
    assert resolve_schedule(ScheduleConfig(warmup_steps=0), total_steps=total, peak_lr=1.0).warmup == 0
