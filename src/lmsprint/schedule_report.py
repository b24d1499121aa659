"""``lmsprint schedule``: the learning rate of a config at chosen steps, as a table and optionally a figure."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lmsprint.config import ScheduleConfig
from lmsprint.errors import ConfigError
from lmsprint.plots import check_figure_path, plot_schedule
from lmsprint.schedules import Schedule, resolve_schedule

COMPARE_SHAPES = ("cosine", "sqrt", "linear", "wsd")
"""The shapes ``lmsprint schedule --compare`` draws."""


def _default_steps(s: Schedule) -> list[int]:
    return sorted({0, s.warmup, s.decay_start, (s.decay_start + s.total) // 2, s.total - 1, s.total})


def schedule_report(
    cfg: ScheduleConfig,
    *,
    peak_lr: float,
    total_steps: int,
    at_steps: list[int] | None = None,
    png: Path | None = None,
    compare: bool = False,
) -> str:
    """What ``lmsprint schedule`` prints: the lr at chosen steps, and optionally a plot of the whole run.

    Args:
        cfg: The schedule section of the run config.
        peak_lr: Peak learning rate (``--optim.lr``).
        total_steps: Optimizer steps of the run.
        at_steps: Steps to tabulate (default: start, end of warm-up, start and middle of the decay, last update,
            end). Step ``s`` is the lr of optimizer update ``s``; step ``total_steps`` is the floor.
        png: If given, draw the schedule to this PNG file.
        compare: Tabulate and draw cosine, sqrt, linear and wsd with the same warm-up and floor, side by side.

    Returns:
        A text table, one row per step.

    Raises:
        ConfigError: The settings do not fit the run (see :func:`resolve_schedule`) or a step is negative.
    """
    if png is not None:
        check_figure_path(png)
    main = resolve_schedule(cfg, total_steps=total_steps, peak_lr=peak_lr)
    if compare:
        # same warm-up and floor for every shape; wsd uses the configured cool-down, and is left out when
        # that cool-down would overlap the warm-up
        scheds = {main.shape: main}
        for shape in COMPARE_SHAPES:
            try:
                scheds.setdefault(shape, resolve_schedule(replace(cfg, name=shape, warmup_steps=main.warmup),
                                                          total_steps=total_steps, peak_lr=peak_lr))
            except ConfigError:
                pass
    else:
        scheds = {main.shape: main}
    steps = _default_steps(main) if at_steps is None else list(at_steps)
    for s in steps:
        if s < 0:
            raise ConfigError(f"schedule step {s} is negative; steps count from 0 (the first update)")

    header = (f"{main.shape} schedule: peak {peak_lr:.4g}, {total_steps} steps, warm-up {main.warmup} steps "
              f"from {main.start_factor:g} x peak, floor {main.floor * peak_lr:.4g} ({main.floor:g} x peak)")
    if main.shape == "wsd":
        header += f", cool-down ({main.decay_shape}) from step {main.decay_start}"
    rows = [["step"] + ([f"lr:{sh}" for sh in scheds] if compare else ["lr", "x_peak"])]
    for s in steps:
        if compare:
            rows.append([str(s)] + [f"{peak_lr * fn(s):.4e}" for fn in scheds.values()])
        else:
            rows.append([str(s), f"{peak_lr * main(s):.4e}", f"{main(s):.4f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)

    if png is not None:
        plot_schedule(scheds, main, peak_lr=peak_lr, steps=steps, path=Path(png))
    return f"{header}\n{table}"
