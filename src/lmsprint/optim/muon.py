"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
kellerjordan.github.io/posts/muon; reference code github.com/KellerJordan/Muon) and its combination with AdamW.

Muon runs SGD with (Nesterov) momentum and replaces each 2-D update by an approximately orthogonal matrix
(``U V^T`` of its SVD) computed with a quintic Newton-Schulz iteration, scaled by the matrix shape::

    buf = lerp(buf, g, 1 - momentum)                      # buf = momentum buf + (1 - momentum) g
    u   = lerp(g, buf, momentum) if nesterov else buf
    u   = NS5(u) * max(1, rows / cols) ** 0.5             # adjust_lr_fn="original" (reference)
    p   = p (1 - lr wd) - lr u

``adjust_lr_fn="match_rms_adamw"`` uses ``0.2 * sqrt(max(rows, cols))`` instead, which gives the update the RMS
of a typical AdamW update (Liu et al. 2025, "Muon is Scalable for LLM Training") so AdamW learning rates and
weight decay carry over.

Muon is for hidden matrices only: embeddings, the output head, norm gains and biases go to AdamW.
:class:`MuonWithAuxAdamW` does both in ONE optimizer (one ``state_dict``, one LR scheduler over all groups),
like the reference's ``MuonWithAuxAdam``: each param group carries ``use_muon``.

The Newton-Schulz iteration and the per-matrix update are pure functions (:func:`zeropower_via_newtonschulz5`,
:func:`muon_update`) so a distributed version can call them on each rank's subset of the matrices.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lmsprint.config import OptimConfig
from lmsprint.optim.adamw import AdamW, adamw_group_step, check_adamw_hparams
from lmsprint.optim.base import (
    Fp32StateOptimizer,
    Groups,
    Impl,
    check_lr,
    check_nonnegative,
    compute_view,
    config_betas,
    params_with_grad,
    run_step,
    state_dtype,
    write_back,
)
from lmsprint.optim.spread import local, map_matrices, spread_over_ranks

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
AdjustLr = Literal["original", "match_rms_adamw"]
MuonImpl = Literal[Impl, "compiled"]


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, *, dtype: torch.dtype = torch.bfloat16,
                                eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise ``G`` (``U V^T`` of its SVD) with the quintic Newton-Schulz iteration.

    The coefficients maximise the slope at zero rather than converging exactly, so the singular values end up
    roughly in [0.5, 1.5], which the reference found not to hurt. Batched over leading dimensions.

    Args:
        G: A matrix, or a batch of matrices ``(..., rows, cols)``.
        steps: Number of iterations.
        dtype: Dtype of the iteration: bfloat16 on GPU as the reference (stable there); float32 for exact tests.
        eps: Guards the initial normalisation of an all-zero matrix.

    Returns:
        A tensor of ``G``'s shape in ``dtype``.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # Frobenius norm >= spectral norm, so ||X||_2 <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


def muon_scale(rows: int, cols: int, adjust_lr_fn: AdjustLr = "original") -> float:
    """Shape factor of the orthogonalised update: ``max(1, rows/cols)**0.5`` or ``0.2 * sqrt(max(rows, cols))``."""
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")


def muon_update(grad: Tensor, momentum_buffer: Tensor, *, momentum: float = 0.95, nesterov: bool = True,
                ns_steps: int = 5, ns_dtype: torch.dtype = torch.bfloat16,
                adjust_lr_fn: AdjustLr = "original") -> Tensor:
    """Muon's update direction for one matrix (updates ``momentum_buffer`` in place; ``grad`` is not modified).

    Same maths as the reference ``muon_update`` (which blends into ``grad`` in place). Tensors with more than two
    dimensions are orthogonalised as ``(shape[0], rest)`` matrices.

    Returns:
        The scaled, orthogonalised update in ``ns_dtype``, shaped like ``grad``.
    """
    momentum_buffer.lerp_(grad, 1 - momentum)
    update = grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer
    matrix = update.reshape(len(update), -1)
    out = zeropower_via_newtonschulz5(matrix, ns_steps, dtype=ns_dtype)
    return (out * muon_scale(*matrix.shape, adjust_lr_fn)).reshape(grad.shape)


def muon_for_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *, lr: float, weight_decay: float,
              momentum: float, nesterov: bool, ns_steps: int, ns_dtype: torch.dtype,
              adjust_lr_fn: AdjustLr) -> None:
    """One Muon step per matrix."""
    for p, g, buf in zip(params, grads, bufs):
        update = muon_update(g, buf, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype,
                             adjust_lr_fn=adjust_lr_fn)
        p.mul_(1 - lr * weight_decay)
        p.add_(update.to(p.dtype), alpha=-lr)


_compiled_ns: Callable[..., Tensor] | None = None


def compiled_newtonschulz5() -> Callable[..., Tensor]:
    """:func:`zeropower_via_newtonschulz5` through torch.compile (built once per process; one graph per shape)."""
    global _compiled_ns
    if _compiled_ns is None:
        _compiled_ns = torch.compile(zeropower_via_newtonschulz5, dynamic=False, fullgraph=True)
    return _compiled_ns


def muon_batched_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *, lr: float, weight_decay: float,
                  momentum: float, nesterov: bool, ns_steps: int, ns_dtype: torch.dtype,
                  adjust_lr_fn: AdjustLr, compiled: bool = False) -> None:
    """The same step for matrices of ONE shape: foreach momentum and one batched Newton-Schulz iteration
    (``compiled``: the iteration through torch.compile, its matmuls and elementwise steps fused by Inductor)."""
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    updates = torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs
    stacked = torch.stack(updates).flatten(2)  # (n, rows, cols)
    ns = compiled_newtonschulz5() if compiled else zeropower_via_newtonschulz5
    ortho = ns(stacked, ns_steps, dtype=ns_dtype)
    ortho = (ortho * muon_scale(stacked.size(1), stacked.size(2), adjust_lr_fn)).to(params[0].dtype)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, [u.reshape(p.shape) for u, p in zip(ortho.unbind(0), params)], alpha=-lr)


def muon_momentum(step: int, *, momentum: float, warmup: int, start: float = 0.85) -> float:
    """Muon's momentum warm-up (modded-nanogpt): linear from ``start`` to ``momentum`` over ``warmup`` steps."""
    if warmup <= 0:
        return momentum
    frac = min(step / warmup, 1.0)
    return (1.0 - frac) * start + frac * momentum


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (as the reference), float32 elsewhere (CPU bf16 matmuls are slow and gain nothing)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def muon_group_step(state: dict[Tensor, dict[str, Any]], group: dict[str, Any], impl: str,
                    ns_dtype: torch.dtype | None, data_parallel: bool = False) -> None:
    """Update one group of matrices with Muon: lazy state, float32 maths for low-precision params.

    ``impl="for"`` orthogonalises matrix by matrix; anything else batches matrices of equal shape (``compiled``:
    with the Newton-Schulz iteration compiled, on CUDA; elsewhere it is the batched eager path).
    The momentum at a parameter's ``k``-th step (0-based) is ``muon_momentum(k, ...)``. FSDP2 shards, and
    whole tensors with ``data_parallel`` on several ranks, go to :func:`muon_group_step_distributed`.
    """
    if spread_over_ranks(group["params"], data_parallel):
        muon_group_step_distributed(state, group, ns_dtype)
        return
    buckets: dict[tuple[torch.device, torch.dtype, torch.Size, int], list[Tensor]] = defaultdict(list)
    for p in params_with_grad(group):
        st = state[p]
        if not st:
            st["step"] = 0
            st["momentum_buffer"] = torch.zeros_like(p, dtype=state_dtype(p))
        buckets[(p.device, state_dtype(p), p.shape, st["step"])].append(p)
        st["step"] += 1
    for (device, _, _, step), ps in buckets.items():
        works, grads = zip(*(compute_view(p) for p in ps))
        compiled = {"compiled": impl == "compiled" and device.type == "cuda"} if impl != "for" else {}
        path = muon_for_ if impl == "for" else muon_batched_
        path(list(works), list(grads), [state[p]["momentum_buffer"] for p in ps], lr=group["lr"],
             weight_decay=group["weight_decay"],
             momentum=muon_momentum(step, momentum=group["momentum"], warmup=group["momentum_warmup"]),
             nesterov=group["nesterov"], ns_steps=group["ns_steps"],
             ns_dtype=ns_dtype or default_ns_dtype(device), adjust_lr_fn=group["adjust_lr_fn"], **compiled)
        write_back(ps, works)


def muon_group_step_distributed(state: dict[Tensor, dict[str, Any]], group: dict[str, Any],
                                ns_dtype: torch.dtype | None) -> None:
    """The same update with the Newton-Schulz work spread over data-parallel ranks.

    Each rank keeps the momentum of its own tensors (whole under DDP, its row shards under FSDP2) and computes
    the Nesterov blend locally; every matrix is then orthogonalised on one rank and the results sent back
    (:func:`lmsprint.optim.spread.map_matrices`: an all-gather under DDP, two all-to-alls under FSDP2). Every
    rank must call it with the same parameters.
    """
    params = params_with_grad(group)
    if not params:
        return
    works, blends = [], []
    for p in params:
        st = state[p]
        if not st:
            st["step"] = 0
            st["momentum_buffer"] = torch.zeros_like(p, dtype=state_dtype(p))
        momentum = muon_momentum(st["step"], momentum=group["momentum"], warmup=group["momentum_warmup"])
        st["step"] += 1
        dtype = state_dtype(p)
        mine = local(p)
        works.append(mine if mine.dtype == dtype else mine.to(dtype))
        grad, buf = local(p.grad).to(dtype), local(st["momentum_buffer"])  # type: ignore[union-attr]
        buf.lerp_(grad, 1 - momentum)
        blends.append(grad.lerp(buf, momentum) if group["nesterov"] else buf)
    dtype = ns_dtype or default_ns_dtype(params[0].device)

    def orthogonalise(X: Tensor) -> Tensor:  # (k, rows, cols)
        scale = muon_scale(X.size(1), X.size(2), group["adjust_lr_fn"])
        return zeropower_via_newtonschulz5(X, group["ns_steps"], dtype=dtype) * scale

    updates = map_matrices(orthogonalise, blends, params, dtype=dtype)
    lr, weight_decay = group["lr"], group["weight_decay"]
    for p, work, update in zip(params, works, updates):
        work.mul_(1 - lr * weight_decay)
        work.add_(update.to(work.dtype).view(work.shape), alpha=-lr)
        mine = local(p)
        if work is not mine:
            mine.copy_(work)


MUON_DEFAULTS: dict[str, Any] = dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                                     momentum_warmup=0, adjust_lr_fn="original")
AUX_ADAMW_DEFAULTS: dict[str, Any] = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)


def check_muon_hparams(h: dict[str, Any]) -> None:
    check_lr(h["lr"])
    if not 0.0 <= h["momentum"] < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {h['momentum']!r}")
    check_nonnegative("weight_decay", h["weight_decay"])
    if not (isinstance(h["ns_steps"], int) and h["ns_steps"] >= 1):
        raise ValueError(f"ns_steps must be an int >= 1, got {h['ns_steps']!r}")
    if not (isinstance(h["momentum_warmup"], int) and h["momentum_warmup"] >= 0):
        raise ValueError(f"momentum_warmup must be an int >= 0 (steps), got {h['momentum_warmup']!r}")
    muon_scale(1, 1, h["adjust_lr_fn"])


def check_matrices(params: Iterable[Tensor]) -> None:
    for p in params:
        if p.ndim < 2:
            raise ValueError(f"Muon optimises matrices only, got a parameter of shape {tuple(p.shape)}; put "
                             "1-D tensors in an AdamW group (MuonWithAuxAdamW with use_muon=False)")


def _listed(param_group: dict[str, Any]) -> dict[str, Any]:
    """A copy of the group whose ``params`` is a list (a generator would be used up by the checks)."""
    params = param_group["params"]
    if isinstance(params, Tensor):
        params = [params]
    elif not isinstance(params, set):  # torch rejects sets (unordered); let it say so
        params = list(params)
    return {**param_group, "params": params}


class Muon(Fp32StateOptimizer):
    """Muon for hidden matrices (2-D, or N-D viewed as ``(shape[0], rest)``).

    State per parameter: ``step`` (int, for the momentum warm-up) and ``momentum_buffer`` (float32 for bf16/fp16
    parameters). Parameters whose ``grad`` is None are skipped.

    Args:
        params: Parameters or param-group dicts; every tensor must have ndim >= 2.
        lr: Learning rate, in units of spectral norm per update (with ``adjust_lr_fn="original"``).
        momentum: Momentum coefficient.
        nesterov: Use Nesterov momentum (the reference's default).
        ns_steps: Newton-Schulz iterations.
        weight_decay: Decoupled decay ``p *= 1 - lr * weight_decay``.
        momentum_warmup: Steps over which momentum rises from 0.85 to ``momentum`` (0 = off).
        adjust_lr_fn: Update scale: ``original`` (reference) or ``match_rms_adamw``.
        impl: ``for`` (matrix by matrix), ``foreach``/``fused``/``auto`` (matrices of one shape batched) or
            ``compiled`` (batched, the Newton-Schulz iteration torch.compiled on CUDA).
        ns_dtype: Dtype of the Newton-Schulz iteration; None = bfloat16 on CUDA, float32 elsewhere.
        data_parallel: Every rank of the process group holds the same gradients (DDP): each matrix is then
            orthogonalised on one rank and the updates exchanged. FSDP2 (DTensor) parameters always are.
    """

    _attrs = ("impl", "ns_dtype", "data_parallel")
    impls = (*AdamW.impls, "compiled")

    def __init__(self, params: Iterable[Any], lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, momentum_warmup: int = 0,
                 adjust_lr_fn: AdjustLr = "original", *, impl: MuonImpl = "auto",
                 ns_dtype: torch.dtype | None = None, data_parallel: bool = False) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                        momentum_warmup=momentum_warmup, adjust_lr_fn=adjust_lr_fn)
        self.ns_dtype, self.data_parallel = ns_dtype, data_parallel
        super().__init__(params, defaults, impl=impl)

    @staticmethod
    def check_hparams(h: dict[str, Any]) -> None:
        check_muon_hparams(h)
        if "params" in h:
            check_matrices(h["params"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(_listed(param_group))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        return run_step(self, closure, lambda group: muon_group_step(self.state, group, self.impl, self.ns_dtype,
                                                                     self.data_parallel))


class MuonWithAuxAdamW(Fp32StateOptimizer):
    """Muon for the groups with ``use_muon=True``, AdamW for the others, as one optimizer.

    Every param group must say ``use_muon``. Missing hyperparameters take the reference's defaults: Muon groups
    ``lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0, momentum_warmup=0,
    adjust_lr_fn="original"``; AdamW groups ``lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0``. Other keys
    (e.g. ``role``, ``initial_lr``) are kept. State is that of :class:`Muon` or :class:`~lmsprint.optim.AdamW`.

    Args:
        param_groups: Param-group dicts, each with ``params`` and ``use_muon``.
        impl: Kernel path: of the AdamW groups (see :class:`~lmsprint.optim.AdamW`) and, ``for`` vs the rest,
            of the Muon groups (see :class:`Muon`).
        ns_dtype: Dtype of the Newton-Schulz iteration; None = bfloat16 on CUDA, float32 elsewhere.
        data_parallel: As for :class:`Muon` (the AdamW groups are elementwise and need nothing).
    """

    _attrs = ("impl", "ns_dtype", "data_parallel")
    impls = (*AdamW.impls, "compiled")

    def __init__(self, param_groups: Iterable[dict[str, Any]], *, impl: MuonImpl = "auto",
                 ns_dtype: torch.dtype | None = None, data_parallel: bool = False) -> None:
        self.ns_dtype, self.data_parallel = ns_dtype, data_parallel
        # "momentum" in the defaults is what lets OneCycleLR/CyclicLR (cycle_momentum=True) cycle the Muon groups'
        # momentum; torch's schedulers cycle one key for every group, so the AdamW groups' beta1 stays fixed
        super().__init__(list(param_groups), {"momentum": MUON_DEFAULTS["momentum"]}, impl=impl)

    @classmethod
    def from_config(cls, groups: Groups, cfg: OptimConfig, *, total_steps: int,
                    data_parallel: bool) -> MuonWithAuxAdamW:
        """Hidden matrices (``use_muon`` groups) on Muon, the rest on AdamW (betas None: (0.9, 0.95))."""
        for group in groups:
            if group["use_muon"]:
                group.update(momentum=cfg.momentum, nesterov=cfg.nesterov, ns_steps=cfg.ns_steps,
                             momentum_warmup=cfg.momentum_warmup)
            else:
                group.update(eps=cfg.eps, **config_betas(cfg))
        return cls(groups, impl=cfg.impl, data_parallel=data_parallel)  # type: ignore[arg-type]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict) or "use_muon" not in param_group:
            raise ValueError("every param group of MuonWithAuxAdamW needs use_muon=True or False")
        defaults = MUON_DEFAULTS if param_group["use_muon"] else AUX_ADAMW_DEFAULTS
        param_group = {**defaults, **_listed(param_group)}
        if param_group["use_muon"]:
            check_muon_hparams(param_group)
            check_matrices(param_group["params"])
        else:
            param_group["betas"] = tuple(param_group["betas"])
            check_adamw_hparams(param_group)
        drop_momentum = "momentum" not in param_group  # an AdamW group: torch would fill it in from the defaults
        super().add_param_group(param_group)
        if drop_momentum:
            del self.param_groups[-1]["momentum"]

    def _group_step(self, group: dict[str, Any]) -> None:
        if group["use_muon"]:
            muon_group_step(self.state, group, self.impl, self.ns_dtype, self.data_parallel)
        else:
            adamw_group_step(self.state, group, "auto" if self.impl == "compiled" else self.impl)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        return run_step(self, closure, self._group_step)
