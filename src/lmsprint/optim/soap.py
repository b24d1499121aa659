"""SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv:2409.11321; reference code
github.com/nikhilvyas/SOAP).

Adam run in the eigenbasis of Shampoo's preconditioner. For a matrix gradient ``G`` (m x n) SOAP keeps EMAs
``L = EMA(G G^T)`` and ``R = EMA(G^T G)`` (decay ``shampoo_beta``) and their eigenvectors ``Q_L``, ``Q_R``; the
Adam moments live in the rotated space ``G' = Q_L^T G Q_R`` and the update is rotated back. A side longer than
``max_precond_dim`` (e.g. the vocabulary side of an embedding) keeps the identity; 1-D tensors run plain Adam.
Higher-order tensors are handled the same way, one factor per dimension.

Order of operations (as the reference ``SOAP.step``):

1. The first step of each parameter only accumulates ``L``, ``R`` from its gradient and takes their
   eigenvectors (``torch.linalg.eigh``, descending eigenvalues); the parameter is *not* updated, not even decayed,
   so the projection never uses the current gradient.
2. Later steps: rotate ``G``; update Adam moments ``exp_avg``, ``exp_avg_sq`` in the rotated space; step
   ``p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * Q_L (exp_avg / (sqrt(exp_avg_sq) + eps)) Q_R^T``; then decoupled
   decay ``p *= 1 - lr * wd`` (applied after the update, as the reference); then accumulate ``L``, ``R`` from
   ``G`` and, every ``precondition_frequency`` steps, refresh the eigenbasis with one power iteration + QR
   (``Q <- qr(L Q)`` after sorting by estimated eigenvalues, reordering ``exp_avg_sq`` to match) and move
   ``exp_avg`` to the new basis.

``t`` counts the updating steps (the first, initialising call does not count). Not ported from the reference:
``merge_dims``, ``precondition_1d`` and ``data_format`` (conv layouts). The reference rotates ``exp_avg`` back and
forth every step; here it is rotated only when the basis changes, which is the same maths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lmsprint.config import OptimConfig
from lmsprint.distributed import get_rank, world_size
from lmsprint.optim.base import (
    Fp32StateOptimizer,
    Groups,
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
from lmsprint.optim.spread import assign_owners, full, local, local_rows, share_from_owners, spread_over_ranks

Basis = list[Tensor | None]  # one entry per tensor dimension; None = identity (not preconditioned)


def soap_project(x: Tensor, Q: Basis) -> Tensor:
    """Rotate ``x`` into the eigenbasis: ``Q_L^T x Q_R`` for a matrix (each dim contracted with its ``Q``)."""
    if all(q is None for q in Q):
        return x
    for q in Q:
        # tensordot contracts dim 0 and appends the new dim last, so after ndim steps the order is restored
        x = x.permute(*range(1, x.ndim), 0) if q is None else torch.tensordot(x, q, dims=([0], [0]))
    return x


def soap_project_back(x: Tensor, Q: Basis) -> Tensor:
    """Rotate ``x`` back from the eigenbasis: ``Q_L x Q_R^T`` for a matrix."""
    if all(q is None for q in Q):
        return x
    for q in Q:
        x = x.permute(*range(1, x.ndim), 0) if q is None else torch.tensordot(x, q, dims=([0], [1]))
    return x


def soap_accumulate_(GG: Basis, grad: Tensor, shampoo_beta: float) -> None:
    """``GG[i] <- shampoo_beta GG[i] + (1 - shampoo_beta) * (grad contracted with itself over all dims but i)``."""
    for i, gg in enumerate(GG):
        if gg is not None:
            other = [d for d in range(grad.ndim) if d != i]
            gg.lerp_(torch.tensordot(grad, grad, dims=(other, other)), 1 - shampoo_beta)


def soap_eigenbasis(GG: Basis) -> Basis:
    """Eigenvectors of each factor, columns in descending eigenvalue order (``eigh``, float64 if it fails)."""
    Q: Basis = []
    for gg in GG:
        if gg is None:
            Q.append(None)
            continue
        eye = torch.eye(gg.shape[0], device=gg.device, dtype=gg.dtype)
        try:
            _, vecs = torch.linalg.eigh(gg + 1e-30 * eye)
        except RuntimeError:  # torch.linalg.LinAlgError: ill-conditioned in float32
            _, vecs = torch.linalg.eigh(gg.double() + 1e-30 * eye.double())
            vecs = vecs.to(gg.dtype)
        Q.append(torch.flip(vecs, [1]))
    return Q


def soap_refresh_basis(GG: Basis, Q: Basis, exp_avg_sq: Tensor) -> tuple[Basis, Tensor]:
    """One power iteration + QR per factor (the reference's ``get_orthogonal_matrix_QR``).

    The current basis is sorted by its estimated eigenvalues ``diag(Q^T GG Q)`` (descending) and ``exp_avg_sq``,
    which lives in the rotated space, is permuted along that dimension to match. Returns ``(Q, exp_avg_sq)``.
    """
    new_Q: Basis = []
    for i, (gg, q) in enumerate(zip(GG, Q)):
        if gg is None or q is None:
            new_Q.append(None)
            continue
        order = torch.argsort(torch.diag(q.T @ gg @ q), descending=True)
        exp_avg_sq = exp_avg_sq.index_select(i, order)
        new_Q.append(torch.linalg.qr(gg @ q[:, order])[0])
    return new_Q, exp_avg_sq


def soap_init_(state: dict[str, Any], grad: Tensor, *, shampoo_beta: float, max_precond_dim: int,
               eigenbasis: bool = True) -> None:
    """First call for a parameter: zero moments, factors accumulated from ``grad``, their eigenbasis (left to the
    caller, ``state["Q"] = soap_eigenbasis(state["GG"])``, when ``eigenbasis`` is False)."""
    state["step"] = 0
    state["exp_avg"] = torch.zeros_like(grad)
    state["exp_avg_sq"] = torch.zeros_like(grad)
    precondition = grad.ndim >= 2  # 1-D tensors (norm gains, biases) run plain Adam, as the reference's default
    state["GG"] = [torch.zeros(d, d, device=grad.device, dtype=grad.dtype)
                   if precondition and d <= max_precond_dim else None for d in grad.shape]
    soap_accumulate_(state["GG"], grad, shampoo_beta)
    state["Q"] = soap_eigenbasis(state["GG"]) if eigenbasis else None


def soap_update_(param: Tensor, grad: Tensor, state: dict[str, Any], *, lr: float, beta1: float, beta2: float,
                 shampoo_beta: float, eps: float, weight_decay: float, precondition_frequency: int,
                 normalize_grads: bool, correct_bias: bool, refresh: bool = True) -> None:
    """One SOAP step of an initialised parameter (see the module docstring for the order of operations).

    With ``refresh=False`` the caller does the eigenbasis refresh that falls due (:func:`soap_refresh_`).
    """
    Q: Basis = state["Q"]
    grad_rot = soap_project(grad, Q)
    state["step"] += 1
    step = state["step"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad_rot, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad_rot, grad_rot, value=1 - beta2)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step) if correct_bias else lr
    update = soap_project_back(exp_avg / (exp_avg_sq.sqrt() + eps), Q)
    if normalize_grads:
        update = update / (1e-30 + update.square().mean().sqrt())
    param.add_(update, alpha=-step_size)
    if weight_decay > 0:
        param.mul_(1 - lr * weight_decay)
    soap_accumulate_(state["GG"], grad, shampoo_beta)
    if refresh and step % precondition_frequency == 0:
        soap_refresh_(state)


def soap_refresh_(state: dict[str, Any]) -> None:
    """Refresh the eigenbasis (:func:`soap_refresh_basis`) and move ``exp_avg`` and ``exp_avg_sq`` into it."""
    Q: Basis = state["Q"]
    exp_avg = soap_project_back(state["exp_avg"], Q)
    state["Q"], state["exp_avg_sq"] = soap_refresh_basis(state["GG"], Q, state["exp_avg_sq"])
    state["exp_avg"] = soap_project(exp_avg, state["Q"])


def _check(h: dict[str, Any]) -> None:
    check_lr(h["lr"])
    check_betas(h["betas"], 2)
    if not (h["shampoo_beta"] < 0 or 0.0 <= h["shampoo_beta"] < 1.0):
        raise ValueError(f"shampoo_beta must be in [0, 1) (or negative to use beta2), got {h['shampoo_beta']!r}")
    check_nonnegative("eps", h["eps"])
    check_nonnegative("weight_decay", h["weight_decay"])
    for key in ("precondition_frequency", "max_precond_dim"):
        if not (isinstance(h[key], int) and h[key] >= 1):
            raise ValueError(f"{key} must be an int >= 1, got {h[key]!r}")


class SOAP(Fp32StateOptimizer):
    """SOAP: Adam in the slowly refreshed eigenbasis of Shampoo's Kronecker factors.

    State per parameter: ``step`` (int), ``exp_avg`` and ``exp_avg_sq`` (in the rotated space), ``GG`` (the
    factors, None for an unpreconditioned dimension) and ``Q`` (their eigenbases). All float32 for bf16/fp16
    parameters. Parameters whose ``grad`` is None are skipped. Defaults are the reference's.

    Args:
        params: Parameters or param-group dicts.
        lr: Learning rate.
        betas: Adam's ``(beta1, beta2)``.
        shampoo_beta: Decay of the factor EMAs; negative = use beta2.
        eps: Added to ``sqrt(exp_avg_sq)`` (in the rotated space, before bias correction, as the reference).
        weight_decay: Decoupled decay ``p *= 1 - lr * weight_decay``, applied after the update.
        precondition_frequency: Steps between eigenbasis refreshes.
        max_precond_dim: Dimensions larger than this are not preconditioned (identity basis).
        normalize_grads: Scale each update to unit RMS (helps at large precondition_frequency).
        correct_bias: Use Adam's bias correction.
        data_parallel: Every rank of the process group holds the same gradients (DDP): each eigenbasis
            (``eigh`` at the first step, power iteration + QR at each refresh) is then computed on one rank and sent
            to the others. FSDP2 (DTensor) parameters always take this path, on gathered whole matrices.
    """

    _attrs = ("impl", "data_parallel")
    impls = ("auto", "for")

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 shampoo_beta: float = -1.0, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, max_precond_dim: int = 10000, normalize_grads: bool = False,
                 correct_bias: bool = True, *, data_parallel: bool = False) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                        normalize_grads=normalize_grads, correct_bias=correct_bias)
        self.data_parallel = data_parallel
        super().__init__(params, defaults, impl="for")

    check_hparams = staticmethod(_check)

    @classmethod
    def from_config(cls, groups: Groups, cfg: OptimConfig, *, total_steps: int, data_parallel: bool) -> SOAP:
        return cls(groups, eps=cfg.eps, precondition_frequency=cfg.precondition_frequency,
                   max_precond_dim=cfg.max_precond_dim, data_parallel=data_parallel, **config_betas(cfg))

    def _group_step(self, group: dict[str, Any]) -> None:
        if spread_over_ranks(group["params"], self.data_parallel):
            self._group_step_distributed(group)
            return
        beta1, beta2 = group["betas"]
        shampoo_beta = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2
        for p in params_with_grad(group):
            state = self.state[p]
            work, grad = compute_view(p)
            if not state:
                soap_init_(state, grad, shampoo_beta=shampoo_beta, max_precond_dim=group["max_precond_dim"])
                continue  # the first step only sets up the preconditioner, as in the reference
            soap_update_(work, grad, state, lr=group["lr"], beta1=beta1, beta2=beta2, shampoo_beta=shampoo_beta,
                         eps=group["eps"], weight_decay=group["weight_decay"],
                         precondition_frequency=group["precondition_frequency"],
                         normalize_grads=group["normalize_grads"], correct_bias=group["correct_bias"])
            write_back([p], [work])

    def _group_step_distributed(self, group: dict[str, Any]) -> None:
        """The same step over data-parallel ranks: every rank keeps the whole state of every matrix and applies the
        preconditioner (FSDP2 shards are all-gathered first and only this rank's rows written back), while each
        eigenbasis that falls due is computed on one rank and all-gathered (:meth:`_spread_bases`)."""
        beta1, beta2 = group["betas"]
        shampoo_beta = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2
        due: list[tuple[dict[str, Any], bool]] = []  # (state, refresh: else the initial eigh)
        for p in params_with_grad(group):
            state = self.state[p]
            dtype = state_dtype(p)
            grad = full(p.grad).to(dtype)  # type: ignore[arg-type]
            if not state:
                soap_init_(state, grad, shampoo_beta=shampoo_beta, max_precond_dim=group["max_precond_dim"],
                           eigenbasis=False)
                due.append((state, False))
                continue
            whole = full(p)
            work = whole if whole.dtype == dtype else whole.to(dtype)
            soap_update_(work, grad, state, lr=group["lr"], beta1=beta1, beta2=beta2, shampoo_beta=shampoo_beta,
                         eps=group["eps"], weight_decay=group["weight_decay"],
                         precondition_frequency=group["precondition_frequency"],
                         normalize_grads=group["normalize_grads"], correct_bias=group["correct_bias"], refresh=False)
            if state["step"] % group["precondition_frequency"] == 0:
                due.append((state, True))
            if work is not p:
                local(p).copy_(work[local_rows(p)])
        self._spread_bases(due)

    @staticmethod
    def _spread_bases(due: list[tuple[dict[str, Any], bool]]) -> None:
        """Compute each due eigenbasis on one rank (an initial ``eigh`` or a refresh, which also moves the
        moments) and all-gather the results, so every rank ends with the same state."""
        spread = []
        for st, refresh in due:
            if any(gg is not None for gg in st["GG"]):
                spread.append((st, refresh))
            elif not refresh:  # identity bases (1-D tensors, over-long sides only): nothing to compute or send
                st["Q"] = soap_eigenbasis(st["GG"])
        if not spread:
            return
        owners = assign_owners([tuple(st["exp_avg"].shape) for st, _ in spread], world_size())
        shapes, computed = [], {}
        for i, (st, refresh) in enumerate(spread):
            moments = [st["exp_avg_sq"], st["exp_avg"]] if refresh else []
            shapes.append([tuple(gg.shape) for gg in st["GG"] if gg is not None] + [tuple(m.shape) for m in moments])
            if owners[i] == get_rank():
                if refresh:
                    soap_refresh_(st)
                else:
                    st["Q"] = soap_eigenbasis(st["GG"])
                moments = [st["exp_avg_sq"], st["exp_avg"]] if refresh else []
                computed[i] = [q for q in st["Q"] if q is not None] + moments
        wide = any(st["exp_avg"].dtype == torch.float64 for st, _ in spread)
        shared = share_from_owners(computed, shapes, owners, dtype=torch.float64 if wide else torch.float32,
                                   device=spread[0][0]["exp_avg"].device)
        for i, (st, refresh) in enumerate(spread):
            if owners[i] == get_rank():
                continue
            received = iter(shared[i])
            dtype = st["exp_avg"].dtype
            st["Q"] = [None if gg is None else next(received).to(dtype, copy=True) for gg in st["GG"]]
            if refresh:
                st["exp_avg_sq"] = next(received).to(dtype, copy=True)
                st["exp_avg"] = next(received).to(dtype, copy=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        return run_step(self, closure, self._group_step)
