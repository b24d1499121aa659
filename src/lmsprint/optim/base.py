"""What every lmsprint optimizer shares: float32 state for low-precision parameters, argument checks, the
kernel-path switch and the base class (:class:`Fp32StateOptimizer`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Any, Literal

import torch
from torch import Tensor

from lmsprint.config import OptimConfig

Impl = Literal["auto", "for", "foreach", "fused"]
Groups = list[dict[str, Any]]
LOW_PRECISION = (torch.bfloat16, torch.float16)


def state_dtype(p: Tensor) -> torch.dtype:
    """The dtype of ``p``'s optimizer state and update maths: float32 for bf16/fp16 parameters, else ``p.dtype``."""
    return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


def compute_view(p: Tensor) -> tuple[Tensor, Tensor]:
    """``(param, grad)`` in :func:`state_dtype`: ``p`` itself, or a float32 copy that :func:`write_back` stores."""
    dtype = state_dtype(p)
    work = p if p.dtype == dtype else p.to(dtype)
    return work, p.grad.to(dtype)  # type: ignore[union-attr]


def write_back(params: Iterable[Tensor], works: Iterable[Tensor]) -> None:
    """Copy float32 working copies back into their low-precision parameters (no-op for the others)."""
    for p, w in zip(params, works):
        if w is not p:
            p.copy_(w)


def params_with_grad(group: dict[str, Any]) -> list[Tensor]:
    """The group's parameters that have a gradient this step (the others get no state and are not touched)."""
    out = []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("lmsprint optimizers do not support sparse gradients; use a dense embedding")
        out.append(p)
    return out


def foreach_supported(device: torch.device) -> bool:
    """Whether torch has real multi-tensor kernels for ``device`` (on CPU the foreach ops loop per tensor)."""
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

    return device.type in _get_foreach_kernels_supported_devices()


def check_impl(impl: str, allowed: Sequence[str]) -> None:
    if impl not in allowed:
        raise ValueError(f"impl must be one of {', '.join(allowed)}, got {impl!r}")


def check_lr(lr: float) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")


def check_betas(betas: Sequence[float], n: int) -> None:
    if len(betas) != n:
        raise ValueError(f"betas must have {n} values, got {tuple(betas)!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"beta{i + 1} must be in [0, 1), got {b!r}")


def check_nonnegative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value >= 0.0):
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _to_state(value: Any, device: torch.device) -> Any:
    """Copy of a saved state value with floating tensors as float32 on ``device`` (lists/tuples recursed)."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=torch.float32 if value.is_floating_point() else value.dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_state(v, device) for v in value)
    return value


class Fp32StateOptimizer(torch.optim.Optimizer):
    """Base of the lmsprint optimizers: keeps the float32 state of bf16/fp16 parameters float32 on load.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its parameter's dtype, which
    would round Adam moments of a bf16 parameter to bf16; this class restores them from the saved float32 values.
    Attributes named in ``_attrs`` (the kernel-path switch ...) survive ``copy.deepcopy`` and pickling.
    """

    _attrs: tuple[str, ...] = ("impl",)
    impls: tuple[str, ...] = ("auto", "for")
    """The kernel paths (``impl``) the optimizer offers."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, impl: str) -> None:
        self.check_hparams(defaults)
        check_impl(impl, self.impls)
        self.impl = impl
        super().__init__(params, defaults)

    @staticmethod
    def check_hparams(h: dict[str, Any]) -> None:
        """Raise ValueError for a hyperparameter that cannot work (``h``: the defaults, or a group with them)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.check_hparams({**self.defaults, **param_group})
        super().add_param_group(param_group)

    @classmethod
    def from_config(cls, groups: Groups, cfg: OptimConfig, *, total_steps: int, data_parallel: bool) -> Any:
        """The optimizer of a run (:func:`lmsprint.optim.build_optimizer`): ``groups`` from the parameter policy,
        the hyperparameters from the ``[optim]`` section, already checked."""
        raise NotImplementedError(f"{cls.__name__} has no from_config")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            if p.dtype in LOW_PRECISION and pid in state_dict["state"]:
                self.state[p] = {k: _to_state(v, p.device) for k, v in state_dict["state"][pid].items()}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in self._attrs if hasattr(self, k)})
        return state


def config_betas(cfg: OptimConfig) -> dict[str, tuple[float, ...]]:
    """``{"betas": ...}`` when the config sets them, else nothing (the optimizer's own defaults)."""
    return {} if cfg.betas is None else {"betas": tuple(cfg.betas)}


def run_step(optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None,
             group_step: Callable[[dict[str, Any]], None]) -> Any:
    """The body of every ``step()``: evaluate the closure with grad enabled, then update each group."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    for group in optimizer.param_groups:
        group_step(group)
    return loss
