"""torch.distributed plumbing: process-group setup from torchrun's environment, DDP/FSDP2 wrapping, the
collectives the optimizers and the trainer need. (Sharded checkpoints: ``training/checkpointer.py``.)

Every function works in a single process too (world size 1, no process group), so the trainer has one code path.
See ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

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


def local(t: Tensor) -> Tensor:
    """This rank's part of a DTensor (a view sharing its storage), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor: all-gathered from a DTensor's shards, or the tensor itself."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_rows(rows: int, world: int) -> list[int]:
    """Rows of each rank when FSDP2 shards dim 0 (``torch.chunk`` sizes; trailing ranks may get fewer or none)."""
    chunk = -(-rows // world)
    return [max(0, min(chunk, rows - w * chunk)) for w in range(world)]


def _check_dim0_sharded(t: Tensor) -> None:
    from torch.distributed.tensor import Shard

    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):  # type: ignore[attr-defined]
        raise NotImplementedError(f"distributed Muon/SOAP support 1-D meshes sharded on dim 0 (FSDP2), got "
                                  f"placements {t.placements}")  # type: ignore[attr-defined]


def local_rows(t: Tensor) -> slice:
    """The rows of ``full(t)`` that this rank holds."""
    if not is_dtensor(t):
        return slice(None)
    _check_dim0_sharded(t)
    sizes = shard_rows(t.shape[0], world_size())
    r = get_rank()
    start = sum(sizes[:r])
    return slice(start, start + sizes[r])


# ----------------------------------------------------------------------------------------------------------
# spreading whole-matrix optimizer work over ranks (Muon's Newton-Schulz, SOAP's eigenbases)


def spread_over_ranks(params: Sequence[Tensor], data_parallel: bool) -> bool:
    """Whether an optimizer's whole-matrix work goes through the distributed path: always for FSDP2 shards (a
    shard is not a matrix), and for whole tensors when the optimizer was told the ranks hold identical gradients
    (``data_parallel=True``: DDP) and there is more than one rank."""
    return any(is_dtensor(p) for p in params) or (data_parallel and world_size() > 1)


def assign_owners(shapes: Sequence[tuple[int, ...]], world: int) -> list[int]:
    """The rank that computes each item: round-robin within groups of equal shape (so an owner batches its
    matrices of one shape), continuing across groups so every rank gets a share."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(tuple(s), []).append(i)
    owners, k = [0] * len(shapes), 0
    for idx in groups.values():
        for i in idx:
            owners[i] = k % world
            k += 1
    return owners


def _cat(parts: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.cat([p.reshape(-1) for p in parts]) if parts else torch.empty(0, dtype=dtype, device=device)


def _all_gather_v(buf: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """Every rank's 1-D ``buf`` (``sizes[w]`` elements on rank w): one all-gather of buffers padded to the longest."""
    n = max(sizes)
    padded = buf.new_zeros(n)
    padded[: buf.numel()] = buf
    out = buf.new_empty(len(sizes) * n)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, padded)
    return [out[w * n : w * n + sizes[w]] for w in range(len(sizes))]


def share_from_owners(computed: dict[int, list[Tensor]], shapes: Sequence[Sequence[tuple[int, ...]]],
                      owners: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> list[list[Tensor]]:
    """Give every rank the tensors each item's owner computed.

    Args:
        computed: this rank's results, item index -> tensors (only the items it owns).
        shapes: for every item, the shapes of its tensors (known on every rank).
        owners: the owner rank of every item.
        dtype, device: of the exchange buffers (results are returned in them).

    Returns:
        For every item, its tensors (one all-gather over all items of all ranks).
    """
    world, rank = world_size(), get_rank()
    numel = [sum(math.prod(s) for s in item) for item in shapes]
    mine = [t.to(dtype) for i in range(len(shapes)) if owners[i] == rank for t in computed[i]]
    sizes = [sum(numel[i] for i in range(len(shapes)) if owners[i] == w) for w in range(world)]
    pieces = _all_gather_v(_cat(mine, dtype, device), sizes)
    out: list[list[Tensor]] = [[] for _ in shapes]
    offsets = [0] * world
    for i, item in enumerate(shapes):
        w = owners[i]
        for s in item:
            n = math.prod(s)
            out[i].append(pieces[w][offsets[w] : offsets[w] + n].view(s))
            offsets[w] += n
    return out


def map_matrices(fn: Callable[[Tensor], Tensor], inputs: Sequence[Tensor], like: Sequence[Tensor], *,
                 dtype: torch.dtype) -> list[Tensor]:
    """Apply a whole-matrix function to many tensors, each matrix on one rank, with the results sent back.

    ``like[i]`` gives the layout of ``inputs[i]``: a plain tensor means every rank holds the same whole tensor
    (DDP, whose gradients are already all-reduced); a DTensor sharded on dim 0 (FSDP2) means ``inputs[i]`` is this
    rank's row shard. A tensor of shape ``(rows, ...)`` is treated as the matrix ``(rows, rest)``.

    Communication: under DDP one all-gather of the results (each rank receives what the others computed); under
    FSDP2 one all-to-all sends each row shard to the matrix's owner and one sends the result rows back to the
    shards' holders (each rank moves about ``2 (W - 1) / W**2`` of the matrices' elements, ``W`` ranks).

    Args:
        fn: maps a batch ``(k, rows, cols)`` of equal-shaped matrices in ``dtype`` to results of the same shape.
        inputs: whole tensors or local row shards.
        like: tensors with the global shape and layout (the parameters).
        dtype: dtype of the computation and the exchange.

    Returns:
        Results in ``dtype``, each in its input's layout and shape (whole, or this rank's rows).
    """
    if not inputs:
        return []
    world, rank = world_size(), get_rank()
    sharded = [is_dtensor(t) for t in like]
    if any(sharded) and not all(sharded):
        raise ValueError("map_matrices needs all tensors sharded (FSDP2) or all whole (DDP), not a mix")
    mats = [(t.shape[0], math.prod(t.shape[1:])) for t in like]
    if world == 1 and not any(sharded):  # nothing to spread
        return [fn(x.reshape(m).to(dtype)[None])[0].view(x.shape) for x, m in zip(inputs, mats)]
    owners = assign_owners(mats, world)
    device = inputs[0].device
    mine = [i for i in range(len(inputs)) if owners[i] == rank]
    whole: dict[int, Tensor] = {}
    if all(sharded):
        for t in like:
            _check_dim0_sharded(t)
        rows = [shard_rows(r, world) for r, _ in mats]
        # phase 1: row shards to the owners, which assemble whole matrices
        send = [_cat([inputs[i].to(dtype) for i in range(len(inputs)) if owners[i] == w], dtype, device)
                for w in range(world)]
        recv_sizes = [sum(rows[i][w] * mats[i][1] for i in mine) for w in range(world)]
        recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(recv, torch.cat(send), recv_sizes, [s.numel() for s in send])
        chunks = list(recv.split(recv_sizes))
        offsets = [0] * world
        for i in mine:
            parts = []
            for w in range(world):
                n = rows[i][w] * mats[i][1]
                parts.append(chunks[w][offsets[w] : offsets[w] + n].view(rows[i][w], mats[i][1]))
                offsets[w] += n
            whole[i] = torch.cat(parts)
    else:
        whole = {i: inputs[i].reshape(mats[i]).to(dtype) for i in mine}
    # the work: the owner batches its matrices of one shape
    results: dict[int, Tensor] = {}
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i in mine:
        by_shape.setdefault(mats[i], []).append(i)
    for idx in by_shape.values():
        for i, y in zip(idx, fn(torch.stack([whole[i] for i in idx])).unbind(0)):
            results[i] = y
    if not all(sharded):
        shared = share_from_owners({i: [results[i]] for i in mine}, [[tuple(t.shape)] for t in like], owners,
                                   dtype=dtype, device=device)
        return [item[0] for item in shared]
    # phase 2: each holder's rows of every result back to it
    starts = [[sum(r[:w]) for w in range(world)] for r in rows]
    send = [_cat([results[i][starts[i][w] : starts[i][w] + rows[i][w]] for i in mine], dtype, device)
            for w in range(world)]
    recv_sizes = [sum(rows[i][rank] * mats[i][1] for i in range(len(inputs)) if owners[i] == w) for w in range(world)]
    recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(recv, torch.cat(send), recv_sizes, [s.numel() for s in send])
    chunks = list(recv.split(recv_sizes))
    offsets = [0] * world
    out: list[Tensor] = []
    for i in range(len(inputs)):
        w, n = owners[i], rows[i][rank] * mats[i][1]
        out.append(chunks[w][offsets[w] : offsets[w] + n].view(inputs[i].shape))
        offsets[w] += n
    return out
