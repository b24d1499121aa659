"""Optimizers: AdamW, Lion, SOAP, AdEMAMix and Muon (with AdamW for the non-matrix parameters).

Each is a ``torch.optim.Optimizer`` (a :class:`~lmsprint.optim.base.Fp32StateOptimizer`) in its own file, whose
``from_config`` reads the run's :class:`~lmsprint.config.OptimConfig`; :data:`OPTIMIZERS` maps the
``--optim.name`` values to them. :func:`build_optimizer` is what the trainer calls: it splits the model's
parameters into groups with the policy of :mod:`lmsprint.optim.param_groups`, then builds the named optimizer.
See ``docs/optimizers.md``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lmsprint.config import OptimConfig
from lmsprint.config.values import require
from lmsprint.errors import ConfigError
from lmsprint.optim.adamw import AdamW
from lmsprint.optim.ademamix import AdEMAMix
from lmsprint.optim.base import Fp32StateOptimizer
from lmsprint.optim.lion import Lion
from lmsprint.optim.muon import Muon, MuonWithAuxAdamW, zeropower_via_newtonschulz5
from lmsprint.optim.param_groups import (
    apply_horizon_weight_decay,
    build_param_groups,
    check_param_groups,
    horizon_weight_decay,
    param_role,
)
from lmsprint.optim.soap import SOAP

__all__ = [
    "OPTIMIZERS",
    "SOAP",
    "AdEMAMix",
    "AdamW",
    "Lion",
    "Muon",
    "MuonWithAuxAdamW",
    "build_optimizer",
    "build_param_groups",
    "check_param_groups",
    "describe",
    "horizon_weight_decay",
    "param_role",
    "zeropower_via_newtonschulz5",
]

OPTIMIZERS: dict[str, type[Fp32StateOptimizer]] = {
    "adamw": AdamW,
    "lion": Lion,
    "soap": SOAP,
    "ademamix": AdEMAMix,
    "muon": MuonWithAuxAdamW,
}
"""The --optim.name values (the Literal of OptimConfig.name; tests/test_architecture.py ties them)."""


def _check_decay(group: dict[str, Any], cfg: OptimConfig, total_steps: int) -> None:
    """Decoupled decay scales the weights by ``1 - lr * wd`` every step: ``lr * wd >= 1`` would zero or flip them
    (a horizon under one step, or a decay that large)."""
    shrink = group["lr"] * group["weight_decay"]
    if shrink < 1:
        return
    if cfg.weight_decay_mode == "horizon":
        cause = f"--optim.wd_horizon={cfg.wd_horizon} x {total_steps} steps is under one step"
    else:
        cause = f"weight decay {group['weight_decay']:g} of the {group['role']} group at lr {group['lr']:g}"
    raise ConfigError(f"{cause}: it would scale the {group['role']} weights by 1 - lr*wd = {1 - shrink:.3g} every "
                      "step; lr*wd must stay below 1")


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimConfig, *,
                    total_steps: int, data_parallel: bool = False) -> torch.optim.Optimizer:
    """Build the run's optimizer: param groups by the policy, then the optimizer named by ``cfg.name``.

    Groups carry ``role`` (matrix, embed, head, scalar), their peak ``lr`` and ``initial_lr`` (the same value,
    the key torch LR schedulers scale, so one scheduler multiplies every group's peak). ``betas=None`` means the
    optimizer's own defaults (for muon: (0.9, 0.95) on the AdamW side). In ``horizon`` mode each decayed group's
    weight decay is ``1 / (lr * wd_horizon * total_steps)``. For ademamix an unset ``alpha_warmup`` /
    ``beta3_warmup`` means ``total_steps`` (the paper's choice).

    Args:
        named_params: ``model.named_parameters()`` of the unwrapped model.
        cfg: The ``[optim]`` section of the run config.
        total_steps: Optimizer steps of the run.
        data_parallel: The ranks of the process group hold identical gradients (DDP; FSDP2 parameters are
            detected): Muon and SOAP spread their whole-matrix work over the ranks (``docs/distributed.md``).

    Raises:
        ConfigError: Unknown optimizer or invalid hyperparameter, naming the flag (the checks of
            :meth:`OptimConfig.check <lmsprint.config.OptimConfig.check>`, then those that depend on the run).
    """
    cfg.check()  # the rules of the [optim] section (as the config's validation), then those of this run
    require(total_steps >= 1, f"total_steps must be >= 1 (the run length in optimizer steps), got {total_steps}")
    cls = OPTIMIZERS[cfg.name]
    require(cfg.impl in cls.impls, f"--optim.impl={cfg.impl} is not available for {cfg.name}; choose from "
            f"{', '.join(cls.impls)}")
    named = list(named_params)
    groups = build_param_groups(named, lr=cfg.lr, weight_decay=cfg.weight_decay, embed_lr=cfg.embed_lr,
                                head_lr=cfg.head_lr, scalar_lr=cfg.scalar_lr, embed_weight_decay=cfg.embed_weight_decay,
                                head_weight_decay=cfg.head_weight_decay, muon=cfg.name == "muon")
    require(len(groups) > 0, "the model has no trainable parameters to optimise")
    if cfg.weight_decay_mode == "horizon":
        apply_horizon_weight_decay(groups, horizon=cfg.wd_horizon, total_steps=total_steps)
    check_param_groups(named, groups)
    for group in groups:
        _check_decay(group, cfg, total_steps)
        group["initial_lr"] = group["lr"]
    return cls.from_config(groups, cfg, total_steps=total_steps, data_parallel=data_parallel)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)  # torch.dtype and other objects


def describe(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer name and per-group hyperparameters as a JSON-able dict, for the run's metrics.

    Returns:
        ``{"name", "class", "impl", "groups": [{"role", "lr", "weight_decay", ..., "num_tensors",
        "num_params"}]}``; ``name`` is the registry key (None for a class outside :data:`OPTIMIZERS`).
    """
    name = next((k for k, cls in OPTIMIZERS.items() if type(optimizer) is cls), None)
    groups = []
    for group in optimizer.param_groups:
        info = {k: _jsonable(v) for k, v in group.items() if k != "params"}
        info["num_tensors"] = len(group["params"])
        info["num_params"] = sum(p.numel() for p in group["params"])
        groups.append(info)
    out: dict[str, Any] = {"name": name, "class": type(optimizer).__name__,
                           "impl": _jsonable(getattr(optimizer, "impl", None)), "groups": groups}
    if hasattr(optimizer, "ns_dtype"):
        out["ns_dtype"] = _jsonable(optimizer.ns_dtype)
    return out
