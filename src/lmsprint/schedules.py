"""Schedules: pure functions of the step, wrapped as torch schedulers.

Every schedule here is a plain function ``step -> multiplier`` (or ``step -> value``); the torch objects that
drive an optimizer with it (:class:`LRSchedule`, :class:`GroupSchedule`) save only their step, and the function
is rebuilt from the config on resume.

Step convention (torch's): "step ``s``" is the value after ``s`` calls of ``scheduler.step()``. The optimizer
update number ``i`` (0-based) of a run therefore uses the multiplier at step ``i``; a ``total``-step run uses
steps ``0 .. total - 1`` and the scheduler reports the floor, exactly, after its ``total``-th ``step()`` (step
``total``). This is what ``SequentialLR([LinearLR(...), CosineAnnealingLR(T_max=total - warmup)])`` does, and
the lr curves here match torch's own schedulers at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from lmsprint.config import ScheduleConfig
from lmsprint.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------
# pure functions of the step


def cosine_decay(t: int, T: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * t / T))


def sqrt_decay(t: int, T: int) -> float:
    return math.sqrt((T - t) / T)


def linear_decay(t: int, T: int) -> float:
    return (T - t) / T


DECAYS: dict[str, Callable[[int, int], float]] = {"cosine": cosine_decay, "sqrt": sqrt_decay, "linear": linear_decay}
"""Decay shapes: the fraction of the way from the floor to the peak left after ``t`` of ``T`` decay steps
(``0 < t < T``). Each is a ``--schedule.name`` (decay after the warm-up) and a ``--schedule.decay_shape`` (of the wsd
cool-down); their names are the Literals of :class:`~lmsprint.config.ScheduleConfig` (tests/test_architecture.py)."""
DECAY_SHAPES = tuple(DECAYS)
SHAPES = (*DECAYS, "constant", "wsd")


def decay_remaining(t: int, T: int, shape: str) -> float:
    """How much of the way from the floor to the peak is left after ``t`` of ``T`` decay steps.

    Args:
        t: Steps into the decay (0 = its start).
        T: Length of the decay in steps (> 0).
        shape: A key of :data:`DECAYS`: ``cosine`` (``(1 + cos(pi t/T)) / 2``), ``sqrt`` (``sqrt((T - t)/T)``) or
            ``linear`` (``(T - t)/T``).

    Returns:
        1.0 at ``t <= 0``, 0.0 (exactly) at ``t >= T``.
    """
    if t <= 0:
        return 1.0
    if t >= T:
        return 0.0
    if shape not in DECAYS:
        raise ValueError(f"unknown decay shape {shape!r}; choose from {', '.join(DECAYS)}")
    return DECAYS[shape](t, T)


def cooldown_steps(total: int, decay_fraction: float) -> int:
    """Length of the wsd cool-down: ``decay_fraction x total`` rounded to the nearest step, at least 1."""
    return max(1, round(decay_fraction * total))


def lr_multiplier(
    step: int,
    *,
    total: int,
    warmup: int,
    shape: str,
    start_factor: float = 0.1,
    min_ratio: float = 0.1,
    decay_fraction: float = 0.2,
    decay_shape: str = "linear",
) -> float:
    """The learning rate at ``step`` as a multiple of the peak.

    Linear warm-up from ``start_factor`` at step 0 to 1.0 at step ``warmup`` (torch's ``LinearLR``), then, with
    ``t = step - warmup`` and ``T = total - warmup``, a decay to ``min_ratio`` that lands on it exactly at step
    ``total`` and stays there: cosine ``m + (1-m)(1 + cos(pi t/T))/2``, sqrt ``m + (1-m) sqrt((T-t)/T)``, linear
    ``m + (1-m)(T-t)/T``, constant 1.0 (its floor is the peak), wsd 1.0 until the cool-down, which takes the last
    ``cooldown_steps(total, decay_fraction)`` steps and falls to ``min_ratio`` with ``decay_shape``.

    Args:
        step: Scheduler steps taken so far (>= 0); optimizer update ``i`` uses step ``i``.
        total: Steps of the run (the floor is reached at this step).
        warmup: Warm-up steps (0 = start at the peak).
        shape: One of ``cosine``, ``sqrt``, ``linear``, ``constant``, ``wsd``.
        start_factor: Multiplier at step 0 of the warm-up.
        min_ratio: Floor as a fraction of the peak.
        decay_fraction: wsd: fraction of the run spent cooling down.
        decay_shape: wsd: ``linear``, ``cosine`` or ``sqrt`` cool-down.

    Returns:
        The multiplier of the peak learning rate.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return start_factor + (1.0 - start_factor) * step / warmup
    if shape == "constant":
        return 1.0
    if shape == "wsd":
        cooldown = cooldown_steps(total, decay_fraction)
        left = decay_remaining(step - (total - cooldown), cooldown, decay_shape)
    elif shape in DECAY_SHAPES:
        left = decay_remaining(step - warmup, total - warmup, shape)
    else:
        raise ValueError(f"unknown schedule {shape!r}; choose from {', '.join(SHAPES)}")
    return min_ratio + (1.0 - min_ratio) * left


@dataclass(frozen=True)
class Schedule:
    """A resolved learning-rate schedule: call it with a step to get the multiplier of the peak lr.

    Build it with :func:`resolve_schedule`, which validates the settings; the fields are those of
    :func:`lr_multiplier`.
    """

    shape: str
    total: int
    warmup: int
    start_factor: float
    min_ratio: float
    decay_fraction: float
    decay_shape: str
    peak_lr: float | None = None  # with min_lr: the main group's peak, for an exact absolute floor
    min_lr: float | None = None

    def lr(self, peak: Any, step: int) -> Any:
        """The lr at ``step`` of a group whose peak is ``peak``; exactly ``min_lr`` for the main group at the end."""
        if self.min_lr is not None and self.peak_lr is not None and step >= self.total and self.shape != "constant":
            return peak / self.peak_lr * self.min_lr  # peak / peak_lr == 1.0 exactly for the main group
        return peak * self(step)

    def __call__(self, step: int) -> float:
        return lr_multiplier(
            step,
            total=self.total,
            warmup=self.warmup,
            shape=self.shape,
            start_factor=self.start_factor,
            min_ratio=self.min_ratio,
            decay_fraction=self.decay_fraction,
            decay_shape=self.decay_shape,
        )

    @property
    def floor(self) -> float:
        """Multiplier reached at step ``total``: ``min_ratio``, or 1.0 for the constant schedule."""
        return 1.0 if self.shape == "constant" else self.min_ratio

    @property
    def decay_start(self) -> int:
        """First step of the decay: the end of the warm-up, or of the stable phase for wsd."""
        if self.shape == "wsd":
            return self.total - cooldown_steps(self.total, self.decay_fraction)
        return self.warmup


def default_warmup(total_steps: int) -> int:
    """The warm-up of a run that sets none: 20% of the run, but at most the larger of 2% and 200 steps.

    Measured for AdamW on one H200 (docs/schedules.md): nanoGPT's recipe at 1000 steps ends at 4.819 / 4.622 /
    4.584 / 4.547 with warm-ups of 2 / 5 / 10 / 20 %, the 36M model at 300 steps is best at 20 % at each of three
    peak lrs. Short runs therefore warm up over a fifth of the run; from 1,000 steps on the warm-up stays at
    200 steps (until 2 % is longer), the usual long-run guidance, which these measurements do not cover.
    """
    return min(round(0.2 * total_steps), max(round(0.02 * total_steps), 200))


def resolve_schedule(cfg: ScheduleConfig, *, total_steps: int, peak_lr: float) -> Schedule:
    """Turn the ``[schedule]`` config into a :class:`Schedule`, checking that it fits the run.

    Args:
        cfg: The schedule section of the run config.
        total_steps: Optimizer steps of the run.
        peak_lr: Peak learning rate (``--optim.lr``), used to turn an absolute ``min_lr`` into a ratio.

    Returns:
        The schedule as a function of the step.

    Raises:
        ConfigError: A setting is out of range or does not fit in ``total_steps``; the message names the flag.
    """
    if total_steps <= 0:
        raise ConfigError(f"--train.steps={total_steps}: the run must have at least one step")
    if not (peak_lr > 0 and math.isfinite(peak_lr)):
        raise ConfigError(f"--optim.lr={peak_lr} must be a positive number")
    cfg.check(peak_lr=peak_lr)  # the rules of the [schedule] section, as the config's validation applies them

    if cfg.warmup_steps is not None:
        warmup, flag = cfg.warmup_steps, f"--schedule.warmup_steps={cfg.warmup_steps}"
    elif cfg.warmup_fraction is None:
        warmup, flag = default_warmup(total_steps), f"the default warm-up ({default_warmup(total_steps)} steps)"
    else:
        warmup = round(cfg.warmup_fraction * total_steps)
        flag = f"--schedule.warmup_fraction={cfg.warmup_fraction} ({warmup} steps)"
    if warmup >= total_steps:
        what = "is longer than" if warmup > total_steps else "is as long as"
        raise ConfigError(f"{flag} {what} the run ({total_steps} steps); shorten the warm-up or train longer")
    start_factor = 1.0 / (warmup + 1) if cfg.start_factor is None else cfg.start_factor
    min_ratio = cfg.min_lr / peak_lr if cfg.min_lr is not None else cfg.min_lr_ratio

    if cfg.name == "wsd":
        cooldown = cooldown_steps(total_steps, cfg.decay_fraction)
        if total_steps - cooldown < warmup:
            most = (total_steps - warmup) / total_steps
            raise ConfigError(f"--schedule.decay_fraction={cfg.decay_fraction} makes the {cooldown}-step cool-down "
                              f"overlap the {warmup}-step warm-up; use a decay_fraction of at most {most} "
                              "or a shorter warm-up")

    return Schedule(
        shape=cfg.name,
        total=total_steps,
        warmup=warmup,
        start_factor=start_factor,
        min_ratio=min_ratio,
        decay_fraction=cfg.decay_fraction,
        decay_shape=cfg.decay_shape,
        peak_lr=peak_lr,
        min_lr=cfg.min_lr,
    )


# ----------------------------------------------------------------------------------------------------------
# torch wrappers


class LRSchedule(LRScheduler):
    """Drives an optimizer's learning rates with a function of the step.

    Each param group's lr is its own ``initial_lr`` (its peak, recorded when the scheduler is created and saved
    with the optimizer's state) times ``fn(step)``, so groups with different peaks keep their ratios. The state
    dict holds only the step; ``fn`` is rebuilt from the config on resume.

    Args:
        optimizer: Any optimizer, with any number of param groups.
        fn: Multiplier of the peak lr as a function of the step (e.g. a :class:`Schedule`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, fn: Callable[[int], float]) -> None:
        self.fn = fn
        super().__init__(optimizer)

    def get_lr(self) -> list[float | torch.Tensor]:
        if isinstance(self.fn, Schedule):
            return [self.fn.lr(group["initial_lr"], self.last_epoch) for group in self.optimizer.param_groups]
        m = self.fn(self.last_epoch)
        # initial_lr rather than base_lrs: it travels with the optimizer's state dict, so a resumed run uses
        # the saved peaks whichever of optimizer / scheduler is loaded first.
        return [group["initial_lr"] * m for group in self.optimizer.param_groups]

    _get_closed_form_lr = get_lr  # the schedule is closed-form already (used by step(epoch))

    def state_dict(self) -> dict[str, Any]:
        """The step: ``{"last_epoch": n}``."""
        return {"last_epoch": self.last_epoch}

    def rescale(self, factor: float) -> None:
        """Scale every group's peak lr by ``factor`` and set the lr of the current step for it."""
        if factor != 1.0:
            for group in self.optimizer.param_groups:
                group["initial_lr"] *= factor
            self.load_state_dict(self.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Jump to the saved step and set every group's lr for it."""
        self.last_epoch = int(state_dict["last_epoch"])
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
                         for g in self.optimizer.param_groups]


class GroupSchedule:
    """Sets ``group[key] = fn(step)`` on an optimizer's param groups, like an lr scheduler for another knob.

    For optimizers that read the knob from their param groups at every step, e.g. ``"momentum"`` of torch's SGD or
    of :class:`~lmsprint.optim.Muon` with ``momentum_warmup=0``, or ``"alpha"`` of
    :class:`~lmsprint.optim.AdEMAMix` with ``alpha_warmup=0``. lmsprint's Muon and AdEMAMix normally run their
    warm-ups themselves (:func:`~lmsprint.optim.muon.muon_momentum`, :func:`~lmsprint.optim.ademamix.ademamix_alpha`,
    :func:`~lmsprint.optim.ademamix.ademamix_beta3` at each parameter's saved step), which the trainer relies on; do
    not schedule a knob twice. Only the groups that have ``key`` are touched. Step it once after every optimizer
    step, like the lr scheduler; the state dict holds only the step.

    Args:
        optimizer: The optimizer whose groups to set.
        key: Param-group entry to schedule.
        fn: Value as a function of the step, e.g. ``functools.partial(muon_momentum, momentum=0.95, warmup=300)``.

    Raises:
        ValueError: No param group has ``key``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, key: str, fn: Callable[[int], float]) -> None:
        if not any(key in g for g in optimizer.param_groups):
            raise ValueError(f"no param group of {type(optimizer).__name__} has a {key!r} entry to schedule")
        self.optimizer, self.key, self.fn = optimizer, key, fn
        self.last_epoch = 0
        self._apply()

    def _apply(self) -> None:
        value = self.fn(self.last_epoch)
        # looked up every time: optimizer.load_state_dict replaces the group dicts
        for group in (g for g in self.optimizer.param_groups if self.key in g):
            if isinstance(group[self.key], torch.Tensor):
                group[self.key].fill_(value)  # keep a tensor hyperparameter a tensor (capturable / fused paths)
            else:
                group[self.key] = value

    def step(self) -> None:
        """Advance one step and set the new value."""
        self.last_epoch += 1
        self._apply()

    def get_last_value(self) -> float:
        """The value set at the current step."""
        return self.fn(self.last_epoch)

    def state_dict(self) -> dict[str, Any]:
        """The step: ``{"last_epoch": n}``."""
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Jump to the saved step and set the value for it."""
        self.last_epoch = int(state_dict["last_epoch"])
        self._apply()


def build_schedule(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *, total_steps: int, peak_lr: float
) -> LRSchedule:
    """The learning-rate scheduler of a run.

    Args:
        optimizer: The run's optimizer; each group's current lr is taken as its peak.
        cfg: The schedule section of the run config.
        total_steps: Optimizer steps of the run.
        peak_lr: ``--optim.lr``, the peak of the main group (turns an absolute ``min_lr`` into a ratio that
            then applies to every group).

    Returns:
        A scheduler to ``step()`` once after every optimizer step.

    Raises:
        ConfigError: See :func:`resolve_schedule`.
    """
    return LRSchedule(optimizer, resolve_schedule(cfg, total_steps=total_steps, peak_lr=peak_lr))
