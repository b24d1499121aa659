"""What a model shape costs on this machine: a few timed training steps and one timed evaluation micro-batch,
measured with the run's own settings (device, precision, compile, optimizer, batch) and cached in lmsprint's cache
directory (``throughput.json``), keyed by the device, the torch version and everything the time depends on.

The budget planner (:mod:`lmsprint.planner`) turns these into a plan; a run corrects any error of the measurement
as it goes (:class:`lmsprint.training.budget.Budget` times every step).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from lmsprint import distributed as D
from lmsprint.config import RunConfig
from lmsprint.data.loader import MicroBatch, StepBatch
from lmsprint.data.sources import read_cached_json, write_cached_json
from lmsprint.model import GPT, GPTConfig, build_model
from lmsprint.optim import build_optimizer
from lmsprint.planner import Cost
from lmsprint.training.precision import resolve_precision
from lmsprint.training.step import clip_gradients, evaluate_loss, forward_backward

WRITE_BYTES_PER_S = 200e6
"""Checkpoint write speed assumed before a run has timed one of its own (fsynced safetensors + torch.save)."""
FINISH_S = {"cpu": 2.0, "cuda": 8.0}
"""Seconds of the summary, the loss plot and the process's exit, beside the closing sample, by device type: 1-3.5 s
measured on this project's 2 loaded CPU cores (matplotlib's import included); on the H200 (2026-12-05, a 2-minute
budget) 8.8 s passed from the summary to the process's exit, the sample included (CUDA and compile-worker
teardown)."""
SAMPLE_TOKENS = 200
"""Tokens of the sample `lmsprint train` prints at the end (the finish includes generating them)."""
TIMED_TOKENS = 8
"""Tokens generated to time the closing sample (which generates SAMPLE_TOKENS, one forward pass each)."""
MIN_TIMED_S = 0.5
"""Timed steps run for at least this long (and at least 3 steps, at most 30)."""


def device_name(device: torch.device) -> str:
    """The device as the cache knows it: the GPU's name, or the CPU's model and the intra-op threads used."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"{model} ({n} thread{'s' if n != 1 else ''})"


def cache_key(cfg: RunConfig, gpt: GPTConfig, *, device: torch.device, rows: int, micro: int, eval_rows: int) -> str:
    """Everything the measured times depend on, as one string."""
    t = cfg.train
    what = {"device": device_name(device), "torch": torch.__version__, "model": asdict(gpt), "rows": rows,
            "micro": micro, "eval_rows": eval_rows, "precision": t.precision, "compile": t.compile,
            "optim": cfg.optim.name, "ckpt": "v1"}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


CACHE = "throughput.json"


def cached(key: str) -> Cost | None:
    """A measurement made before, or None."""
    try:
        entry = read_cached_json(CACHE)[key]
        return Cost(**{k: entry[k] for k in Cost.__dataclass_fields__})
    except (KeyError, TypeError):
        return None


def remember(key: str, cost: Cost, *, what: str) -> None:
    """Add a measurement to the cache."""
    known = read_cached_json(CACHE)
    known[key] = {**asdict(cost), "what": what, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_cached_json(CACHE, known)


STALE_RATIO = 2.0
"""A run whose steps take this many times longer (or shorter) than its plan's measurement said drops the cached
measurements of its machine: they were taken under another load (seen: a plan from measurements made while
another training job shared the 2 CPU cores, 14x too slow, picked a model 0.3 worse than the best)."""


def forget_if_stale(cost: Cost, *, rows: int, measured: float | None, device: torch.device) -> str | None:
    """After a planned run: if its median step time (``measured``, at ``rows`` rows) is off the plan's ``cost``
    by STALE_RATIO or more, drop this device's cached measurements, so the next plan measures afresh; returns the
    line to print then, else None."""
    if measured is None or measured <= 0 or cost.step_s <= 0:
        return None
    expected = cost.per_step(rows, 0)
    if max(measured / expected, expected / measured) < STALE_RATIO:
        return None
    known = read_cached_json(CACHE)
    prefix = f"{device_name(device)}:"
    kept = {k: v for k, v in known.items() if not (isinstance(v, dict) and str(v.get("what", "")).startswith(prefix))}
    write_cached_json(CACHE, kept)
    dropped = len(known) - len(kept)
    return (f"note: a step took {measured:.3g}s, the plan's measurement said {expected:.3g}s; the {dropped} throughput "
            f"measurements cached for {device_name(device)} are dropped and the next plan measures afresh")


def block_params(gpt: GPTConfig) -> tuple[int, float]:
    """(N, the non-embedding parameters, and the training FLOPs per token at full length) of a shape, counted on a
    model without storage: the matmul weights but the output head's."""
    with torch.device("meta"):
        model = GPT(gpt)
    return model.num_params(matmul_only=True) - model.lm_head.weight.numel(), model.flops_per_token(gpt.block_size)


def measure(cfg: RunConfig, gpt: GPTConfig, *, device: torch.device, rows: int, micro: int, eval_rows: int) -> Cost:
    """Time a few training steps of ``rows`` rows (micro-batches of ``micro``) and one evaluation micro-batch of a
    model of shape ``gpt`` with the run's precision, compile setting and optimizer, on random tokens.

    Args:
        eval_rows: rows of the run's validation set (the evaluation time scales with them).
    """
    t = cfg.train
    precision = resolve_precision(t.precision, device, lambda _: None)
    _, amp = D.mixed_precision(cfg.dist.strategy, precision, 1)
    dtype = torch.bfloat16 if precision == "bf16-pure" else None
    model = build_model(gpt, device=device, seed=t.seed, dtype=dtype)
    sample_s = SAMPLE_TOKENS * _generation_time(model, device) / TIMED_TOKENS  # eager, as `lmsprint sample` runs
    if t.compile:
        torch._dynamo.reset()
        model.compile_blocks()
    optimizer = build_optimizer(model.named_parameters(), cfg.optim, total_steps=1000, data_parallel=False)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, gpt.vocab_size, (micro, gpt.block_size + 1), generator=gen)
    mb = MicroBatch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()).to(device)
    n = rows * gpt.block_size
    batch = StepBatch(micro=[mb] * (rows // micro), n_targets=n, n_tokens=n, seq_len=gpt.block_size, sequences=rows,
                      n_slots=n, attn_len=gpt.block_size / 2)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step() -> float:
        t0 = time.perf_counter()
        forward_backward(model, batch, strategy="ddp", amp=amp, device=device, scaler=None, on_loss=lambda x: x)
        clip_gradients(model, optimizer, None, clip_norm=t.clip_norm, clip_value=t.clip_value)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0

    def eval_micro() -> float:
        t0 = time.perf_counter()
        evaluate_loss(model, [mb], amp=amp, device=device)
        sync()
        return time.perf_counter() - t0

    first = train_step()
    first_eval = eval_micro()
    times: list[float] = []
    while len(times) < 30 and (len(times) < 3 or sum(times) < MIN_TIMED_S):
        times.append(train_step())
    step_s = statistics.median(times)
    eval_one = min(eval_micro() for _ in range(2))
    params, _ = block_params(gpt)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    best_s = weights / WRITE_BYTES_PER_S
    first_s = max(0.0, first - step_s) + max(0.0, first_eval - eval_one)
    finish_s = FINISH_S.get(device.type, FINISH_S["cpu"]) + sample_s
    return Cost(params=params, rows=rows, step_s=step_s, first_s=first_s, finish_s=finish_s,
                eval_s=math.ceil(eval_rows / micro) * eval_one + best_s, save_s=(weights + state) / WRITE_BYTES_PER_S)


def _generation_time(model: GPT, device: torch.device) -> float:
    """Seconds to generate TIMED_TOKENS tokens one by one from half a row of context (the closing sample's mean)."""
    idx = torch.zeros((1, model.config.block_size // 2), dtype=torch.long, device=device)
    model.generate(idx, 1, top_k=50)  # warm-up
    t0 = time.perf_counter()
    model.generate(idx, TIMED_TOKENS, top_k=50)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def cost_of(cfg: RunConfig, gpt: GPTConfig, *, device: torch.device, rows: int, micro: int, eval_rows: int,
            on_measure: Callable[[GPTConfig], None] | None = None) -> tuple[Cost, bool]:
    """(the cost of a shape, whether it came from the cache): measured once per device and shape, then cached."""
    key = cache_key(cfg, gpt, device=device, rows=rows, micro=micro, eval_rows=eval_rows)
    found = cached(key)
    if found is not None:
        return found, True
    if on_measure is not None:
        on_measure(gpt)
    cost = measure(cfg, gpt, device=device, rows=rows, micro=micro, eval_rows=eval_rows)
    remember(key, cost, what=f"{device_name(device)}: {gpt.n_layer}x{gpt.n_embd} rows {rows} seq {gpt.block_size}")
    return cost, False
