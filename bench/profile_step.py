"""Where a training step's time goes: GPU kernel time by category over a few profiled steps.

    PYTHONPATH=src python bench/profile_step.py DATA --config fast --out profile.json

Categories: matmul (cuBLAS/CUTLASS GEMMs), attention (flash/cuDNN/FlexAttention kernels), optimizer (fused
Adam, foreach and Newton-Schulz kernels are matmuls: see note), other fused kernels (Triton: norms, activations,
loss, rotary), memory copies (host-to-device batches), and the gaps where the GPU waited for the host.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch

from lmsprint.config import build_config
from lmsprint.training.trainer import Callback, Trainer


def category(name: str) -> str:
    n = name.lower()
    if "memcpy" in n or "memset" in n:
        return "memory copies"
    if any(k in n for k in ("flash", "fmha", "flex", "attention", "cudnn")):
        return "attention"
    if any(k in n for k in ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "matmul", "cublas")):
        return "matmul"
    if any(k in n for k in ("adam", "multi_tensor", "foreach", "lion", "ademamix")):
        return "optimizer"
    if "nccl" in n:
        return "communication"
    if n.startswith("triton") or "triton" in n:
        return "fused (triton)"
    return "other kernels"


class _Profile(Callback):
    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                       torch.profiler.ProfilerActivity.CUDA])
        self.t0 = self.t1 = 0.0

    def on_grads(self, step: int, model: torch.nn.Module) -> None:
        if step == self.start:
            torch.cuda.synchronize()
            self.prof.start()
            self.t0 = time.perf_counter()
        elif step == self.stop:
            torch.cuda.synchronize()
            self.t1 = time.perf_counter()
            self.prof.stop()


def profile(data: str, recipe: str, overrides: list[str], *, start: int = 8, steps: int = 4) -> dict:
    cfg = build_config(recipe, [f"--data.source={data}", f"--train.steps={start + steps + 2}", "--train.epochs=none",
                                "--train.eval_every=0", "--log.progress=false", "--log.plot=false", *overrides])
    run_dir = Path("/tmp/lmsprint-profile")
    shutil.rmtree(run_dir, ignore_errors=True)
    cb = _Profile(start, start + steps)
    # the profiled window covers the backward of step `start` to the backward of step `start + steps`
    Trainer(cfg, run_dir, callbacks=[cb]).run()
    by_cat: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    for evt in cb.prof.key_averages():
        t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if t and evt.device_type == torch.autograd.DeviceType.CUDA:
            by_cat[category(evt.key)] += t / 1e3
            top[evt.key] += t / 1e3
    wall_ms = (cb.t1 - cb.t0) * 1e3
    busy = sum(by_cat.values())
    result = {"recipe": recipe, "steps": steps, "wall_ms_per_step": wall_ms / steps,
              "gpu_busy_ms_per_step": busy / steps,
              "idle_ms_per_step": max(0.0, wall_ms - busy) / steps,
              "categories_ms_per_step": {k: v / steps for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
              "top_kernels_ms_per_step": {k[:120]: v / steps
                                          for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:15]}}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--config", default="fast")
    ap.add_argument("--out", default="profile.json")
    args, overrides = ap.parse_known_args()
    result = profile(args.data, args.config, overrides)
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
