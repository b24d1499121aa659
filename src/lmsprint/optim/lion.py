"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675).

Update, with one state buffer ``m`` (reference: google/automl ``lion_pytorch.py``)::

    p = p (1 - lr wd)                                  # decoupled decay, on the weights before the update
    p = p - lr * sign(b1 m + (1 - b1) g)
    m = b2 m + (1 - b2) g

Every coordinate moves by exactly ``lr``, so Lion wants a 3-10x lower lr than AdamW and, to keep the product
``lr * wd`` (the decay strength), a 3-10x higher weight decay.
"""

from __future__ import annotations

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


def lion_for_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float, beta1: float,
              beta2: float, weight_decay: float) -> None:
    """One Lion step per tensor."""
    for p, g, m in zip(params, grads, exp_avgs):
        p.mul_(1 - lr * weight_decay)
        p.add_(m.lerp(g, 1 - beta1).sign_(), alpha=-lr)
        m.lerp_(g, 1 - beta2)


def lion_foreach_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float, beta1: float,
                  beta2: float, weight_decay: float) -> None:
    """The same step with ``torch._foreach_*`` multi-tensor ops."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    updates = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
    torch._foreach_sign_(updates)
    torch._foreach_add_(params, updates, alpha=-lr)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)


LION_PATHS: dict[str, Callable[..., None]] = {"for": lion_for_, "foreach": lion_foreach_}


def _check(h: dict[str, Any]) -> None:
    check_lr(h["lr"])
    check_betas(h["betas"], 2)
    check_nonnegative("weight_decay", h["weight_decay"])


class Lion(Fp32StateOptimizer):
    """Lion: the sign of an interpolated momentum, with decoupled weight decay.

    State per parameter: ``exp_avg`` (float32 for bf16/fp16 parameters). Parameters whose ``grad`` is None are
    skipped.

    Args:
        params: Parameters or param-group dicts.
        lr: Learning rate (every coordinate moves by lr); typically 3-10x below AdamW's.
        betas: ``(beta1, beta2)``: interpolation weight of the update and decay of the momentum EMA.
        weight_decay: Decoupled decay ``p *= 1 - lr * weight_decay``; typically 3-10x above AdamW's.
        impl: ``for``, ``foreach`` or ``auto`` (foreach where torch has multi-tensor kernels, i.e. CUDA).
    """

    impls = ("auto", "for", "foreach")

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, impl: Literal["auto", "for", "foreach"] = "auto") -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay), impl=impl)

    check_hparams = staticmethod(_check)

    @classmethod
    def from_config(cls, groups: Groups, cfg: OptimConfig, *, total_steps: int, data_parallel: bool) -> Lion:
        return cls(groups, impl=cfg.impl, **config_betas(cfg))  # type: ignore[arg-type]

    def _group_step(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for p in params_with_grad(group):
            if not self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p))
            buckets[(p.device, state_dtype(p))].append(p)
        for (device, _), ps in buckets.items():
            impl = self.impl if self.impl != "auto" else ("foreach" if foreach_supported(device) else "for")
            works, grads = zip(*(compute_view(p) for p in ps))
            LION_PATHS[impl](list(works), list(grads), [self.state[p]["exp_avg"] for p in ps], lr=group["lr"],
                             beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])
            write_back(ps, works)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        return run_step(self, closure, self._group_step)
