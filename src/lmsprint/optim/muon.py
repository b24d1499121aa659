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

Three variants, each off by default (group hyperparameters, so each is in the ``state_dict``):

- ``ns_coefficients="polar_express"``: the per-iteration coefficients of Polar Express (Amsel et al. 2025) in place
  of the fixed ``(3.4445, -4.7750, 2.0315)`` (:func:`zeropower_via_newtonschulz5`);
- ``normuon=True``: NorMuon (Li et al. 2025) normalises each row of ``NS5(u)`` by an EMA of its mean square, keeping
  the matrix's Frobenius norm (:func:`normuon_row_scale_`);
- ``cautious_wd=True``: cautious weight decay (Chen et al. 2025) decays only the coordinates where ``u`` and ``p``
  have the same sign: ``p = p - lr wd p [u p >= 0] - lr u`` (:func:`cautious_mask`).

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
from typing import Any, Literal, get_args

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
from lmsprint.optim.spread import gather_rows, local, local_rows, map_matrices, spread_over_ranks

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Jordan's quintic (KellerJordan/Muon), the same at every iteration."""
# Polar Express (Amsel, Persson, Musco, Gower 2025, "The Polar Express: Optimal Matrix Sign Methods and Their
# Application to the Muon Algorithm", arXiv:2505.16932): one quintic per iteration, each optimal for the interval the
# singular values are in by then. These five are modded-nanogpt's (KellerJordan/modded-nanogpt train_gpt.py,
# "Computed for num_iters=5, safety_factor=2e-2, cushion=2"): the paper's reference code
# (NoahAmsel/PolarExpress polar_express.py, optimal_composition) gives them exactly for l=1e-3, num_iters=5,
# safety_factor_eps=2e-2, cushion=0.02 (tests/test_optim.py re-derives them). The safety factor also scales the
# initial normalisation, X / (1.02 ||X||_F + eps), as there (eps, which only guards an all-zero matrix, is 1e-6 there
# and this function's 1e-7 here).
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02
NsCoefficients = Literal["jordan", "polar_express"]
NS_COEFFICIENT_NAMES: tuple[str, ...] = get_args(NsCoefficients)
NORMUON_EPS = 1e-10  # NorMuon's reference: 1 / (sqrt(v) + 1e-10), and the same guard on the norm ratio
AdjustLr = Literal["original", "match_rms_adamw"]
MuonImpl = Literal[Impl, "compiled"]


def ns_coefficients(name: str, steps: int) -> list[tuple[float, float, float]]:
    """The ``(a, b, c)`` of each of ``steps`` iterations: Jordan's every time, or Polar Express's five in order (the
    first ``steps`` of them; beyond five the last repeats, as in the paper's reference code)."""
    if name == "jordan":
        return [NS_COEFFICIENTS] * steps
    if name == "polar_express":
        return [POLAR_EXPRESS_COEFFICIENTS[min(i, len(POLAR_EXPRESS_COEFFICIENTS) - 1)] for i in range(steps)]
    raise ValueError(f"ns_coefficients must be one of {', '.join(NS_COEFFICIENT_NAMES)}, got {name!r}")


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, *, dtype: torch.dtype = torch.bfloat16,
                                eps: float = 1e-7, coefficients: NsCoefficients = "jordan") -> Tensor:
    """Approximately orthogonalise ``G`` (``U V^T`` of its SVD) with the quintic Newton-Schulz iteration.

    ``jordan``: the coefficients maximise the slope at zero rather than converging exactly, so the singular values
    end up roughly in [0.5, 1.5], which the reference found not to hurt. ``polar_express``: a different quintic per
    iteration (:data:`POLAR_EXPRESS_COEFFICIENTS`), which takes them much closer to 1 in the same five steps.
    Batched over leading dimensions.

    Args:
        G: A matrix, or a batch of matrices ``(..., rows, cols)``.
        steps: Number of iterations.
        dtype: Dtype of the iteration: bfloat16 on GPU as the reference (stable there); float32 for exact tests.
        eps: Guards the initial normalisation of an all-zero matrix.
        coefficients: ``jordan`` or ``polar_express`` (:func:`ns_coefficients`).

    Returns:
        A tensor of ``G``'s shape in ``dtype``.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(G.shape)}")
    schedule = ns_coefficients(coefficients, steps)
    X = G.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        X = X.mT
    norm = X.norm(dim=(-2, -1), keepdim=True)  # Frobenius norm >= spectral norm, so ||X||_2 <= 1 after dividing
    if coefficients == "polar_express":
        norm = norm * POLAR_EXPRESS_SAFETY  # leaves room for rounding (bf16) above the top of the interval
    X = X / (norm + eps)
    for a, b, c in schedule:
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


def normuon_row_scale_(row_ms: Tensor, second_moment: Tensor, beta2: float, cols: int) -> Tensor:
    """NorMuon's per-row factor for an orthogonalised update ``O`` (Li et al. 2025, "NorMuon: Making Muon more
    efficient and scalable", arXiv:2510.05491; reference code zichongli5/NorMuon ``normuon_update``).

    ``second_moment`` (``(..., rows, 1)``) becomes ``lerp(second_moment, row_ms, 1 - beta2)``, an EMA of each row's
    mean square (no bias correction: the rescaling below cancels its scale). Each row is divided by the root of its
    EMA, then the whole matrix is rescaled to the Frobenius norm ``O`` had::

        s = 1 / (sqrt(v) + 1e-10)            O' = O * s * ||O||_F / (||O * s||_F + 1e-10)

    The norms come from ``row_ms`` (``||O||_F^2 = cols * sum(row_ms)``), so a rank holding some rows of ``O`` needs
    only every row's mean square, not the matrix.

    Args:
        row_ms: ``(..., rows, 1)`` mean over the columns of ``O**2``, in ``second_moment``'s dtype.
        second_moment: The EMA, updated in place.
        beta2: Its decay rate.
        cols: Columns of ``O``.

    Returns:
        The ``(..., rows, 1)`` factor to multiply ``O`` by.
    """
    second_moment.lerp_(row_ms, 1 - beta2)
    step = 1 / (second_moment.sqrt() + NORMUON_EPS)
    norm = (row_ms.sum(dim=(-2, -1), keepdim=True) * cols).sqrt()
    new_norm = ((row_ms * step.square()).sum(dim=(-2, -1), keepdim=True) * cols).sqrt()
    return step * (norm / (new_norm + NORMUON_EPS))


def row_mean_square(ortho: Tensor, dtype: torch.dtype) -> Tensor:
    """``(..., rows, 1)`` mean over the columns of ``ortho**2``, computed in ``dtype``."""
    return ortho.to(dtype).square().mean(dim=-1, keepdim=True)


def normuon_normalise(ortho: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """``ortho`` (``(..., rows, cols)``) with NorMuon's row normalisation (:func:`normuon_row_scale_`), in
    ``second_moment``'s dtype; updates ``second_moment`` (``(..., rows, 1)``)."""
    dtype = second_moment.dtype
    scale = normuon_row_scale_(row_mean_square(ortho, dtype), second_moment, beta2, ortho.size(-1))
    return ortho.to(dtype) * scale


def cautious_mask(update: Tensor, param: Tensor) -> Tensor:
    """Cautious weight decay's mask (Chen et al. 2025, "Cautious Weight Decay", arXiv:2510.12402, Algorithm 1:
    ``x = x - lr (u + wd I(u x >= 0) x)``): 1 where the update ``u`` (subtracted from ``param``) and ``param`` have
    the same sign or either is 0, else 0; in ``param``'s dtype."""
    return (update * param >= 0).to(param.dtype)


def muon_update(grad: Tensor, momentum_buffer: Tensor, *, momentum: float = 0.95, nesterov: bool = True,
                ns_steps: int = 5, ns_dtype: torch.dtype = torch.bfloat16, adjust_lr_fn: AdjustLr = "original",
                ns_coefficients: NsCoefficients = "jordan", second_moment: Tensor | None = None,
                normuon_beta2: float = 0.95) -> Tensor:
    """Muon's update direction for one matrix (updates ``momentum_buffer`` in place; ``grad`` is not modified).

    Same maths as the reference ``muon_update`` (which blends into ``grad`` in place). Tensors with more than two
    dimensions are orthogonalised as ``(shape[0], rest)`` matrices. With ``second_moment`` (a ``(shape[0], 1)``
    buffer, updated in place) the orthogonalised matrix gets NorMuon's row normalisation before the shape factor.

    Returns:
        The scaled, orthogonalised update in ``ns_dtype`` (NorMuon: in ``second_moment``'s dtype), shaped like
        ``grad``.
    """
    momentum_buffer.lerp_(grad, 1 - momentum)
    update = grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer
    matrix = update.reshape(len(update), -1)
    out = zeropower_via_newtonschulz5(matrix, ns_steps, dtype=ns_dtype, coefficients=ns_coefficients)
    if second_moment is not None:
        out = normuon_normalise(out, second_moment, normuon_beta2)
    return (out * muon_scale(*matrix.shape, adjust_lr_fn)).reshape(grad.shape)


def muon_for_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *, lr: float, weight_decay: float,
              momentum: float, nesterov: bool, ns_steps: int, ns_dtype: torch.dtype, adjust_lr_fn: AdjustLr,
              ns_coefficients: NsCoefficients = "jordan", second_moments: list[Tensor] | None = None,
              normuon_beta2: float = 0.95, cautious_wd: bool = False) -> None:
    """One Muon step per matrix (``second_moments``: NorMuon's buffers, one per matrix, or None)."""
    for i, (p, g, buf) in enumerate(zip(params, grads, bufs)):
        update = muon_update(g, buf, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype,
                             adjust_lr_fn=adjust_lr_fn, ns_coefficients=ns_coefficients,
                             second_moment=None if second_moments is None else second_moments[i],
                             normuon_beta2=normuon_beta2).to(p.dtype)
        if not cautious_wd:
            p.mul_(1 - lr * weight_decay)
        elif weight_decay != 0:
            p.addcmul_(p, cautious_mask(update, p), value=-lr * weight_decay)
        p.add_(update, alpha=-lr)


_compiled_ns: Callable[..., Tensor] | None = None


def compiled_newtonschulz5() -> Callable[..., Tensor]:
    """:func:`zeropower_via_newtonschulz5` through torch.compile (built once per process; one graph per shape and
    coefficient set)."""
    global _compiled_ns
    if _compiled_ns is None:
        _compiled_ns = torch.compile(zeropower_via_newtonschulz5, dynamic=False, fullgraph=True)
    return _compiled_ns


def muon_batched_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *, lr: float, weight_decay: float,
                  momentum: float, nesterov: bool, ns_steps: int, ns_dtype: torch.dtype,
                  adjust_lr_fn: AdjustLr, compiled: bool = False, ns_coefficients: NsCoefficients = "jordan",
                  second_moments: list[Tensor] | None = None, normuon_beta2: float = 0.95,
                  cautious_wd: bool = False) -> None:
    """The same step for matrices of ONE shape: foreach momentum and one batched Newton-Schulz iteration
    (``compiled``: the iteration through torch.compile, its matmuls and elementwise steps fused by Inductor)."""
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    updates = torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs
    stacked = torch.stack(updates).flatten(2)  # (n, rows, cols)
    ns = compiled_newtonschulz5() if compiled else zeropower_via_newtonschulz5
    ortho = ns(stacked, ns_steps, dtype=ns_dtype, coefficients=ns_coefficients)
    if second_moments is not None:
        moments = torch.stack(second_moments)  # (n, rows, 1)
        ortho = normuon_normalise(ortho, moments, normuon_beta2)
        torch._foreach_copy_(second_moments, list(moments.unbind(0)))
    ortho = (ortho * muon_scale(stacked.size(1), stacked.size(2), adjust_lr_fn)).to(params[0].dtype)
    steps = [u.reshape(p.shape) for u, p in zip(ortho.unbind(0), params)]
    if weight_decay != 0 and not cautious_wd:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    elif weight_decay != 0:
        torch._foreach_addcmul_(params, params, [cautious_mask(u, p) for u, p in zip(steps, params)],
                                value=-lr * weight_decay)
    torch._foreach_add_(params, steps, alpha=-lr)


def muon_momentum(step: int, *, momentum: float, warmup: int, start: float = 0.85) -> float:
    """Muon's momentum warm-up (modded-nanogpt): linear from ``start`` to ``momentum`` over ``warmup`` steps."""
    if warmup <= 0:
        return momentum
    frac = min(step / warmup, 1.0)
    return (1.0 - frac) * start + frac * momentum


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (as the reference), float32 elsewhere (CPU bf16 matmuls are slow and gain nothing)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _init_state(st: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
    """Lazy state: ``step`` and ``momentum_buffer`` (a DTensor for an FSDP2 parameter), and with NorMuon its whole
    ``(rows, 1)`` ``second_momentum_buffer`` (a plain tensor on every rank, also under FSDP2; added when NorMuon is
    turned on for a matrix that has state already)."""
    if not st:
        st["step"] = 0
        st["momentum_buffer"] = torch.zeros_like(p, dtype=state_dtype(p))
    if group["normuon"] and "second_momentum_buffer" not in st:
        st["second_momentum_buffer"] = torch.zeros(p.shape[0], 1, dtype=state_dtype(p), device=local(p).device)


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
        _init_state(st, p, group)
        buckets[(p.device, state_dtype(p), p.shape, st["step"])].append(p)
        st["step"] += 1
    for (device, _, _, step), ps in buckets.items():
        works, grads = zip(*(compute_view(p) for p in ps))
        compiled = {"compiled": impl == "compiled" and device.type == "cuda"} if impl != "for" else {}
        path = muon_for_ if impl == "for" else muon_batched_
        moments = [state[p]["second_momentum_buffer"] for p in ps] if group["normuon"] else None
        path(list(works), list(grads), [state[p]["momentum_buffer"] for p in ps], lr=group["lr"],
             weight_decay=group["weight_decay"],
             momentum=muon_momentum(step, momentum=group["momentum"], warmup=group["momentum_warmup"]),
             nesterov=group["nesterov"], ns_steps=group["ns_steps"],
             ns_dtype=ns_dtype or default_ns_dtype(device), adjust_lr_fn=group["adjust_lr_fn"],
             ns_coefficients=group["ns_coefficients"], second_moments=moments,
             normuon_beta2=group["normuon_beta2"], cautious_wd=group["cautious_wd"], **compiled)
        write_back(ps, works)


def muon_group_step_distributed(state: dict[Tensor, dict[str, Any]], group: dict[str, Any],
                                ns_dtype: torch.dtype | None) -> None:
    """The same update with the Newton-Schulz work spread over data-parallel ranks.

    Each rank keeps the momentum of its own tensors (whole under DDP, its row shards under FSDP2) and computes
    the Nesterov blend locally; every matrix is then orthogonalised on one rank and the results sent back
    (:func:`lmsprint.optim.spread.map_matrices`: an all-gather under DDP, two all-to-alls under FSDP2). NorMuon's
    row statistics are computed where the rows are and, under FSDP2, all-gathered (``rows`` numbers per matrix), so
    every rank updates the same whole ``(rows, 1)`` buffer. Every rank must call it with the same parameters.
    """
    params = params_with_grad(group)
    if not params:
        return
    works, blends = [], []
    for p in params:
        st = state[p]
        _init_state(st, p, group)
        momentum = muon_momentum(st["step"], momentum=group["momentum"], warmup=group["momentum_warmup"])
        st["step"] += 1
        dtype = state_dtype(p)
        mine = local(p)
        works.append(mine if mine.dtype == dtype else mine.to(dtype))
        grad, buf = local(p.grad).to(dtype), local(st["momentum_buffer"])  # type: ignore[union-attr]
        buf.lerp_(grad, 1 - momentum)
        blends.append(grad.lerp(buf, momentum) if group["nesterov"] else buf)
    dtype = ns_dtype or default_ns_dtype(params[0].device)
    coefficients = group["ns_coefficients"]

    def orthogonalise(X: Tensor) -> Tensor:  # (k, rows, cols)
        return zeropower_via_newtonschulz5(X, group["ns_steps"], dtype=dtype, coefficients=coefficients)

    # each (rows_here, cols): the whole matrix under DDP, this rank's rows under FSDP2
    updates = [u.view(u.shape[0], math.prod(p.shape[1:]))  # an FSDP2 shard may have no rows
               for u, p in zip(map_matrices(orthogonalise, blends, params, dtype=dtype), params)]
    if group["normuon"]:
        moments = [state[p]["second_momentum_buffer"] for p in params]
        row_ms = gather_rows([row_mean_square(u, m.dtype) for u, m in zip(updates, moments)], params)
        scales = [normuon_row_scale_(ms, m, group["normuon_beta2"], u.size(1))[local_rows(p)]
                  for ms, m, u, p in zip(row_ms, moments, updates, params)]
        updates = [u.to(s.dtype) * s for u, s in zip(updates, scales)]
    lr, weight_decay = group["lr"], group["weight_decay"]
    for p, work, update in zip(params, works, updates):
        update = (update * muon_scale(p.shape[0], update.size(1), group["adjust_lr_fn"])).to(work.dtype)
        update = update.view(work.shape)
        if not group["cautious_wd"]:
            work.mul_(1 - lr * weight_decay)
        elif weight_decay != 0:
            work.addcmul_(work, cautious_mask(update, work), value=-lr * weight_decay)
        work.add_(update, alpha=-lr)
        mine = local(p)
        if work is not mine:
            mine.copy_(work)


MUON_VARIANTS: dict[str, Any] = dict(ns_coefficients="jordan", cautious_wd=False, normuon=False, normuon_beta2=0.95)
"""The variants' settings, off: a Muon group saved before they existed loads with these."""
MUON_DEFAULTS: dict[str, Any] = dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                                     momentum_warmup=0, adjust_lr_fn="original", **MUON_VARIANTS)
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
    ns_coefficients(h["ns_coefficients"], 1)
    for key in ("cautious_wd", "normuon"):
        if not isinstance(h[key], bool):
            raise ValueError(f"{key} must be True or False, got {h[key]!r}")
    if not 0.0 <= h["normuon_beta2"] < 1.0:
        raise ValueError(f"normuon_beta2 must be in [0, 1), got {h['normuon_beta2']!r}")


def _fill_variants(groups: Iterable[dict[str, Any]]) -> None:
    """Give Muon groups loaded from a state dict saved before the variants existed their settings, off."""
    for group in groups:
        if group.get("use_muon", True):
            for key, value in MUON_VARIANTS.items():
                group.setdefault(key, value)


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

    State per parameter: ``step`` (int, for the momentum warm-up), ``momentum_buffer`` (float32 for bf16/fp16
    parameters) and, with ``normuon``, ``second_momentum_buffer`` (``(shape[0], 1)``, float32 likewise). Parameters
    whose ``grad`` is None are skipped.

    Args:
        params: Parameters or param-group dicts; every tensor must have ndim >= 2.
        lr: Learning rate, in units of spectral norm per update (with ``adjust_lr_fn="original"``).
        momentum: Momentum coefficient.
        nesterov: Use Nesterov momentum (the reference's default).
        ns_steps: Newton-Schulz iterations.
        weight_decay: Decoupled decay ``p *= 1 - lr * weight_decay``.
        momentum_warmup: Steps over which momentum rises from 0.85 to ``momentum`` (0 = off).
        adjust_lr_fn: Update scale: ``original`` (reference) or ``match_rms_adamw``.
        ns_coefficients: ``jordan`` (the reference's fixed quintic) or ``polar_express`` (one per iteration).
        cautious_wd: Decay only where the update and the parameter have the same sign (cautious weight decay).
        normuon: Normalise each row of the orthogonalised update by an EMA of its mean square (NorMuon).
        normuon_beta2: Decay rate of that EMA.
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
                 adjust_lr_fn: AdjustLr = "original", ns_coefficients: NsCoefficients = "jordan",
                 cautious_wd: bool = False, normuon: bool = False, normuon_beta2: float = 0.95, *,
                 impl: MuonImpl = "auto", ns_dtype: torch.dtype | None = None, data_parallel: bool = False) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                        momentum_warmup=momentum_warmup, adjust_lr_fn=adjust_lr_fn, ns_coefficients=ns_coefficients,
                        cautious_wd=cautious_wd, normuon=normuon, normuon_beta2=normuon_beta2)
        self.ns_dtype, self.data_parallel = ns_dtype, data_parallel
        super().__init__(params, defaults, impl=impl)

    @staticmethod
    def check_hparams(h: dict[str, Any]) -> None:
        check_muon_hparams(h)
        if "params" in h:
            check_matrices(h["params"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(_listed(param_group))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _fill_variants(self.param_groups)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        return run_step(self, closure, lambda group: muon_group_step(self.state, group, self.impl, self.ns_dtype,
                                                                     self.data_parallel))


class MuonWithAuxAdamW(Fp32StateOptimizer):
    """Muon for the groups with ``use_muon=True``, AdamW for the others, as one optimizer.

    Every param group must say ``use_muon``. Missing hyperparameters take the reference's defaults: Muon groups
    ``lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0, momentum_warmup=0,
    adjust_lr_fn="original", ns_coefficients="jordan", cautious_wd=False, normuon=False, normuon_beta2=0.95``
    (see :class:`Muon`); AdamW groups ``lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0``. Other keys
    (e.g. ``role``, ``initial_lr``) are kept. State is that of :class:`Muon` or :class:`~lmsprint.optim.AdamW`.
    The Muon variants apply to the Muon groups only: the AdamW groups keep plain decoupled weight decay.

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
                             momentum_warmup=cfg.momentum_warmup, ns_coefficients=cfg.ns_coefficients,
                             cautious_wd=cfg.cautious_wd, normuon=cfg.normuon, normuon_beta2=cfg.normuon_beta2)
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _fill_variants(self.param_groups)

    def _group_step(self, group: dict[str, Any]) -> None:
        if group["use_muon"]:
            muon_group_step(self.state, group, self.impl, self.ns_dtype, self.data_parallel)
        else:
            adamw_group_step(self.state, group, "auto" if self.impl == "compiled" else self.impl)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        return run_step(self, closure, self._group_step)
