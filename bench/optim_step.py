"""Optimizer step time and optimizer-state bytes per parameter on the gpt2-124m parameter set.

    PYTHONPATH=src python bench/optim_step.py --out optim_step.json            # on a GPU
    PYTHONPATH=src python bench/optim_step.py --device cpu --preset tiny       # smoke test

Each optimizer gets random gradients; the step is timed with device synchronisation on both sides, median of
``--iters`` steps after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lmsprint.config import ModelConfig, OptimConfig
from lmsprint.model import GPT, resolve_model_config
from lmsprint.optim import OPTIMIZERS, build_optimizer

LRS = {"adamw": 1e-3, "lion": 3e-4, "soap": 3e-3, "ademamix": 1e-3, "muon": 0.02}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif isinstance(v, (list, tuple)):
                total += sum(t.numel() * t.element_size() for t in v if isinstance(t, torch.Tensor))
    return total


def measure(name: str, model: GPT, *, iters: int, warmup: int, device: torch.device) -> dict:
    cfg = OptimConfig(name=name, lr=LRS[name], weight_decay=0.1)
    opt = build_optimizer(model.named_parameters(), cfg, total_steps=10_000)
    gen = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, device=device, generator=gen, dtype=p.dtype) * 1e-3
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    n = model.num_params()
    result = {"optimizer": name, "step_ms": 1000 * statistics.median(times), "state_bytes": state_bytes(opt),
              "state_bytes_per_param": state_bytes(opt) / n, "params": n, "iters": iters}
    del opt
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="optim_step.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    args = ap.parse_args()
    device = torch.device(args.device)
    mc = ModelConfig(preset=args.preset, tie_embeddings=False)
    model = GPT(resolve_model_config(mc, vocab_size=32768, block_size=1024)).to(device)
    model.init_weights(0)
    results = []
    for name in args.optimizers.split(","):
        iters = max(5, args.iters // 5) if name == "soap" else args.iters  # SOAP's steps are ~100x slower
        r = measure(name, model, iters=iters, warmup=min(args.warmup, iters), device=device)
        print(f"{name:9s} {r['step_ms']:8.2f} ms/step  {r['state_bytes_per_param']:5.1f} bytes/param")
        results.append(r)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "preset": args.preset, "untied": True}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
