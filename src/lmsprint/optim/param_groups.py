"""Parameter-group policy, in one place: which tensors get weight decay, which go to Muon, which learning rate.

Naming contract (the optimizers know nothing of the model's class, only of parameter names). A parameter's
*module* is the second-to-last component of its dotted name (``transformer.h.0.attn.c_attn.weight`` ->
``c_attn``); for a bare ``nn.Parameter`` attribute (no ``.weight``/``.bias`` leaf) its own name is used too.

- ``scalar``: every tensor with ndim < 2 (norm gains, biases, learned scalars). No weight decay, ``scalar_lr``.
- ``embed``: a matrix whose module is ``wte`` or ``wpe`` or contains ``embed``. Decayed, ``embed_lr``.
- ``head``: a matrix whose module is ``lm_head``. Decayed, ``head_lr``.
- ``matrix``: every other tensor with ndim >= 2 (the hidden matrices). Decayed, ``lr``; for Muon, the 2-D ones
  get ``use_muon=True``.

The decay rule is nanoGPT's: every tensor with ndim >= 2 is decayed, every 1-D tensor is not. A weight tied
between the embedding and the head (one tensor under two names) is placed once, under its first name; with the
GPT-2 layout (``transformer.wte`` registered before ``lm_head``) that is ``embed``. Parameters with
``requires_grad=False`` are left out.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch

ROLES = ("matrix", "embed", "head", "scalar")
DECAYED_ROLES = frozenset({"matrix", "embed", "head"})
EMBED_MODULES = ("wte", "wpe")
HEAD_MODULES = ("lm_head",)


def param_role(name: str, param: torch.Tensor) -> str:
    """The policy role of one parameter: ``matrix``, ``embed``, ``head`` or ``scalar`` (see module docstring)."""
    if param.ndim < 2:
        return "scalar"
    parts = name.split(".")
    owners = parts[-2:] if parts[-1] not in ("weight", "bias") else parts[-2:-1]
    if any(o in EMBED_MODULES or "embed" in o for o in owners):
        return "embed"
    if any(o in HEAD_MODULES for o in owners):
        return "head"
    return "matrix"


def horizon_weight_decay(lr: float, *, horizon: float, total_steps: int) -> float:
    """Weight decay whose EMA timescale is a fixed fraction of the run.

    With decoupled decay ``p *= 1 - lr * wd`` the weights are an exponential moving average of recent updates
    with timescale ``tau_iter = 1 / (lr * wd)`` steps. Wang & Aitchison (2024), "How to set AdamW's weight decay
    as you scale model and dataset size" (arXiv:2405.13698), find the optimal ``tau_iter`` stays a roughly constant
    fraction of the run as models and datasets grow, so ``wd = 1 / (lr * horizon * total_steps)``.

    Args:
        lr: The group's peak learning rate.
        horizon: ``tau_iter`` as a fraction of the run.
        total_steps: Optimizer steps of the run.
    """
    if lr <= 0 or horizon <= 0 or total_steps <= 0:
        raise ValueError(f"lr, horizon and total_steps must be positive, got {lr}, {horizon}, {total_steps}")
    return 1.0 / (lr * horizon * total_steps)


def build_param_groups(named_params: Iterable[tuple[str, torch.Tensor]], *, lr: float, weight_decay: float = 0.0,
                       embed_lr: float | None = None, head_lr: float | None = None, scalar_lr: float | None = None,
                       embed_weight_decay: float | None = None, head_weight_decay: float | None = None,
                       muon: bool = False) -> list[dict[str, Any]]:
    """Split a model's parameters into param groups by role.

    Args:
        named_params: ``model.named_parameters()`` (duplicates of a tied tensor are placed once).
        lr: Learning rate of the hidden matrices; the default of the other roles.
        weight_decay: Decay of the decayed roles (matrix, embed, head); scalars get 0.
        embed_lr: Learning rate of the embeddings (default ``lr``).
        head_lr: Learning rate of an untied output head (default ``lr``).
        scalar_lr: Learning rate of 1-D tensors (default ``lr``).
        embed_weight_decay: Decay of the embeddings (default ``weight_decay``).
        head_weight_decay: Decay of an untied output head (default ``weight_decay``).
        muon: Add ``use_muon`` to every group: True for the 2-D hidden matrices only.

    Returns:
        Non-empty groups in the order matrix, embed, head, scalar, each with ``params``, ``role``, ``lr``,
        ``weight_decay`` (and ``use_muon``).
    """
    lrs = {"matrix": lr, "embed": lr if embed_lr is None else embed_lr, "head": lr if head_lr is None else head_lr,
           "scalar": lr if scalar_lr is None else scalar_lr}
    wds = {"matrix": weight_decay, "embed": weight_decay if embed_weight_decay is None else embed_weight_decay,
           "head": weight_decay if head_weight_decay is None else head_weight_decay, "scalar": 0.0}
    buckets: dict[tuple[str, bool], list[torch.Tensor]] = {}
    seen: set[int] = set()
    for name, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        role = param_role(name, p)
        buckets.setdefault((role, muon and role == "matrix" and p.ndim == 2), []).append(p)
    groups = []
    for role in ROLES:
        for use_muon in (True, False):
            if (role, use_muon) not in buckets:
                continue
            group: dict[str, Any] = {"params": buckets[(role, use_muon)], "role": role, "lr": lrs[role],
                                     "weight_decay": wds[role] if role in DECAYED_ROLES else 0.0}
            if muon:
                group["use_muon"] = use_muon
            groups.append(group)
    return groups


def apply_horizon_weight_decay(groups: Sequence[dict[str, Any]], *, horizon: float, total_steps: int) -> None:
    """Set each decayed group's ``weight_decay`` with :func:`horizon_weight_decay` from its peak ``lr``."""
    for group in groups:
        if group["role"] in DECAYED_ROLES:
            group["weight_decay"] = horizon_weight_decay(group["lr"], horizon=horizon, total_steps=total_steps)


def check_param_groups(named_params: Iterable[tuple[str, torch.Tensor]], groups: Sequence[dict[str, Any]]) -> None:
    """Assert that every trainable parameter is in exactly one group and nothing else is (minGPT's check).

    Raises:
        AssertionError: Naming the missing, duplicated or foreign parameters.
    """
    names: dict[int, str] = {}
    for name, p in named_params:
        if p.requires_grad:
            names.setdefault(id(p), name)
    counts = Counter(id(p) for g in groups for p in g["params"])
    missing = [n for pid, n in names.items() if counts[pid] == 0]
    repeated = [names.get(pid, "?") for pid, c in counts.items() if c > 1]
    foreign = sum(1 for pid in counts if pid not in names)
    if missing or repeated or foreign:
        raise AssertionError(f"param groups are inconsistent: missing {missing}, in several groups {repeated}, "
                             f"{foreign} not trainable parameters of the model")


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """A copy of every group's settings (everything but its params), as :func:`restore_settings` takes them."""
    return [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups]


def restore_settings(optimizer: torch.optim.Optimizer, settings: Sequence[dict[str, Any]], *,
                     lr_scale: float = 1.0) -> None:
    """Give every group the ``settings`` of :func:`group_settings` again, after loading a saved state dict (which
    brings the saved groups' settings): the peak lr (``initial_lr``) times ``lr_scale``, and every other setting
    as it is (the current ``lr`` is left to the scheduler). A peak equal to the saved one but for rounding is
    kept, so a resume with unchanged settings continues bit for bit."""
    for group, built in zip(optimizer.param_groups, settings):
        for key, value in built.items():
            if key == "lr":
                continue
            if key == "initial_lr":
                value = value * lr_scale
                if isinstance(group.get(key), float) and math.isclose(group[key], value, rel_tol=1e-9):
                    continue
            group[key] = copy.deepcopy(value)
