"""The plan of a budgeted run (``--train.budget``), made before it trains.

:func:`plan_run` prepares the data, measures (or reads from the cache) what candidate sizes cost on this machine
(:mod:`lmsprint.training.throughput`) and lets :func:`lmsprint.planner.plan` pick the model, batch and steps; the
planned config is an ordinary config with a wsd schedule, which :class:`lmsprint.training.budget.Budget` then
keeps to the deadline.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lmsprint import distributed as D
from lmsprint import planner
from lmsprint.config import RunConfig, validate
from lmsprint.data.batching import TokenStream
from lmsprint.data.prepare import prepared_data
from lmsprint.errors import ConfigError
from lmsprint.model import resolve_model_config
from lmsprint.model.presets import ladder
from lmsprint.schedules import resolve_schedule
from lmsprint.training.batches import check_streams, micro_batch_rows
from lmsprint.training.budget import ONE_PROCESS, Timer, budget_seconds, clock_text
from lmsprint.training.throughput import block_params, cost_of, device_name


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

    def record(self) -> dict[str, Any]:
        """The ``plan`` record of metrics.jsonl."""
        p = self.plan
        return dict(budget=p.budget, spent=p.spent, expected=p.expected, steps=p.steps, batch=p.batch_size,
                    shape=list(self.shape), tokens=p.tokens, epochs=p.epochs, params=p.params,
                    tokens_per_param=p.tokens_per_param, target=p.target, limit=p.limit, breakdown=p.breakdown)

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
        # sizes too shallow for the value embeddings asked for are no candidates (model_shape would refuse them)
        self.shapes = [s for s in ladder() if s.n_layer >= 2 * cfg.model.value_embeds] if picks_size(cfg) else [None]
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
    train_stream = TokenStream(data.train)
    check_streams(cfg, train_stream, TokenStream(data.val))  # before any candidate is built on data that cannot work
    if timer.elapsed() >= budget:
        raise ConfigError(f"--train.budget={t.budget}: {clock_text(timer.elapsed())} of it went to start-up and data "
                          "preparation before planning; give a longer budget")
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


