"""AdEMAMix (Pagliardini, Ablin & Grangier 2024, "The AdEMAMix Optimizer: Better, Faster, Older",
arXiv:2409.03137; reference code github.com/apple/ml-ademamix).

Adam plus a second, slow gradient EMA ``m2`` (decay ``beta3``, not bias-corrected) mixed in with weight
``alpha`` (paper Algorithm 1)::

    m1 = b1 m1 + (1 - b1) g      m2 = b3(t) m2 + (1 - b3(t)) g      nu = b2 nu + (1 - b2) g^2
    p  = p - lr * ((m1 / (1 - b1^t) + alpha(t) m2) / (sqrt(nu / (1 - b2^t)) + eps) + wd p)

``alpha(t)`` and ``b3(t)`` warm up over ``alpha_warmup`` / ``beta3_warmup`` steps (paper: both set to the run
length) with :func:`ademamix_alpha` / :func:`ademamix_beta3`, evaluated at
the 1-based step ``t`` as in Algorithm 1. The beta3 warm-up is the paper's formula (linear in ``1/log(beta)``,
i.e. in the EMA's half-life, as the reference code's ``linear_hl_warmup_scheduler``, which adds ``eps=1e-8``
inside the log); ``beta1 = 0`` takes the formula's limit.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lmsprint.config import OptimConfig
from lmsprint.optim.base import (
    Fp32StateOptimizer,
    Groups,
    check_betas,
    check_lr,
    check_nonnegative,
    compute_view,
    config_betas,
    foreach_supported,
    params_with_grad,
    run_step,
    state_dtype,
    write_back,
)


def ademamix_alpha(step: int, *, alpha: float, warmup: int) -> float:
    """AdEMAMix's linear alpha warm-up: ``min(step * alpha / warmup, alpha)`` (Pagliardini et al. 2024, Alg. 1)."""
    if warmup <= 0:
        return alpha
    return min(step * alpha / warmup, alpha)


def ademamix_beta3(step: int, *, beta1: float, beta3: float, warmup: int) -> float:
    """AdEMAMix's beta3 warm-up, linear in the EMA half-life between beta1 and beta3 (paper, Eq. 3 / Alg. 1)."""
    if warmup <= 0 or beta3 <= 0.0:  # beta3 = 0: the min() below gives 0 anyway
        return beta3
    frac = min(step / warmup, 1.0)
    if beta1 <= 0.0:  # the formula's limit as log(beta1) -> -inf (the reference code allows beta1 = 0)
        return 0.0 if frac == 0.0 else min(beta3 ** (1.0 / frac), beta3)
    log_b1, log_b3 = math.log(beta1), math.log(beta3)
    return min(math.exp(log_b1 * log_b3 / ((1.0 - frac) * log_b3 + frac * log_b1)), beta3)


def ademamix_for_(params: list[Tensor], grads: list[Tensor], exp_avg_fast: list[Tensor], exp_avg_slow: list[Tensor],
                  exp_avg_sqs: list[Tensor], *, step: int, lr: float, beta1: float, beta2: float, beta3: float,
                  alpha: float, eps: float, weight_decay: float) -> None:
    """One AdEMAMix step per tensor; ``beta3`` and ``alpha`` are this step's (warmed-up) values."""
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    for p, g, m1, m2, nu in zip(params, grads, exp_avg_fast, exp_avg_slow, exp_avg_sqs):
        m1.lerp_(g, 1 - beta1)
        m2.lerp_(g, 1 - beta3)
        nu.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (nu.sqrt() / bias_correction2_sqrt).add_(eps)
        numer = (m1 / bias_correction1).add_(m2, alpha=alpha)
        p.mul_(1 - lr * weight_decay)
        p.addcdiv_(numer, denom, value=-lr)


def ademamix_foreach_(params: list[Tensor], grads: list[Tensor], exp_avg_fast: list[Tensor],
                      exp_avg_slow: list[Tensor], exp_avg_sqs: list[Tensor], *, step: int, lr: float, beta1: float,
                      beta2: float, beta3: float, alpha: float, eps: float, weight_decay: float) -> None:
    """The same step with ``torch._foreach_*`` multi-tensor ops."""
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    torch._foreach_lerp_(exp_avg_fast, grads, 1 - beta1)
    torch._foreach_lerp_(exp_avg_slow, grads, 1 - beta3)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    numer = torch._foreach_div(exp_avg_fast, bias_correction1)
    torch._foreach_add_(numer, exp_avg_slow, alpha=alpha)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_addcdiv_(params, numer, denom, -lr)


ADEMAMIX_PATHS: dict[str, Callable[..., None]] = {"for": ademamix_for_, "foreach": ademamix_foreach_}


def _check(h: dict[str, Any]) -> None:
    check_lr(h["lr"])
    check_betas(h["betas"], 3)
    check_nonnegative("alpha", h["alpha"])
    check_nonnegative("eps", h["eps"])
    check_nonnegative("weight_decay", h["weight_decay"])
    for key in ("alpha_warmup", "beta3_warmup"):
        if h[key] is not None and not (isinstance(h[key], int) and h[key] >= 0):
            raise ValueError(f"{key} must be None or an int >= 0 (steps), got {h[key]!r}")


class AdEMAMix(Fp32StateOptimizer):
    """AdEMAMix: Adam whose numerator adds ``alpha`` times a slow (``beta3``) gradient EMA.

    State per parameter: ``step`` (int), ``exp_avg_fast``, ``exp_avg_slow``, ``exp_avg_sq`` (float32 for
    bf16/fp16 parameters). Parameters whose ``grad`` is None are skipped.

    Defaults are the paper's language-model settings (betas (0.9, 0.999, 0.9999), alpha 5; the reference code
    defaults to alpha 2). The paper applies the same decoupled decay as its AdamW baselines; the reference code
    defaults to ``weight_decay=0``, which is kept here.

    Args:
        params: Parameters or param-group dicts.
        lr: Learning rate.
        betas: ``(beta1, beta2, beta3)``: fast EMA, second moment, slow EMA.
        alpha: Weight of the slow EMA.
        beta3_warmup: Steps over which beta3 rises from beta1 to its value (None or 0 = no warm-up).
        alpha_warmup: Steps over which alpha rises linearly from 0 (None or 0 = no warm-up).
        eps: Added to the bias-corrected RMS in the denominator.
        weight_decay: Decoupled decay ``p *= 1 - lr * weight_decay``.
        impl: ``for``, ``foreach`` or ``auto`` (foreach where torch has multi-tensor kernels, i.e. CUDA).
    """

    impls = ("auto", "for", "foreach")

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float, float] = (0.9, 0.999, 0.9999), alpha: float = 5.0,
                 beta3_warmup: int | None = None, alpha_warmup: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 0.0, *, impl: Literal["auto", "for", "foreach"] = "auto") -> None:
        defaults = dict(lr=lr, betas=tuple(betas), alpha=alpha, beta3_warmup=beta3_warmup,
                        alpha_warmup=alpha_warmup, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, impl=impl)

    check_hparams = staticmethod(_check)

    @classmethod
    def from_config(cls, groups: Groups, cfg: OptimConfig, *, total_steps: int, data_parallel: bool) -> AdEMAMix:
        """Unset warm-ups span the whole run (the paper's choice)."""
        warmup = {k: total_steps if v is None else v
                  for k, v in (("alpha_warmup", cfg.alpha_warmup), ("beta3_warmup", cfg.beta3_warmup))}
        return cls(groups, alpha=cfg.alpha, eps=cfg.eps, impl=cfg.impl, **warmup, **config_betas(cfg))  # type: ignore

    def _group_step(self, group: dict[str, Any]) -> None:
        beta1, beta2, beta3 = group["betas"]
        buckets: dict[tuple[torch.device, torch.dtype, int], list[Tensor]] = defaultdict(list)
        for p in params_with_grad(group):
            st = self.state[p]
            if not st:
                st["step"] = 0
                for key in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"):
                    st[key] = torch.zeros_like(p, dtype=state_dtype(p))
            st["step"] += 1
            buckets[(p.device, state_dtype(p), st["step"])].append(p)
        for (device, _, step), ps in buckets.items():
            impl = self.impl if self.impl != "auto" else ("foreach" if foreach_supported(device) else "for")
            works, grads = zip(*(compute_view(p) for p in ps))
            ADEMAMIX_PATHS[impl](
                list(works), list(grads), *([self.state[p][k] for p in ps] for k in
                                            ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")),
                step=step, lr=group["lr"], beta1=beta1, beta2=beta2,
                beta3=ademamix_beta3(step, beta1=beta1, beta3=beta3, warmup=group["beta3_warmup"] or 0),
                alpha=ademamix_alpha(step, alpha=group["alpha"], warmup=group["alpha_warmup"] or 0),
                eps=group["eps"], weight_decay=group["weight_decay"])
            write_back(ps, works)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        return run_step(self, closure, self._group_step)
