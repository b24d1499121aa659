"""Metrics: the JSONL log every run writes, an optional TensorBoard sink, and the MFU denominator."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from lmsprint.data.sources import cache_root
from lmsprint.errors import ConfigError


class MetricsLog:
    """Appends one JSON object per line to ``RUN/metrics.jsonl`` (and mirrors scalars to TensorBoard)."""

    def __init__(self, path: Path, *, tensorboard: bool = False) -> None:
        self.path = path
        self._f = open(path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--log.tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._tb = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, kind: str, **values: Any) -> None:
        record = {"kind": kind, **values}
        self._f.write(json.dumps(record, default=float) + "\n")
        if self._tb is not None and "step" in values:
            for key, v in values.items():
                if key != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{key}", v, values["step"])

    def replay_from(self, step: int) -> None:
        """A resume or rollback logs steps >= ``step`` again: TensorBoard hides the abandoned attempt's events of
        those steps (readers of metrics.jsonl keep the last record of each step)."""
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a line cut short by a crash is skipped)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def measure_peak_flops(device: torch.device, *, n: int = 8192, iters: int = 10) -> float:
    """Dense bf16 matmul FLOP/s of the GPU, measured on random data (as the H200's 790 TFLOP/s was)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start)


def peak_flops(device: torch.device, configured_tflops: float | None = None) -> float | None:
    """The MFU denominator: the configured peak, or the measured one (cached per GPU model); None on CPU."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    cache = cache_root() / "peak_flops.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if name not in known:
        known[name] = measure_peak_flops(device)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known, indent=2))
        except OSError:
            pass
    return float(known[name])
