"""Training for a wall-clock budget: the planner's arithmetic, the time-triggered cool-down on a fake clock, the
best checkpoint, resuming a budgeted run, and the command line around them. No assertion here depends on real
time: runs are timed on a fake clock that the test advances."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run_cli, tiny_config
from safetensors.torch import load_file

from lmsprint import planner
from lmsprint.cli import _budget_default
from lmsprint.config import ScheduleConfig, build_config, parse_duration
from lmsprint.errors import ConfigError
from lmsprint.planner import Cost, fit, nearest
from lmsprint.schedules import default_warmup, lr_multiplier, resolve_schedule
from lmsprint.training import plan as plan_mod
from lmsprint.training.api import Callback
from lmsprint.training.best import describe, find_weights
from lmsprint.training.budget import Budget, Timer
from lmsprint.training.metrics import read_metrics
from lmsprint.training.plan import epochs_warning
from lmsprint.training.run import resume_config, train

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeClock:
    """A wall clock that moves only when told to."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ----------------------------------------------------------------------------------------------------------
# durations and config


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400),
                                               ("1.5h", 5400), ("2m30s", 150), (" 3M ", 180)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["90", "m", "10x", "0s", "-5m", "1m1m", "ten minutes", ""])
def test_bad_durations(text: str) -> None:
    assert parse_duration(text) is None


def test_budget_conflicts_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="--train.budget must be a duration"):
        build_config(None, ["--train.budget=10"])
    with pytest.raises(ConfigError, match="both set the run's length"):
        build_config(None, ["--train.budget=10m", "--train.epochs=2"])


def test_the_default_run_has_a_budget_unless_a_length_or_recipe_is_given() -> None:
    assert _budget_default(None, []) == ["--train.budget=auto", "--model.preset=auto", "--schedule.name=wsd"]
    assert _budget_default(None, ["--model.n_embd=64"]) == ["--train.budget=auto", "--schedule.name=wsd",
                                                            "--model.n_embd=64"]
    assert _budget_default(None, ["--schedule.name=cosine"]) == ["--train.budget=auto", "--model.preset=auto",
                                                                 "--schedule.name=cosine"]
    assert _budget_default(None, ["--train.budget=3m"]) == ["--train.budget=3m"]
    assert _budget_default(None, ["--train.steps=100"]) == ["--train.steps=100"]
    assert _budget_default("fast", []) == []


# ----------------------------------------------------------------------------------------------------------
# the planner's arithmetic


COST = Cost(params=1000, rows=8, step_s=0.5, first_s=2.0, eval_s=1.0, save_s=0.5, finish_s=1.5)


def test_fit_is_the_time_left_over_the_step_time() -> None:
    # overhead: first step 2 + 9 evaluations 9 + final checkpoint 0.5 + finish 1.5 = 13 s; 87 s / 0.5 s = 174 steps
    f = fit(COST, seconds=100, rows=8, seq_len=16, max_tokens=10**9, ckpt_every=0)
    assert (f.steps, f.tokens, f.limit) == (174, 174 * 128, "time")
    assert f.ratio == pytest.approx(174 * 128 / 1000)
    assert f.seconds == pytest.approx(13 + 174 * 0.5)
    # half the rows: twice the steps (tokens/s kept); periodic checkpoints cost their share of every step
    assert fit(COST, seconds=100, rows=4, seq_len=16, max_tokens=10**9, ckpt_every=0).steps == 348
    assert fit(COST, seconds=100, rows=8, seq_len=16, max_tokens=10**9, ckpt_every=10).steps == math.floor(87 / 0.55)
    # the corpus caps it: 10,000 tokens are 78 steps of 128
    capped = fit(COST, seconds=100, rows=8, seq_len=16, max_tokens=10_000, ckpt_every=0)
    assert (capped.steps, capped.limit) == (78, "data")
    # too few steps to count: ratio 0
    assert fit(COST, seconds=20, rows=8, seq_len=16, max_tokens=10**9, ckpt_every=0).ratio == 0


def test_nearest_picks_the_size_nearest_the_ratio_in_log_and_measures_few() -> None:
    ratios = [50.0, 30.0, 18.0, 9.0, 4.0]
    for start in range(5):
        asked: list[int] = []

        def ratio(i: int, asked: list[int] = asked) -> float:
            asked.append(i)
            return ratios[i]

        assert nearest(5, ratio, 20.0, start=start) == 2  # |ln(18/20)| < |ln(30/20)|
        assert len(set(asked)) <= abs(start - 2) + 2  # only the sizes on the way
    assert nearest(3, lambda i: [40.0, 10.0, 5.0][i], 20.0) == 0  # a tie in log goes to the smaller size
    assert nearest(3, lambda i: [80.0, 60.0, 40.0][i], 20.0) == 2  # every size over-trained: the largest
    assert nearest(3, lambda i: [10.0, 0.0, 0.0][i], 20.0, start=2) == 0  # sizes that do not fit are skipped


def ladder_costs(n: int = 6, *, base_step: float = 0.05) -> list[Cost]:
    """Sizes 4x apart in parameters whose step time grows 3x per size."""
    return [replace(COST, params=1000 * 4**i, step_s=base_step * 3**i) for i in range(n)]


def make_plan(costs: list[Cost], **kw: object) -> planner.Plan:
    args = dict(budget=300.0, spent=10.0, corpus_tokens=10**9, seq_len=16, batch_size=8, micro_batch_size=None,
                ckpt_every=0, tokens_per_param=20.0, max_epochs=4.0)
    args.update(kw)
    return planner.plan([lambda c=c: c for c in costs], **args)  # type: ignore[arg-type]


def test_plan_picks_the_size_for_the_ratio_and_fits_the_budget() -> None:
    costs = ladder_costs()
    p = make_plan(costs)
    ratios = [fit(c, seconds=290, rows=8, seq_len=16, max_tokens=4 * 10**9, ckpt_every=0).ratio for c in costs]
    assert p.size == min(range(6), key=lambda i: abs(math.log(ratios[i] / 20)) if ratios[i] else math.inf)
    assert p.expected <= p.budget
    assert p.limit == "time" and p.epochs < 4
    assert p.eval_every == math.ceil(p.steps / planner.EVALUATIONS)
    assert p.tokens == p.steps * p.batch_size * 16
    # a tenfold budget picks a larger model
    assert make_plan(costs, budget=3000.0).size > p.size


def test_a_small_corpus_gets_a_smaller_model_not_more_epochs() -> None:
    costs = ladder_costs()
    roomy = make_plan(costs, budget=3000.0)
    small = make_plan(costs, budget=3000.0, corpus_tokens=20_000)
    assert small.size < roomy.size
    assert small.limit == "data" and small.epochs <= 4.0
    assert small.expected < 3000.0  # ends early rather than repeat the corpus


def test_plan_halves_the_batch_for_enough_steps_and_keeps_the_micro_batch_dividing_it() -> None:
    p = make_plan([replace(COST, rows=48)], budget=60.0, spent=0.0, batch_size=48, micro_batch_size=16)
    # 47 s / 0.5 s = 94 steps of 48 rows; 24 rows: 188 steps, 12 rows: 376 (< MIN_STEPS = 400); 6 rows: 752 steps
    assert (p.batch_size, p.steps) == (6, 752)
    assert p.micro_batch_size == 2  # gcd(6, 16)
    assert make_plan([COST], budget=30.0, spent=0.0, batch_size=16).batch_size == 4  # not below MIN_ROWS


def test_a_budget_too_short_is_refused_with_what_it_needs() -> None:
    with pytest.raises(ValueError, match=r"the budget is too short: the smallest model needs about \d+s"):
        make_plan(ladder_costs(), budget=15.0)
    with pytest.raises(ValueError, match="corpus .* is too small"):
        make_plan(ladder_costs(), corpus_tokens=100)


def test_plans_fit_their_budget_and_corpus_for_random_costs() -> None:
    """An invariant: whatever the measurements, a plan expects to end within its budget and its epochs."""
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 6)
        step = [rng.uniform(0.001, 0.5)]
        for _ in range(n - 1):
            step.append(step[-1] * rng.uniform(1.0, 5.0))
        costs = [Cost(params=rng.randint(1000, 5000) * 4**i, rows=8, step_s=s, first_s=rng.uniform(0, 5),
                      eval_s=rng.uniform(0, 2), save_s=rng.uniform(0, 1), finish_s=rng.uniform(0, 3))
                 for i, s in enumerate(step)]
        kw = dict(budget=rng.uniform(30, 3000), spent=rng.uniform(0, 10), corpus_tokens=rng.randint(10**4, 10**7),
                  tokens_per_param=rng.uniform(1, 40), ckpt_every=rng.choice([0, 50]))
        try:
            p = make_plan(costs, **kw)
        except ValueError:
            continue
        assert p.expected <= p.budget + 1e-6
        assert p.epochs <= 4.0 + 1e-9
        assert p.steps >= planner.FEWEST_STEPS


def test_the_planned_run_uses_the_default_warm_up_of_its_planned_length(tmp_path: Path, corpus: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fake_costs(monkeypatch)
    timer = Timer(started=0.0, clock=FakeClock())
    planned = plan_mod.plan_run(budget_config(corpus, "60s"), timer=timer, progress=False)
    steps = planned.config.train.steps
    assert planned.config.schedule.name == "wsd"
    assert planned.config.schedule.warmup_steps == default_warmup(steps)
    assert planned.plan.expected <= 60
    kept = plan_mod.plan_run(budget_config(corpus, "60s", schedule__warmup_steps=3), timer=timer, progress=False)
    assert kept.config.schedule.warmup_steps == 3
    assert "wsd" in planned.describe() and "expected" in planned.describe()


def test_with_compile_the_search_measures_eagerly_and_only_the_pick_compiled(corpus: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, bool]] = []

    def cost_of(cfg: object, gpt: object, **kw: object) -> tuple[Cost, bool]:
        calls.append((gpt.n_embd, cfg.train.compile))  # type: ignore[attr-defined]
        params, _ = plan_mod.block_params(gpt)  # type: ignore[arg-type]
        return Cost(params=params, rows=4, step_s=0.05 * params / 1e5, first_s=0.5, eval_s=0.2, save_s=0.1,
                    finish_s=0.5), True

    monkeypatch.setattr(plan_mod, "cost_of", cost_of)
    planned = plan_mod.plan_run(budget_config(corpus, "10m", train__compile=True),
                                  timer=Timer(started=0.0, clock=FakeClock()), progress=False)
    assert len(calls) >= 2 and not any(compiled for _, compiled in calls[:-1])
    assert calls[-1] == (planned.shape[2], True)
    assert planned.config.train.compile


# ----------------------------------------------------------------------------------------------------------
# the deadline, on a fake clock


def make_budget(seconds: float, clock: FakeClock, *, planned: int = 400, max_steps: int = 10**6,
                eval_every: int = 10**9, costs: dict[str, float] | None = None, **schedule: object) -> Budget:
    cfg = ScheduleConfig(name="wsd", **schedule)  # type: ignore[arg-type]
    sched = resolve_schedule(cfg, total_steps=planned, peak_lr=1e-3)
    return Budget(seconds, timer=Timer(started=0.0, clock=clock), schedule=sched, max_steps=max_steps,
                  eval_every=eval_every, ckpt_every=0, costs=costs or {"eval": 0.0, "save": 0.0, "finish": 0.0})


def drive(b: Budget, clock: FakeClock, step_time: object, *, start: int = 0, until: int | None = None) -> list[float]:
    """Run steps until the budget's end (or ``until``), ``step_time(step)`` fake seconds each; the lr of each."""
    lrs = []
    step = start
    b.start()
    while step < b.end and (until is None or step < until):
        lrs.append(b(step))
        clock.t += step_time(step)  # type: ignore[operator]
        step += 1
        b.step_done(step)
    lrs.append(b(step))
    return lrs


def assert_full_cooldown(b: Budget, lrs: list[float], *, floor: float) -> None:
    c = b.cooldown
    assert c is not None and c.steps >= 1
    assert lrs[-1] == pytest.approx(floor)  # the lr reached the floor at the end
    decay = lrs[c.start:]
    assert all(x >= y - 1e-12 for x, y in zip(decay, decay[1:]))  # and fell all the way through the cool-down


@pytest.mark.parametrize("tau", [0.05, 0.1, 0.2])
def test_the_cooldown_starts_when_the_time_left_equals_its_length_and_ends_on_time(tau: float) -> None:
    clock = FakeClock()
    b = make_budget(100.0, clock)
    lrs = drive(b, clock, lambda s: tau)
    total = len(lrs) - 1
    assert 100 - 2 * tau <= clock.t <= 100 + 1e-6  # on time: the steps that fit, no more
    c = b.cooldown
    assert c is not None and c.end == total
    assert abs(c.steps - round(0.2 * total)) <= 1  # decay_fraction of the run's actual length
    assert max(lrs[c.start - 50:c.start + 1]) == lrs[c.start] == 1.0  # stable at the peak until then
    assert_full_cooldown(b, lrs, floor=0.1)


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_a_machine_faster_or_slower_than_planned_still_ends_on_time_after_a_full_cooldown(factor: float) -> None:
    """The plan (400 steps) assumed 0.25 s a step; the machine turns out to take 0.25 x factor from step 20 on."""
    clock = FakeClock()
    b = make_budget(100.0, clock, planned=400)
    lrs = drive(b, clock, lambda s: 0.25 if s < 20 else 0.25 * factor)
    assert 100 - 2 * 0.25 * factor <= clock.t <= 100 + 1e-6
    total = len(lrs) - 1
    assert (total > 420) if factor < 1 else (total < 300)
    assert_full_cooldown(b, lrs, floor=0.1)


def test_a_slowdown_inside_the_cooldown_refits_it_to_the_time_left() -> None:
    clock = FakeClock()
    b = make_budget(100.0, clock)
    lrs = drive(b, clock, lambda s: 0.1 if s < 850 else 0.3)  # the cool-down starts near step 800
    assert 100 - 0.6 <= clock.t <= 100 + 1e-6
    assert_full_cooldown(b, lrs, floor=0.1)
    assert max(abs(x - y) for x, y in zip(lrs, lrs[1:])) < 0.05  # re-fitted from the lr reached: no jump


def test_evaluations_and_checkpoints_are_paid_for() -> None:
    clock = FakeClock()
    b = make_budget(100.0, clock, eval_every=50, costs={"eval": 2.0, "save": 1.0, "finish": 3.0})
    step = 0
    b.start()
    while step < b.end:  # as the trainer's loop: the step, then the deadline's update, then evaluation, checkpoint
        clock.t += 0.1
        step += 1
        b.step_done(step)
        end = step == b.end
        if step % 50 == 0 or end:
            with b.paused("eval"):
                clock.t += 2.0
        if end:
            with b.paused("save"):
                clock.t += 1.0
    clock.t += 3.0  # the finish
    assert 100 - 1.5 <= clock.t <= 100 + 1e-6


def test_the_corpus_cap_ends_the_run_like_a_fixed_length_wsd_schedule() -> None:
    clock = FakeClock()
    b = make_budget(10**6, clock, planned=500, max_steps=500)
    lrs = drive(b, clock, lambda s: 0.1)
    assert len(lrs) - 1 == 500
    fixed = [lr_multiplier(s, total=500, warmup=b.schedule.warmup, shape="wsd", start_factor=b.schedule.start_factor,
                           min_ratio=0.1, decay_fraction=0.2) for s in range(501)]
    assert lrs == pytest.approx(fixed)


def test_steps_that_take_no_measurable_time_end_at_the_corpus_cap() -> None:
    clock = FakeClock()
    b = make_budget(100.0, clock, planned=200, max_steps=300)
    assert len(drive(b, clock, lambda s: 0.0)) - 1 == 300


def test_the_planned_warm_up_comes_first() -> None:
    clock = FakeClock()
    b = make_budget(100.0, clock, planned=400)
    lrs = drive(b, clock, lambda s: 0.1)
    w = b.schedule.warmup
    assert w == default_warmup(400) == 80
    assert lrs[:w] == pytest.approx([b.schedule(s) for s in range(w)])
    assert lrs[w] == 1.0


def test_a_resumed_budget_keeps_the_time_left_and_the_cooldown() -> None:
    tick = 0.125  # exact in binary: the sums of the two timelines are equal, not merely close
    straight_clock = FakeClock()
    straight = make_budget(100.0, straight_clock)
    want = drive(straight, straight_clock, lambda s: tick)
    for stop in (300, 700):  # before and inside the cool-down
        clock = FakeClock()
        first = make_budget(100.0, clock)
        got = drive(first, clock, lambda s: tick, until=stop)[:-1]
        state = first.state_dict()
        later = FakeClock(4096.0)  # a new process, started much later: its own start-up counts from its launch
        resumed = make_budget(100.0, later)
        resumed.timer.started = 4096.0
        resumed.load_state_dict(state)
        assert resumed.used() == stop * tick
        got += drive(resumed, later, lambda s: tick, start=stop)
        assert len(got) == len(want)
        assert got == pytest.approx(want)


# ----------------------------------------------------------------------------------------------------------
# budgeted runs


def fake_costs(monkeypatch: pytest.MonkeyPatch, step_s: float = 0.05) -> None:
    """Every size costs what a 3x-per-size ladder would, without measuring."""

    def cost_of(cfg: object, gpt: object, **kw: object) -> tuple[Cost, bool]:
        params, _ = plan_mod.block_params(gpt)  # type: ignore[arg-type]
        scale = params / 1e5
        return Cost(params=params, rows=int(kw["rows"]), step_s=step_s * scale, first_s=0.5, eval_s=0.2,  # type: ignore[call-overload]
                    save_s=0.1, finish_s=0.5), True

    monkeypatch.setattr(plan_mod, "cost_of", cost_of)


def budget_config(corpus: Path, budget: str, **overrides: object):  # noqa: ANN201
    """The tiny test config with a budget: the planner picks the size and the warm-up."""
    args: dict[str, object] = dict(train__budget=budget, model__preset="auto", model__n_layer="none",
                                   model__n_head="none", model__n_embd="none", schedule__warmup_steps="none",
                                   train__ckpt_every=0, train__log_every=10)
    return tiny_config(corpus, **{**args, **overrides})


class Tick(Callback):
    """Advances the fake clock by one step's time after every step's backward pass."""

    def __init__(self, clock: FakeClock, seconds: float, *, stop_at_eval: int | None = None) -> None:
        self.clock, self.seconds, self.stop_at_eval = clock, seconds, stop_at_eval

    def on_grads(self, step: int, model: torch.nn.Module) -> None:
        self.clock.t += self.seconds

    def on_eval(self, step: int, val_loss: float) -> bool:
        return step == self.stop_at_eval


def test_a_budgeted_run_plans_cools_down_on_time_and_keeps_the_best(tmp_path: Path, corpus: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    fake_costs(monkeypatch)
    clock = FakeClock()
    result = train(budget_config(corpus, "20s"), run_dir=tmp_path / "run", timer=Timer(started=0.0, clock=clock),
                   callbacks=[Tick(clock, 0.05)])
    out = capsys.readouterr().out
    assert "budget plan: 20.0s" in out and "cool-down: steps" in out
    assert clock.t <= 20
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    plan = next(r for r in records if r["kind"] == "plan")
    summary = records[-1]
    assert summary["budget"] == 20 and summary["used"] <= 20 and summary["step"] == result.step
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert lrs[-1] == pytest.approx(0.1 * 3e-3)  # the cool-down reached the floor at the last step
    assert any(r.get("event") == "cooldown" for r in records)
    assert plan["steps"] > 0 and result.expected == pytest.approx(plan["expected"])
    # the best evaluation's weights are kept beside the latest checkpoint, and sampling uses them
    assert result.best_step == min(result.val_history, key=lambda v: v[1])[0]
    assert find_weights(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "best"


def test_a_budgeted_run_resumed_ends_as_if_it_had_never_stopped(tmp_path: Path, corpus: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fake_costs(monkeypatch)

    def run(run_dir: Path, **kw: object):  # noqa: ANN202
        torch.manual_seed(0)
        random.seed(0)
        clock = FakeClock()
        resume = (run_dir / "config.toml").exists()
        cfg = resume_config(run_dir, []) if resume else budget_config(corpus, "20s")  # resumed: the planned config
        return train(cfg, run_dir=run_dir, timer=Timer(started=0.0, clock=clock), callbacks=[Tick(clock, 0.05, **kw)],
                     resume=resume)

    straight = run(tmp_path / "a")
    evals = [s for s, _ in straight.val_history]
    stopped = run(tmp_path / "b", stop_at_eval=evals[2])
    assert stopped.step == evals[2]
    resumed = run(tmp_path / "b")
    assert (resumed.step, resumed.val_loss, resumed.val_history) == (straight.step, straight.val_loss,
                                                                    straight.val_history)
    assert resumed.budget_before == pytest.approx(evals[2] * 0.05)
    wa = load_file(tmp_path / "a" / "checkpoints" / f"step_{straight.step:08d}" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "checkpoints" / f"step_{straight.step:08d}" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class Ascend(Callback):
    """Gradient ascent from step ``start`` on: the validation loss gets worse after it."""

    def __init__(self, start: int) -> None:
        self.start = start

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return -loss if step >= self.start else loss


def test_the_best_checkpoint_keeps_the_lowest_validation_loss(tmp_path: Path, corpus: Path) -> None:
    from lmsprint.sample import load_model

    cfg = tiny_config(corpus, train__steps=20, train__eval_every=5, train__ckpt_every=5, train__keep_checkpoints=10,
                      optim__lr=0.01)
    result = train(cfg, run_dir=tmp_path / "run", callbacks=[Ascend(start=10)])
    losses = dict(result.val_history)
    assert losses[20] > losses[10]  # it got worse
    best_step = min(losses, key=losses.get)  # type: ignore[arg-type]
    assert result.best_step == best_step and result.best_val_loss == losses[best_step]
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("step_")) == ["best"]
    best_w = load_file(ckpts / "best" / "model.safetensors")
    step_w = load_file(ckpts / f"step_{best_step:08d}" / "model.safetensors")
    assert all(torch.equal(best_w[k], step_w[k]) for k in step_w)
    _, _, found = load_model(tmp_path / "run")
    assert found == ckpts / "best"
    assert f"validation loss {losses[best_step]:.4f} at step {best_step}" in describe(found)
    # a resumed run keeps the best it had: a worse evaluation does not replace it
    again = train(tiny_config(corpus, train__steps=25, train__eval_every=5, train__ckpt_every=5,
                              train__keep_checkpoints=10, optim__lr=0.01),
                  run_dir=tmp_path / "run", resume=True, callbacks=[Ascend(start=0)])
    assert again.best_step == best_step


def test_a_run_of_too_many_epochs_is_warned() -> None:
    assert epochs_warning(tokens=100, corpus_tokens=50, max_epochs=4) is None
    line = epochs_warning(tokens=500, corpus_tokens=100, max_epochs=4)
    assert line is not None and "5.0 epochs" in line and "\n" not in line


def test_cli_dry_run_prints_the_plan_and_trains_nothing(tmp_path: Path, corpus: Path) -> None:
    tiny = ["--data.tokenizer=byte", "--data.seq_len=32", "--train.batch_size=4", "--train.eval_tokens=256",
            "--log.progress=false"]
    proc = run_cli("train", str(corpus), "--train.budget=2m", "--dry-run", *tiny, cwd=tmp_path,
                   env_extra={"LMSPRINT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "budget plan: 2m00s" in proc.stdout and "expected" in proc.stdout
    assert not (tmp_path / "runs").exists()
    assert_clean_error(run_cli("train", str(corpus), "--dry-run", "--train.steps=5", *tiny, cwd=tmp_path),
                       "--dry-run prints the plan of a --train.budget run")
    assert_clean_error(run_cli("train", str(corpus), "--train.budget=5 minutes", *tiny, cwd=tmp_path),
                       "--train.budget must be a duration")


def test_a_cached_measurement_the_run_proves_wrong_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """A plan's cost off the run's own step time by 2x or more (a measurement made under another load) drops this
    machine's cached measurements, and only this machine's; nearer than 2x keeps them."""
    from lmsprint.data.sources import read_cached_json, write_cached_json
    from lmsprint.training.throughput import CACHE, device_name, forget_if_stale

    monkeypatch.setenv("LMSPRINT_CACHE", str(tmp_path / "cache"))
    cpu = torch.device("cpu")
    here, other = f"{device_name(cpu)}: 2x64 rows 16 seq 256", "NVIDIA H200: 2x64 rows 16 seq 256"
    write_cached_json(CACHE, {"a": {"what": here}, "b": {"what": f"{device_name(cpu)}: 3x96"}, "c": {"what": other}})
    cost = Cost(params=100, rows=16, step_s=1.0, first_s=0.0, eval_s=0.0, save_s=0.0, finish_s=0.0)
    # at 4 rows the plan expects 0.25 s a step
    assert forget_if_stale(cost, rows=4, measured=0.2, device=cpu) is None
    assert forget_if_stale(cost, rows=4, measured=0.4, device=cpu) is None
    assert forget_if_stale(cost, rows=4, measured=None, device=cpu) is None
    assert set(read_cached_json(CACHE)) == {"a", "b", "c"}
    line = forget_if_stale(cost, rows=4, measured=0.1, device=cpu)
    assert line is not None and line.startswith("note: a step took 0.1s") and "the 2 throughput" in line
    assert read_cached_json(CACHE) == {"c": {"what": other}}
    write_cached_json(CACHE, {"a": {"what": here}})
    assert forget_if_stale(cost, rows=4, measured=0.6, device=cpu) is not None  # slower than planned too
    assert read_cached_json(CACHE) == {}


def test_a_budgeted_run_slower_than_its_cached_plan_drops_the_cache(tmp_path: Path, corpus: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """End to end: the planned sizes cost a twentieth of what the run's steps take; the run still ends on time,
    and then says so and empties this machine's part of the throughput cache."""
    from lmsprint.data.sources import read_cached_json, write_cached_json
    from lmsprint.training.throughput import CACHE, device_name

    monkeypatch.setenv("LMSPRINT_CACHE", str(tmp_path / "cache"))
    write_cached_json(CACHE, {"old": {"what": f"{device_name(torch.device('cpu'))}: 2x64 rows 4 seq 32"}})
    fake_costs(monkeypatch, step_s=0.0025)
    clock = FakeClock()
    train(budget_config(corpus, "20s"), run_dir=tmp_path / "run", timer=Timer(started=0.0, clock=clock),
          callbacks=[Tick(clock, 0.05)])
    out = capsys.readouterr().out
    assert clock.t <= 20 and "note: a step took" in out and "next plan measures afresh" in out
    assert read_cached_json(CACHE) == {}
