"""Mixed precision: which mode a run can use on its device, and the autocast context of a forward pass."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls and attention run in under ``precision`` (fp32 for fp32)."""
    return {"bf16": torch.bfloat16, "bf16-pure": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def precision_unsupported(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` cannot run on ``device`` with this torch build, or None when it can.

    Probed rather than assumed: torch disables autocast with a warning for a dtype a device lacks, and
    GradScaler disables itself on a device it does not support (torch 2.13's CPU supports all four modes).
    """
    if precision not in ("bf16", "fp16", "bf16-pure"):
        return None
    dtype = compute_dtype(precision)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if precision in ("bf16", "fp16"):
            if not torch.amp.is_autocast_available(device.type):
                return f"torch {torch.__version__} has no autocast on {device.type}"
            with torch.autocast(device.type, dtype=dtype):
                pass
            if caught:
                return f"autocast on {device.type} does not support {dtype}"
        if precision == "fp16" and not torch.amp.GradScaler(device.type).is_enabled():
            return f"torch.amp.GradScaler does not run on {device.type}"
    try:
        torch.ones(2, dtype=dtype, device=device).sum()
    except RuntimeError:
        return f"{device.type} has no {dtype} tensors"
    return None


def resolve_precision(precision: str, device: torch.device, warn: Callable[[str], None]) -> str:
    """The precision a run uses: ``auto`` resolved, and an unsupported mode replaced (with one warning)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda" and precision in ("bf16", "bf16-pure") and not torch.cuda.is_bf16_supported():
        warn(f"warning: this GPU has no bf16; using fp16 with loss scaling instead of {precision}")
        precision = "fp16"
    reason = precision_unsupported(precision, device)
    if reason is not None:
        warn(f"warning: --train.precision={precision} is not available here ({reason}); training in fp32")
        return "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast for the bf16/fp16 modes; nothing for fp32 and bf16-pure (whose weights are bf16)."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=compute_dtype(precision))
    return contextlib.nullcontext()
