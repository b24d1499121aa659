"""The budget planner's arithmetic: the model size, global batch and step count that fit a wall-clock budget.

Pure functions of measured numbers. A candidate size's :class:`Cost` (seconds per step, per evaluation, per
checkpoint, the first step's extra) is measured on this machine by :mod:`lmsprint.training.throughput`; the plan
is run to its deadline by :mod:`lmsprint.training.budget`. The rules:

- **time**: a candidate trains for the seconds left once the start-up so far, its first step, the evaluations,
  the checkpoints and the finish (summary, plot, sample) are paid for;
- **data**: at most ``max_epochs`` passes over the corpus (Muennighoff et al. 2023, "Scaling Data-Constrained
  Language Models": up to ~4 epochs of repeated data are worth almost as much as fresh data, more are worth
  little), so a corpus too small for the budget gets a smaller model, not more repetition;
- **size**: of the candidates (smallest first), the one whose training tokens per parameter come nearest (in
  log) to the compute-optimal ratio: the largest model the budget can still train to that ratio;
- **batch**: the configured global batch, halved while the run would have fewer than :data:`MIN_STEPS` steps.

Parameters ``N`` are the non-embedding ones, the blocks' weight matrices (Kaplan et al. 2020's count): the
embedding and the output head scale with the vocabulary, not with what the model can learn, and would dominate
the count of a small model with a large vocabulary (a 64-wide model has 0.1M block parameters and 2.1M in a 32K
head). Their cost is not left out of the plan: it is in the measured step time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

CHINCHILLA_TOKENS_PER_PARAM = 20.0
"""Hoffmann et al. 2022: compute-optimal training uses about 20 tokens per parameter (their fit, at 70M-16B)."""
CPU_TOKENS_PER_PARAM = 20.0
"""The ratio the planner uses on a CPU: the best hand-picked size at 1, 2 and 4 minutes on 2 cores trained 9.0,
21.7 and 47.2 tokens per non-embedding parameter on stdlib (geometric mean 20.9; docs/budget.md)."""
MIN_STEPS = 400
"""The batch is halved while a plan has fewer steps than this (and more than MIN_ROWS rows). Measured on 2 CPU
cores (bench/results/budget-cpu, docs/budget.md): at 1-4 minute budgets, each of five runs halved to reach 400
steps ended 0.15-0.61 lower than the same model and time halved only to reach 200."""
MIN_ROWS = 4
"""The smallest global batch (rows) the planner halves to."""
FEWEST_STEPS = 20
"""A candidate that fits fewer steps than this in the budget does not fit at all."""
EVALUATIONS = 8
"""Evaluations spread over a planned run (plus the one at its end)."""


@dataclass(frozen=True)
class Cost:
    """What training one candidate costs on this machine, measured at ``rows`` rows per step.

    Attributes:
        params: N, the non-embedding parameters (the blocks' weight matrices).
        rows: the global batch (rows) ``step_s`` was measured at; the planner keeps tokens/s when it changes it.
        step_s: seconds per optimizer step.
        first_s: extra seconds of a run's first step and evaluation (compilation, warm-up).
        eval_s: seconds per evaluation of the run's validation tokens, with the ``best/`` save that may follow.
        save_s: seconds per checkpoint.
        finish_s: seconds after the last checkpoint: the summary, the loss plot and the closing sample.
    """

    params: int
    rows: int
    step_s: float
    first_s: float
    eval_s: float
    save_s: float
    finish_s: float

    def per_step(self, rows: int, ckpt_every: int) -> float:
        """Seconds per step of ``rows`` rows, periodic checkpoints included."""
        return self.step_s * rows / self.rows + (self.save_s / ckpt_every if ckpt_every else 0.0)

    def overhead(self, evaluations: int = EVALUATIONS) -> float:
        """Seconds of a run that are not steps: the first step's extra, the evaluations (and the one at the end),
        the final checkpoint and the finish."""
        return self.first_s + (evaluations + 1) * self.eval_s + self.save_s + self.finish_s


@dataclass(frozen=True)
class Fit:
    """A candidate's run at one batch size: steps, tokens and what limits them."""

    steps: int
    tokens: int
    ratio: float
    """Training tokens per parameter (0 when the candidate does not fit)."""
    limit: Literal["time", "data"]
    seconds: float
    """Predicted seconds of the run from the plan on (start-up before the plan excluded)."""


def fit(cost: Cost, *, seconds: float, rows: int, seq_len: int, max_tokens: int, ckpt_every: int) -> Fit:
    """The steps of ``rows`` rows a candidate can take in ``seconds``, within ``max_tokens`` training tokens."""
    per_step = cost.per_step(rows, ckpt_every)
    by_time = math.floor(max(0.0, seconds - cost.overhead()) / per_step)
    by_data = max_tokens // (rows * seq_len)
    steps = min(by_time, by_data)
    tokens = steps * rows * seq_len
    ratio = tokens / cost.params if steps >= FEWEST_STEPS else 0.0
    return Fit(steps=steps, tokens=tokens, ratio=ratio, limit="time" if by_time <= by_data else "data",
               seconds=cost.overhead() + steps * per_step)


def nearest(n: int, ratio_of: Callable[[int], float], target: float, *, start: int = 0) -> int:
    """The index of ``n`` sizes (smallest first) whose tokens per parameter is nearest ``target`` in log.

    ``ratio_of(i)`` falls as ``i`` grows (a larger model trains on fewer tokens in the same time and has more
    parameters), so the answer is one of the two sizes around the crossing; the walk starts at ``start`` (a good
    guess) and asks ``ratio_of`` (which may measure) only for the sizes it passes. Ties go to the smaller size; a
    size that does not fit (ratio 0) is never nearest unless none fits.
    """
    memo: dict[int, float] = {}

    def ratio(i: int) -> float:
        if i not in memo:
            memo[i] = ratio_of(i)
        return memo[i]

    i = min(max(start, 0), n - 1)
    if ratio(i) > target:
        while i + 1 < n and ratio(i + 1) > target:
            i += 1
        pair = [i, i + 1] if i + 1 < n else [i]
    else:
        while i > 0 and ratio(i - 1) <= target:
            i -= 1
        pair = [i - 1, i] if i > 0 else [i]

    def distance(j: int) -> float:
        r = ratio(j)
        return abs(math.log(r / target)) if r > 0 else math.inf

    return min(pair, key=lambda j: (distance(j), j))


@dataclass(frozen=True)
class Plan:
    """A planned run: what the planner picked and what it expects."""

    size: int
    """Index of the picked candidate."""
    params: int
    batch_size: int
    micro_batch_size: int | None
    steps: int
    tokens: int
    epochs: float
    tokens_per_param: float
    target: float
    """The compute-optimal tokens per parameter the size was picked for."""
    limit: Literal["time", "data"]
    eval_every: int
    budget: float
    """Seconds of the whole run."""
    spent: float
    """Seconds gone before the plan: start-up, data preparation, measuring."""
    expected: float
    """Predicted seconds of the whole run, start-up included."""
    breakdown: dict[str, float]
    """Predicted seconds of the first step's extra, the steps, the evaluations, the checkpoints, the finish."""
    measured: int
    """Candidates measured (or read from the cache) to pick the size."""


def plan(costs: Sequence[Callable[[], Cost]], *, budget: float, spent: float, corpus_tokens: int, seq_len: int,
         batch_size: int, micro_batch_size: int | None, ckpt_every: int, tokens_per_param: float,
         max_epochs: float, start: int = 0, min_steps: int = MIN_STEPS) -> Plan:
    """Pick the size, batch and steps of a run that fits ``budget - spent`` seconds (see the module's rules).

    Args:
        costs: per candidate size, smallest first, a function that measures it (called only for the sizes the
            search passes; memoise it if measuring is costly).
        budget: seconds of the whole run; spent: seconds already gone.
        corpus_tokens: training tokens of the corpus.
        seq_len, batch_size, micro_batch_size, ckpt_every: the run's settings.
        tokens_per_param: the compute-optimal ratio.
        max_epochs: the most passes over the corpus.
        start: the index to start the search at (a guess from a cheap estimate).
        min_steps: the batch is halved while the run has fewer steps (and more than MIN_ROWS rows).

    Raises:
        ValueError: not even the smallest candidate fits (the message says how long a budget it needs).
    """
    seconds = budget - spent
    max_tokens = math.floor(max_epochs * corpus_tokens)
    memo: dict[int, Cost] = {}

    def cost(i: int) -> Cost:
        if i not in memo:
            memo[i] = costs[i]()
        return memo[i]

    def fit_at(i: int, rows: int) -> Fit:
        return fit(cost(i), seconds=seconds, rows=rows, seq_len=seq_len, max_tokens=max_tokens, ckpt_every=ckpt_every)

    size = nearest(len(costs), lambda i: fit_at(i, batch_size).ratio, tokens_per_param, start=start)
    rows, micro = batch_size, micro_batch_size
    best = fit_at(size, rows)
    while best.steps < min_steps and rows % 2 == 0 and rows // 2 >= MIN_ROWS:
        halved = fit_at(size, rows // 2)
        if halved.steps < FEWEST_STEPS:
            break
        rows, best = rows // 2, halved
    if best.steps < FEWEST_STEPS:
        c = cost(size)
        need = spent + c.overhead() + FEWEST_STEPS * c.per_step(rows, ckpt_every)
        if max_tokens < FEWEST_STEPS * rows * seq_len:
            raise ValueError(f"the corpus ({corpus_tokens:,} tokens) is too small for {FEWEST_STEPS} steps of "
                             f"{rows} x {seq_len} tokens in {max_epochs:g} epochs; use more text or shorter rows")
        raise ValueError(f"the budget is too short: the smallest model needs about {math.ceil(need)}s for "
                         f"{FEWEST_STEPS} steps here ({spent:.0f}s of start-up included)")
    if micro is not None and rows % micro:
        micro = math.gcd(rows, micro)
    c = cost(size)
    per_step = c.per_step(rows, ckpt_every)
    breakdown = {"first step": c.first_s, "steps": best.steps * per_step, "evaluations": (EVALUATIONS + 1) * c.eval_s,
                 "checkpoint": c.save_s, "finish": c.finish_s}
    return Plan(size=size, params=c.params, batch_size=rows, micro_batch_size=micro, steps=best.steps,
                tokens=best.tokens, epochs=best.tokens / max(corpus_tokens, 1), tokens_per_param=best.tokens / c.params,
                target=tokens_per_param, limit=best.limit, eval_every=max(1, math.ceil(best.steps / EVALUATIONS)),
                budget=budget, spent=spent, expected=spent + best.seconds, breakdown=breakdown, measured=len(memo))


def scaled(cost: Cost, *, params: int, flops_ratio: float) -> Cost:
    """A cheap estimate of another size's cost from a measured one: time scales with FLOPs per token, checkpoint
    time with parameters (the first step's and the finish's extra are kept)."""
    return replace(cost, params=params, step_s=cost.step_s * flops_ratio, eval_s=cost.eval_s * flops_ratio,
                   save_s=cost.save_s * params / cost.params)
