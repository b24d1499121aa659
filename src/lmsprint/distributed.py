"""torch.distributed plumbing: process-group setup from torchrun's environment, DDP/FSDP2 wrapping, the
collectives the optimizers and the trainer need. (Sharded checkpoints: ``training/checkpointer.py``.)

Every function works in a single process too (world size 1, no process group), so the trainer has one code path.
See ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmsprint.errors import ConfigError

# NVLink multicast stays off on the shared GPU hosts (a program using it can take the host's GPUs out of service):
# NCCL's NVLink SHARP (NVLS) collectives, symmetric-memory multicast and NVSHMEM's NVLS
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def apply_safe_env(env: MutableMapping[str, str] | None = None) -> None:
    """Write :data:`SAFE_ENV` into ``env`` (default ``os.environ``), overriding any other value.

    Called before any process group / NCCL initialisation and before ``--nproc`` starts workers (which inherit it).
    """
    (os.environ if env is None else env).update(SAFE_ENV)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(pref: str) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--train.device=cuda but no CUDA GPU is available here; use --train.device=cpu or auto")
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def setup(device_pref: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...), if any.

    World size 1 (no torchrun, or ``--nproc-per-node 1``) creates no process group, so several independent
    single-process runs can share a host, each on the GPU ``CUDA_VISIBLE_DEVICES`` gives it.
    """
    apply_safe_env()
    device = resolve_device(device_pref)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        return DistInfo(0, 1, 0, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
        if local_world > torch.cuda.device_count():  # checked on every rank: each reports (and exits) alike
            raise ConfigError(f"{local_world} processes on this node but only {torch.cuda.device_count()} GPUs are "
                              "visible; start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun), known before any process group
    exists and after it is gone: the CLI and the run directory's cleanup act on rank 0 only."""
    return int(os.environ.get("RANK", "0"))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------------------------------------
# wrapping


def mixed_precision(strategy: str, precision: str, world: int) -> tuple[torch.dtype | None, str]:
    """``(FSDP param_dtype, autocast precision)`` of a run.

    With FSDP2 and ``bf16`` the sharded parameters stay float32, FSDP all-gathers them as bf16 and reduce-scatters
    gradients in float32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``), and the forward runs on
    those bf16 weights *without* autocast, as torchtitan does: autocast would only re-cast bf16 weights to bf16 and
    push a few ops back to float32 at the price of its dispatch overhead. Everything else (one process, DDP, fp16,
    bf16-pure, fp32) keeps the trainer's autocast and no FSDP policy.
    """
    if strategy == "fsdp" and world > 1 and precision == "bf16":
        return torch.bfloat16, "fp32"
    return None, precision


def wrap_model(model: nn.Module, strategy: str, info: DistInfo, *, param_dtype: torch.dtype | None = None
               ) -> nn.Module:
    """DDP or FSDP2 around a model whose blocks are already compiled (``GPT.compile_blocks``); the model itself in
    one process.

    The order is torchtitan's: per-block ``torch.compile`` first, then data parallelism. FSDP2 shards each block
    (``fully_shard``), then the root (embedding, final norm, head). It returns the same module object, whose
    parameters are now DTensors sharded on dim 0; DDP returns a wrapper around the unchanged model.
    """
    if info.world == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else \
            MixedPrecisionPolicy()
        for block in model.transformer.h:  # type: ignore[union-attr]
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if strategy != "ddp":
        raise ConfigError(f"--dist.strategy={strategy!r} is not known; choose ddp or fsdp")
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, strategy: str, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP2) on gradient-accumulation micro-steps (all but
    the last). FSDP2 then holds unsharded float32 gradients until the last micro-step."""
    if not enabled:
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if strategy == "fsdp" and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def grad_scaler(device: torch.device, sharded: bool) -> torch.amp.GradScaler:
    """fp16 loss scaler; under FSDP2 the sharded one, which all-reduces the inf check across ranks."""
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


# ----------------------------------------------------------------------------------------------------------
# DTensor helpers (FSDP2 parameters, gradients and optimizer state)


def is_dtensor(t: Any) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")
