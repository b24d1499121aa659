"""AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization") with per-tensor, foreach and fused
paths.

Update (bias-corrected Adam with decoupled decay, identical to ``torch.optim.AdamW``)::

    m_t = b1 m + (1 - b1) g          v_t = b2 v + (1 - b2) g^2
    p_t = p (1 - lr wd) - lr / (1 - b1^t) * m_t / (sqrt(v_t / (1 - b2^t)) + eps)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lmsprint.config import OptimConfig
from lmsprint.optim.base import (
    Fp32StateOptimizer,
    Groups,
    Impl,
    check_betas,
    check_lr,
    check_nonnegative,
    compute_view,
    config_betas,
    params_with_grad,
    run_step,
    state_dtype,
    write_back,
)

# ----------------------------------------------------------------------------------------------------------
# AdamW maths: pure functions over tensors of one device and dtype that share one step count


def adamw_for_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
               step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step per tensor, in the same operation order as ``torch.optim.AdamW(foreach=False)``."""
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    step_size = lr / bias_correction1
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)


def adamw_foreach_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
                   step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """The same step with ``torch._foreach_*`` multi-tensor ops (one kernel launch per op on CUDA)."""
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -lr / bias_correction1)


def adamw_fused_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
                 step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """The same step with torch's fused kernel ``torch._fused_adamw_`` (one pass over each tensor)."""
    # the kernel reads the (already incremented) step from a tensor; all tensors here share one step count
    step_t = torch.full((), float(step), dtype=torch.float32, device=params[0].device)
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], [step_t] * len(params), lr=lr, beta1=beta1,
                        beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)


def fused_adamw_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._fused_adamw_`` runs on ``device`` (CUDA, and CPU since torch 2.4) for ``dtype``."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    floating = dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    return hasattr(torch, "_fused_adamw_") and floating and device.type in _get_fused_kernels_supported_devices()


ADAMW_PATHS: dict[str, Callable[..., None]] = {"for": adamw_for_, "foreach": adamw_foreach_, "fused": adamw_fused_}


def resolve_adamw_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto`` -> fused where torch has the kernel for this device/dtype, else foreach."""
    if impl == "auto":
        return "fused" if fused_adamw_supported(device, dtype) else "foreach"
    if impl == "fused" and not fused_adamw_supported(device, dtype):
        raise RuntimeError(f"impl='fused' has no kernel for {device.type}/{dtype} in torch {torch.__version__}; "
                           "use impl='foreach'")
    return impl


def adamw_group_step(state: dict[Tensor, dict[str, Any]], group: dict[str, Any], impl: str) -> None:
    """Update one param group with AdamW: lazy state, float32 maths for low-precision params, chosen path.

    Also used by :class:`~lmsprint.optim.muon.MuonWithAuxAdamW` for its non-Muon groups.
    """
    beta1, beta2 = group["betas"]
    buckets: dict[tuple[torch.device, torch.dtype, int], list[Tensor]] = defaultdict(list)
    for p in params_with_grad(group):
        st = state[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
        st["step"] += 1
        buckets[(p.device, state_dtype(p), st["step"])].append(p)
    for (device, dtype, step), ps in buckets.items():
        works, grads = zip(*(compute_view(p) for p in ps))
        ADAMW_PATHS[resolve_adamw_impl(impl, device, dtype)](
            list(works), list(grads), [state[p]["exp_avg"] for p in ps], [state[p]["exp_avg_sq"] for p in ps],
            step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        write_back(ps, works)


def check_adamw_hparams(h: dict[str, Any]) -> None:
    check_lr(h["lr"])
    check_betas(h["betas"], 2)
    check_nonnegative("eps", h["eps"])
    check_nonnegative("weight_decay", h["weight_decay"])


class AdamW(Fp32StateOptimizer):
    """AdamW: Adam with decoupled weight decay; matches ``torch.optim.AdamW`` to float32 rounding.

    State per parameter: ``step`` (int), ``exp_avg``, ``exp_avg_sq`` (float32 for bf16/fp16 parameters, whose
    update is computed in float32 and written back). Parameters whose ``grad`` is None are skipped.

    Args:
        params: Parameters or param-group dicts (a group may override any hyperparameter).
        lr: Learning rate, read from the group at every step (so LR schedulers work).
        betas: Decay rates of the first and second moment EMAs.
        eps: Added to the bias-corrected RMS in the denominator.
        weight_decay: Decoupled decay; each step multiplies the weights by ``1 - lr * weight_decay``.
        impl: ``for`` (per tensor, the reference), ``foreach`` (multi-tensor ops), ``fused``
            (``torch._fused_adamw_``; CUDA, and CPU in torch >= 2.4) or ``auto`` (fused where available, else
            foreach).
    """

    impls = ("auto", "for", "foreach", "fused")

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, impl: Impl = "auto") -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), impl=impl)

    check_hparams = staticmethod(check_adamw_hparams)

    @classmethod
    def from_config(cls, groups: Groups, cfg: OptimConfig, *, total_steps: int, data_parallel: bool) -> AdamW:
        return cls(groups, eps=cfg.eps, impl=cfg.impl, **config_betas(cfg))  # type: ignore[arg-type]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        return run_step(self, closure, lambda group: adamw_group_step(self.state, group, self.impl))
