"""Optimizers: AdamW, Lion, SOAP, AdEMAMix and Muon (with AdamW for the non-matrix parameters).

Each is a ``torch.optim.Optimizer``; :data:`OPTIMIZERS` maps the ``--optim.name`` values to them and
:func:`build_optimizer` is what the trainer calls: it splits the model's parameters into groups with the policy of
:mod:`lmsprint.optim.param_groups` and translates the run's :class:`~lmsprint.config.OptimConfig`.
See ``docs/optimizers.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from lmsprint.errors import ConfigError
from lmsprint.optim.adamw import AdamW
from lmsprint.optim.ademamix import AdEMAMix
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

if TYPE_CHECKING:
    from lmsprint.config import OptimConfig

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
    "check_weight_decay_config",
    "describe",
    "horizon_weight_decay",
    "param_role",
    "zeropower_via_newtonschulz5",
]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": AdamW,
    "lion": Lion,
    "soap": SOAP,
    "ademamix": AdEMAMix,
    "muon": MuonWithAuxAdamW,
}

# kernel paths each optimizer offers (SOAP is per tensor only: its cost is the eigendecompositions)
_IMPLS: dict[str, tuple[str, ...]] = {
    "adamw": ("auto", "for", "foreach", "fused"),
    "lion": ("auto", "for", "foreach"),
    "soap": ("auto", "for"),
    "ademamix": ("auto", "for", "foreach"),
    "muon": ("auto", "for", "foreach", "fused"),
}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_config(cfg: OptimConfig, total_steps: int) -> None:
    """Reject hyperparameters that cannot work, naming the ``--optim.*`` flag."""
    name = cfg.name
    _check(name in OPTIMIZERS, f"--optim.name: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    _check(total_steps >= 1, f"total_steps must be >= 1 (the run length in optimizer steps), got {total_steps}")
    for key in ("lr", "embed_lr", "head_lr", "scalar_lr"):
        v = getattr(cfg, key)
        if key == "lr" or v is not None:
            _check(isinstance(v, (int, float)) and math.isfinite(v) and v > 0,
                   f"--optim.{key} must be positive, got {v}")
    _check(math.isfinite(cfg.eps) and cfg.eps > 0, f"--optim.eps must be positive, got {cfg.eps}")
    check_weight_decay_config(cfg)
    _check(cfg.weight_decay_mode in ("fixed", "horizon"),
           f"--optim.weight_decay_mode must be fixed or horizon, got {cfg.weight_decay_mode!r}")
    _check(math.isfinite(cfg.wd_horizon) and cfg.wd_horizon > 0,
           f"--optim.wd_horizon must be positive, got {cfg.wd_horizon}")
    _check(cfg.impl in _IMPLS[name], f"--optim.impl={cfg.impl} is not available for {name}; choose from "
           f"{', '.join(_IMPLS[name])}")
    if cfg.betas is not None:
        n = 3 if name == "ademamix" else 2
        _check(len(cfg.betas) == n, f"--optim.betas needs {n} values for {name}"
               f"{' (beta1, beta2, beta3)' if n == 3 else ''}, got {cfg.betas}")
        _check(all(0.0 <= b < 1.0 for b in cfg.betas), f"--optim.betas must each be in [0, 1), got {cfg.betas}")
    if name == "muon":
        _check(0.0 <= cfg.momentum < 1.0, f"--optim.momentum must be in [0, 1), got {cfg.momentum}")
        _check(cfg.ns_steps >= 1, f"--optim.ns_steps must be >= 1, got {cfg.ns_steps}")
        _check(cfg.momentum_warmup >= 0, f"--optim.momentum_warmup must be >= 0 (0 = off), got "
               f"{cfg.momentum_warmup}")
    if name == "soap":
        _check(cfg.precondition_frequency >= 1, f"--optim.precondition_frequency must be >= 1, got "
               f"{cfg.precondition_frequency}")
        _check(cfg.max_precond_dim >= 1, f"--optim.max_precond_dim must be >= 1, got {cfg.max_precond_dim}")
    if name == "ademamix":
        _check(math.isfinite(cfg.alpha) and cfg.alpha >= 0, f"--optim.alpha must be >= 0, got {cfg.alpha}")
        for key in ("alpha_warmup", "beta3_warmup"):
            v = getattr(cfg, key)
            _check(v is None or v >= 0, f"--optim.{key} must be >= 0 (0 = off; unset = the whole run), got {v}")


def check_weight_decay_config(cfg: OptimConfig) -> None:
    """The decay strengths are finite and >= 0, and per-group strengths come with the fixed mode (also run by
    the config's validation, before any data is prepared)."""
    for key in ("weight_decay", "embed_weight_decay", "head_weight_decay"):
        v = getattr(cfg, key)
        _check(v is None or (math.isfinite(v) and v >= 0), f"--optim.{key} must be >= 0, got {v}")
    _check(cfg.weight_decay_mode == "fixed" or (cfg.embed_weight_decay is None and cfg.head_weight_decay is None),
           "--optim.embed_weight_decay/head_weight_decay apply to --optim.weight_decay_mode=fixed; horizon mode "
           "derives every group's decay from its lr")


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
        ConfigError: Unknown optimizer or invalid hyperparameter, naming the flag.
    """
    _check_config(cfg, total_steps)
    name = cfg.name
    named = list(named_params)
    groups = build_param_groups(named, lr=cfg.lr, weight_decay=cfg.weight_decay, embed_lr=cfg.embed_lr,
                                head_lr=cfg.head_lr, scalar_lr=cfg.scalar_lr, embed_weight_decay=cfg.embed_weight_decay,
                                head_weight_decay=cfg.head_weight_decay, muon=name == "muon")
    _check(len(groups) > 0, "the model has no trainable parameters to optimise")
    if cfg.weight_decay_mode == "horizon":
        apply_horizon_weight_decay(groups, horizon=cfg.wd_horizon, total_steps=total_steps)
    check_param_groups(named, groups)
    for group in groups:
        _check_decay(group, cfg, total_steps)
        group["initial_lr"] = group["lr"]
    betas = {} if cfg.betas is None else {"betas": tuple(cfg.betas)}

    if name == "adamw":
        return AdamW(groups, eps=cfg.eps, impl=cfg.impl, **betas)
    if name == "lion":
        return Lion(groups, impl=cfg.impl, **betas)  # type: ignore[arg-type]
    if name == "soap":
        return SOAP(groups, eps=cfg.eps, precondition_frequency=cfg.precondition_frequency,
                    max_precond_dim=cfg.max_precond_dim, data_parallel=data_parallel, **betas)
    if name == "ademamix":
        warmup = {k: total_steps if v is None else v
                  for k, v in (("alpha_warmup", cfg.alpha_warmup), ("beta3_warmup", cfg.beta3_warmup))}
        return AdEMAMix(groups, alpha=cfg.alpha, eps=cfg.eps, impl=cfg.impl, **warmup, **betas)  # type: ignore
    # muon: hidden matrices on Muon, the rest on AdamW
    for group in groups:
        if group["use_muon"]:
            group.update(momentum=cfg.momentum, nesterov=cfg.nesterov, ns_steps=cfg.ns_steps,
                         momentum_warmup=cfg.momentum_warmup)
        else:
            group.update(eps=cfg.eps, **betas)
    return MuonWithAuxAdamW(groups, impl=cfg.impl, data_parallel=data_parallel)


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
