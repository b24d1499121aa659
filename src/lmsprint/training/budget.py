"""Training for a wall-clock budget (``--train.budget``): the clock, and the deadline during the run.

The plan before the run is :mod:`lmsprint.training.plan`'s. While the run trains, :class:`Budget` times every step and
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
from dataclasses import dataclass, field
from typing import Any

import torch

from lmsprint.config import RunConfig, parse_duration
from lmsprint.errors import ConfigError
from lmsprint.schedules import Schedule, cooldown_steps, decay_remaining, resolve_schedule

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

    def step_seconds(self) -> float | None:
        """The median of the recent steps' times (None before three were timed)."""
        return statistics.median(self._times) if len(self._times) >= 3 else None

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

    def timing(self) -> dict[str, Any]:
        """The budget's fields of the summary record."""
        return {"budget": self.seconds, "used": self.used(),
                "cooldown_start": self.cooldown.start if self.cooldown else None}

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


def run_budget(cfg: RunConfig, *, total_steps: int, corpus_tokens: int, device: torch.device, timer: Timer,
               cost: Any = None) -> Budget:
    """The deadline of a budgeted run: the planned warm-up and cool-down, the corpus's step cap (the plan's
    --train.max_epochs) and the plan's measured costs (``cost``, a :class:`lmsprint.training.throughput` cost)
    as the first estimates."""
    t = cfg.train
    assert t.budget is not None
    schedule = resolve_schedule(cfg.schedule, total_steps=total_steps, peak_lr=cfg.optim.lr)
    max_steps = max(total_steps, math.floor(t.max_epochs * corpus_tokens / (t.batch_size * cfg.data.seq_len)))
    costs = {"eval": cost.eval_s if cost else 0.0, "save": cost.save_s if cost else 0.0,
             "finish": cost.finish_s if cost else 0.0}
    return Budget(budget_seconds(t.budget, device), timer=timer, schedule=schedule, max_steps=max_steps,
                  eval_every=t.eval_every or max_steps, ckpt_every=t.ckpt_every, costs=costs)


class FixedLength:
    """The length of a run without a budget, in :class:`Budget`'s terms: its configured steps, nothing timed."""

    def __init__(self, total_steps: int) -> None:
        self.end = self.expected_end = total_steps

    def start(self) -> None:
        pass

    def paused(self, kind: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def step_done(self, step: int) -> bool:
        return False

