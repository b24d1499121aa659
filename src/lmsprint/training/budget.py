"""Training for a wall-clock budget (``--train.budget``): the plan before the run, the deadline during it.

:func:`plan_run` prepares the data, measures (or reads from the cache) what candidate sizes cost on this machine
(:mod:`lmsprint.training.throughput`) and lets :func:`lmsprint.planner.plan` pick the model, batch and steps; the
planned config is an ordinary config with a wsd schedule. While the run trains, :class:`Budget` times every step and
starts the wsd cool-down when the time left equals the cool-down's predicted duration, so a machine slower or
faster than the plan still ends with a whole cool-down, evaluated and checkpointed, inside the budget. Its state
(time used, the cool-down) is saved in checkpoints: a resumed run keeps the remaining budget.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lmsprint import distributed as D
from lmsprint import planner
from lmsprint.config import RunConfig, parse_duration, validate
from lmsprint.data.batching import TokenStream
from lmsprint.data.prepare import prepared_data
from lmsprint.errors import ConfigError
from lmsprint.model import resolve_model_config
from lmsprint.model.presets import ladder
from lmsprint.schedules import Schedule, cooldown_steps, decay_remaining, resolve_schedule
from lmsprint.training.batches import check_streams, micro_batch_rows
from lmsprint.training.throughput import block_params, cost_of, device_name

ONE_PROCESS = "--train.budget plans runs of one process; drop --nproc, or set --train.steps"
AUTO_SECONDS = {"cpu": 240.0, "cuda": 120.0}
"""``--train.budget=auto``: the default run's budget on each kind of device."""
STEP_WINDOW = 32
"""Steps whose median time is the step time the deadline is re-estimated with."""
REFIT_TOLERANCE = 0.02
"""A cool-down is re-fitted to the time left when it would end more than this fraction of the budget early or
late (step times are noisy: re-fitting on every wobble would make the lr curve jagged for nothing)."""


# ----------------------------------------------------------------------------------------------------------
# the clock


def process_start() -> float:
    """When this process started (``time.time()`` seconds), from /proc where there is one: a budget counts the
    interpreter's and torch's start-up too."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


@dataclass
class Timer:
    """The wall clock a budget runs on: when it started and how to read it (tests pass a fake clock)."""

    started: float = field(default_factory=time.time)
    clock: Callable[[], float] = time.time

    def elapsed(self) -> float:
        return self.clock() - self.started


def budget_seconds(budget: str, device: torch.device) -> float:
    """Seconds of a ``--train.budget`` value (``auto``: :data:`AUTO_SECONDS` of the device)."""
    if budget == "auto":
        return AUTO_SECONDS["cuda" if device.type == "cuda" else "cpu"]
    seconds = parse_duration(budget)
    if seconds is None:  # validate() has checked it already
        raise ConfigError(f"--train.budget must be a duration like 90s, 10m or 2h, got {budget!r}")
    return seconds


def clock_text(seconds: float) -> str:
    """``2m58s``, ``1h02m``, ``45.2s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


# ----------------------------------------------------------------------------------------------------------
# the plan


def tokens_per_param(cfg: RunConfig, device: torch.device) -> float:
    """The compute-optimal ratio the size is picked for: --train.tokens_per_param, else the one measured on a CPU
    (:data:`lmsprint.planner.CPU_TOKENS_PER_PARAM`) or Chinchilla's on a GPU."""
    if cfg.train.tokens_per_param is not None:
        return cfg.train.tokens_per_param
    return planner.CHINCHILLA_TOKENS_PER_PARAM if device.type == "cuda" else planner.CPU_TOKENS_PER_PARAM


def picks_size(cfg: RunConfig) -> bool:
    """Whether the planner picks the model size: --model.preset=auto with no size of the user's."""
    m = cfg.model
    return m.preset == "auto" and m.n_layer is None and m.n_head is None and m.n_embd is None


@dataclass
class PlannedRun:
    """A plan and the config that runs it."""

    plan: planner.Plan
    config: RunConfig
    device: str
    shape: tuple[int, int, int]
    """(layers, heads, width) of the model."""
    picked: bool
    """The planner picked the size (else the config named it)."""
    corpus_tokens: int
    cost: planner.Cost
    """What the picked size costs here, as measured (the deadline's estimates until the run times its own)."""
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """The plan, as printed before training."""
        p, cfg = self.plan, self.config
        layers, heads, width = self.shape
        sizes = f"{p.measured} size{'s' if p.measured != 1 else ''}"
        how = f"picked of {sizes} measured for {p.target:g} tokens/param" if self.picked else "the config's size"
        b = p.breakdown
        lines = [
            f"budget plan: {clock_text(p.budget)} on {self.device}",
            f"  model  {layers} layers x {width} wide, {heads} heads: {p.params / 1e6:.2f}M params ({how})",
            f"  data   {p.steps} steps x {p.batch_size} x {cfg.data.seq_len} tokens = {p.tokens / 1e6:.2f}M tokens "
            f"= {p.epochs:.2f} epochs of {self.corpus_tokens / 1e6:.2f}M, {p.tokens_per_param:.1f} tokens/param "
            f"(limited by {p.limit})",
            f"  time   start-up {clock_text(p.spent + b['first step'])} + steps {clock_text(b['steps'])} + "
            f"{planner.EVALUATIONS + 1} evaluations {clock_text(b['evaluations'])} + checkpoint and finish "
            f"{clock_text(b['checkpoint'] + b['finish'])} = {clock_text(p.expected)} expected",
            f"  lr     wsd, warm-up {cfg.schedule.warmup_steps} steps, the {cfg.schedule.decay_fraction:g} cool-down "
            "started on time",
        ]
        return "\n".join(lines + [f"  note   {n}" for n in self.notes])


class Candidates:
    """The sizes a plan picks from (the ladder with --model.preset=auto, else the config's own) and what each costs
    on this machine: measured once per device and shape (cached on disk), memoised here.

    With --train.compile the search measures eager steps (compiling every candidate would take longer than the
    answer is worth: 20-40 s each on a cold GPU) and only the picked size is measured compiled, as it will run.
    """

    def __init__(self, cfg: RunConfig, data: Any, device: torch.device, *, announce: Callable[[str], None]) -> None:
        self.cfg, self.data, self.device, self.announce = cfg, data, device, announce
        self.shapes = ladder() if picks_size(cfg) else [None]
        self.eager_search = cfg.train.compile and len(self.shapes) > 1
        self.search_cfg = cfg
        if self.eager_search:
            self.search_cfg = RunConfig.from_dict(cfg.to_dict())
            self.search_cfg.train.compile = False
        val_tokens = int(sum(s.header.n_tokens for s in data.val))
        self.eval_rows = math.ceil(min(cfg.train.eval_tokens, max(val_tokens, 1)) / cfg.data.seq_len)
        self.measured: dict[tuple[int, bool], planner.Cost] = {}

    def gpt(self, i: int) -> Any:
        shape, m = self.shapes[i], self.cfg.model
        model = m if shape is None else replace(m, n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd)
        return resolve_model_config(model, vocab_size=self.data.tokenizer.vocab_size, block_size=self.cfg.data.seq_len)

    def cost(self, i: int, *, as_run: bool = False) -> planner.Cost:
        """Size ``i``'s cost, measured as the search does (or, ``as_run``, with the run's own compile setting)."""
        cfg = self.cfg if as_run else self.search_cfg
        key = (i, cfg.train.compile)
        if key not in self.measured:
            gpt, t = self.gpt(i), cfg.train

            def say(_: object) -> None:
                how = " (compiled)" if t.compile else ""
                self.announce(f"measuring {gpt.n_layer} layers x {gpt.n_embd} wide{how} on "
                              f"{device_name(self.device)} ...")

            self.measured[key] = cost_of(cfg, gpt, device=self.device, rows=t.batch_size, micro=micro_batch_rows(t, 1),
                                         eval_rows=self.eval_rows, on_measure=say)[0]
        return self.measured[key]

    def guess(self, ratio_of: Callable[[planner.Cost], float], target: float) -> int:
        """Where to start the search: the size nearest ``target`` by the smallest size's cost scaled by FLOPs."""
        if len(self.shapes) == 1:
            return 0
        anchor, flops0 = self.cost(0), block_params(self.gpt(0))[1]
        estimates = []
        for i in range(len(self.shapes)):
            params, flops = block_params(self.gpt(i))
            estimates.append(planner.scaled(anchor, params=params, flops_ratio=flops / flops0))
        return planner.nearest(len(estimates), lambda i: ratio_of(estimates[i]), target)


def plan_run(cfg: RunConfig, *, timer: Timer, progress: bool = True,
             line: Callable[[str], None] = print) -> PlannedRun:
    """Plan a budgeted run: prepare the data, measure what the candidate sizes cost here (once; cached), and pick
    the model size, batch and steps that fit the budget (:func:`lmsprint.planner.plan`).

    Raises:
        ConfigError: the budget or the corpus is too small for any candidate, or the planned settings do not fit
            together (e.g. a wsd cool-down that would overlap the warm-up).
    """
    t = cfg.train
    assert t.budget is not None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(ONE_PROCESS)
    device = D.resolve_device(t.device)
    budget = budget_seconds(t.budget, device)
    data = prepared_data(cfg.data, progress=progress)
    if timer.elapsed() >= budget:
        raise ConfigError(f"--train.budget={t.budget}: {clock_text(timer.elapsed())} of it went to start-up and data "
                          "preparation before planning; give a longer budget")
    train_stream = TokenStream(data.train)
    check_streams(cfg, train_stream, TokenStream(data.val))  # before any candidate is built on data that cannot work
    corpus = int(train_stream.n_tokens)
    sizes = Candidates(cfg, data, device, announce=line)
    target = tokens_per_param(cfg, device)
    kw: dict[str, Any] = dict(budget=budget, corpus_tokens=corpus, seq_len=cfg.data.seq_len, batch_size=t.batch_size,
                              micro_batch_size=t.micro_batch_size, ckpt_every=t.ckpt_every, tokens_per_param=target,
                              max_epochs=t.max_epochs)
    max_tokens = math.floor(t.max_epochs * corpus)
    try:
        start = sizes.guess(lambda c: planner.fit(c, seconds=budget - timer.elapsed(), rows=t.batch_size,
                                                  seq_len=cfg.data.seq_len, max_tokens=max_tokens,
                                                  ckpt_every=t.ckpt_every).ratio, target)
        costs = [lambda i=i: sizes.cost(i) for i in range(len(sizes.shapes))]
        planner.plan(costs, spent=timer.elapsed(), start=start, **kw)  # measures the sizes the search passes
        p = planner.plan(costs, spent=timer.elapsed(), start=start, **kw)  # again, after the time that took
        if sizes.eager_search:  # the picked size, compiled as the run will be
            as_run = sizes.cost(p.size, as_run=True)
            p = replace(planner.plan([lambda: as_run], spent=timer.elapsed(), **kw), size=p.size,
                        measured=p.measured)
    except ValueError as e:
        raise ConfigError(f"--train.budget={t.budget}: {e}") from None
    planned, notes = _planned_config(cfg, p, sizes.gpt(p.size), picked=len(sizes.shapes) > 1)
    gpt = sizes.gpt(p.size)
    return PlannedRun(plan=p, config=planned, device=device_name(device), shape=(gpt.n_layer, gpt.n_head, gpt.n_embd),
                      picked=len(sizes.shapes) > 1, corpus_tokens=corpus, cost=sizes.cost(p.size, as_run=True),
                      notes=notes)


def _planned_config(cfg: RunConfig, p: planner.Plan, gpt: Any, *, picked: bool) -> tuple[RunConfig, list[str]]:
    """The config that runs plan ``p``: the picked shape, steps, batch and evaluation cadence, a wsd schedule with
    the warm-up resolved for the planned length (the default rule unless one is set); and notes on what changed."""
    planned = RunConfig.from_dict(cfg.to_dict())
    notes = []
    if picked:
        planned.model.n_layer, planned.model.n_head, planned.model.n_embd = gpt.n_layer, gpt.n_head, gpt.n_embd
    if cfg.schedule.name != "wsd":
        notes.append(f"--schedule.name={cfg.schedule.name} replaced by wsd: a budget ends with a cool-down "
                     "started on time")
    planned.schedule.name = "wsd"
    tr = planned.train
    tr.steps, tr.batch_size, tr.micro_batch_size, tr.eval_every = p.steps, p.batch_size, p.micro_batch_size, \
        p.eval_every
    planned.schedule.warmup_steps = resolve_schedule(planned.schedule, total_steps=p.steps,
                                                     peak_lr=planned.optim.lr).warmup
    validate(planned)
    return planned, notes


def epochs_warning(*, tokens: int, corpus_tokens: int, max_epochs: float) -> str | None:
    """One line when a run's tokens are more than ``max_epochs`` passes over its corpus."""
    if corpus_tokens <= 0 or tokens <= max_epochs * corpus_tokens:
        return None
    return (f"warning: {tokens / 1e6:.3g}M training tokens are {tokens / corpus_tokens:.1f} epochs of the "
            f"{corpus_tokens / 1e6:.3g}M-token corpus (more than --train.max_epochs={max_epochs:g}): the model may "
            "memorise it; train fewer steps or a smaller model, or set --train.budget")


# ----------------------------------------------------------------------------------------------------------
# the deadline


@dataclass
class Cooldown:
    """The cool-down in progress: from step ``start``, where ``left`` of the way from the floor to the peak
    remained, to the floor in ``steps`` steps."""

    start: int
    left: float
    steps: int

    @property
    def end(self) -> int:
        return self.start + self.steps


class Budget:
    """The deadline of a budgeted run and its time-triggered wsd cool-down (the run's lr multiplier).

    Called with a step it gives the multiplier of the peak lr: the plan's warm-up, the peak until the cool-down
    starts, then the cool-down's ``decay_shape`` down to the floor. After each step :meth:`step_done` re-estimates
    the steps the time left allows, ``n`` = (budget - used - what the end costs) / (median recent step time + the
    evaluations and checkpoints due per step), and starts the cool-down when ``n`` is no more than its length,
    ``decay_fraction`` of the run's re-estimated length ``step + n``. The run ends when the cool-down does. A
    machine that turns slower or faster during the cool-down has the rest of it re-fitted to the time left (from the
    lr reached). The data cap ``max_steps`` starts the cool-down like a fixed-length wsd schedule if it comes first.

    Args:
        seconds: the budget.
        timer: the wall clock (when the budget started).
        schedule: the planned wsd schedule (its warm-up, floor, cool-down fraction and shape).
        max_steps: the most steps the corpus allows (--train.max_epochs).
        eval_every, ckpt_every: the run's cadence.
        costs: seconds of an evaluation (with its best/ save), a checkpoint and the finish, until measured here.
    """

    def __init__(self, seconds: float, *, timer: Timer, schedule: Schedule, max_steps: int, eval_every: int,
                 ckpt_every: int, costs: dict[str, float]) -> None:
        self.seconds, self.timer, self.schedule, self.max_steps = seconds, timer, schedule, max_steps
        self.eval_every, self.ckpt_every = eval_every, ckpt_every
        self.costs = dict(costs)
        self.used_before = 0.0
        """Seconds used by the earlier processes of a resumed run."""
        self.cooldown: Cooldown | None = None
        self._times: deque[float] = deque(maxlen=STEP_WINDOW)
        self._mark: float | None = None
        self._paused = 0.0

    # the lr multiplier

    def __call__(self, step: int) -> float:
        s = self.schedule
        c = self.cooldown
        if c is not None and step >= c.start:
            return s.min_ratio + (1.0 - s.min_ratio) * self._left(step)
        return s(step) if step < s.warmup else 1.0

    def _left(self, step: int) -> float:
        """How much of the way from the floor to the peak is left at ``step``."""
        c = self.cooldown
        s = self.schedule
        if c is None or step < c.start:
            m = s(step) if step < s.warmup else 1.0
            return (m - s.min_ratio) / (1.0 - s.min_ratio) if s.min_ratio < 1 else 1.0
        return c.left * decay_remaining(step - c.start, c.steps, s.decay_shape)

    # time

    def used(self) -> float:
        """Seconds of the budget used so far, earlier processes of the run included."""
        return self.used_before + self.timer.elapsed()

    @property
    def end(self) -> int:
        """The step the run ends at, as far as it is known: the cool-down's end, or the data cap before it."""
        return self.cooldown.end if self.cooldown is not None else self.max_steps

    @property
    def expected_end(self) -> int:
        """The end as the plan or the cool-down expects it (for the progress bar and messages)."""
        return self.cooldown.end if self.cooldown is not None else self.schedule.total

    def start(self) -> None:
        """The loop starts: the first step is timed from here."""
        self._mark, self._paused = self.timer.clock(), 0.0

    @contextlib.contextmanager
    def paused(self, kind: str) -> Iterator[None]:
        """Time spent inside is an evaluation (``eval``) or a checkpoint (``save``), not a step; its duration is
        the cost expected of the next one."""
        t0 = self.timer.clock()
        try:
            yield
        finally:
            dt = self.timer.clock() - t0
            self._paused += dt
            self.costs[kind] = dt

    def per_step(self) -> float:
        """Seconds per step: the median of the recent steps plus the evaluations and checkpoints due per step."""
        tau = statistics.median(self._times)
        return tau + self.costs["eval"] / self.eval_every + (self.costs["save"] / self.ckpt_every
                                                            if self.ckpt_every else 0.0)

    def _seconds_for(self, step: int, n: int, tau: float) -> float:
        """Seconds of ``n`` more steps from ``step``: the steps and the evaluations and checkpoints due among them
        (those of the last step are the end's)."""
        def due(every: int) -> int:
            return (step + n - 1) // every - step // every if every and n > 0 else 0

        return n * tau + due(self.eval_every) * self.costs["eval"] + due(self.ckpt_every) * self.costs["save"]

    def steps_left(self, step: int) -> int:
        """The steps from ``step`` that fit in the time left once the end (an evaluation, a checkpoint, the finish)
        is paid for, and in the corpus (``max_steps``)."""
        left = self.seconds - self.used() - self.costs["eval"] - self.costs["save"] - self.costs["finish"]
        tau, cap = statistics.median(self._times), self.max_steps - step
        n = min(cap, max(0, math.floor(left / max(self.per_step(), 1e-9))))
        while n > 0 and self._seconds_for(step, n, tau) > left:
            n -= 1
        while n < cap and self._seconds_for(step, n + 1, tau) <= left:
            n += 1
        return n

    def step_done(self, step: int) -> bool:
        """After each update (``step`` updates done): time it, and start or re-fit the cool-down; True when the
        lr schedule changed (the caller sets the lr of ``step`` again)."""
        now = self.timer.clock()
        if self._mark is not None:
            self._times.append(max(0.0, now - self._mark - self._paused))
        self._mark, self._paused = now, 0.0
        c = self.cooldown
        if c is not None and step < c.start:  # a rollback to before the cool-down: it starts again when due
            self.cooldown = c = None
        if step >= self.end:
            return False
        timed = len(self._times) >= 3  # a step time to go by (the first steps warm caches up)
        n = self.steps_left(step) if timed else self.max_steps - step
        if c is None:
            if n > cooldown_steps(step + n, self.schedule.decay_fraction):
                return False
        elif not timed or abs(n - (c.end - step)) * self.per_step() <= max(REFIT_TOLERANCE * self.seconds,
                                                                           2 * self.per_step()):
            return False
        self.cooldown = Cooldown(start=step, left=self._left(step), steps=max(n, 1))
        return True

    # resume

    def state_dict(self) -> dict[str, Any]:
        c = self.cooldown
        return {"used": self.used(), "cooldown": None if c is None else [c.start, c.left, c.steps],
                "costs": dict(self.costs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.used_before = float(state["used"])
        c = state["cooldown"]
        self.cooldown = None if c is None else Cooldown(int(c[0]), float(c[1]), int(c[2]))
        self.costs.update(state["costs"])
        self._times.clear()
        self._mark = None
