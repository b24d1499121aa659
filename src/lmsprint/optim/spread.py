"""Spreading whole-matrix optimizer work over the ranks of a process group: Muon's Newton-Schulz iterations and
SOAP's eigenbases are computed for each matrix on one rank and the results sent to the others, for whole
tensors (DDP: every rank holds the same gradients) and FSDP2 row shards (DTensors sharded on dim 0).
See ``docs/distributed.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lmsprint.distributed import get_rank, is_dtensor, world_size


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


def gather_rows(parts: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """Whole tensors from this rank's rows of them: ``parts[i]`` is this rank's rows of a tensor laid out as
    ``like[i]``, an FSDP2 DTensor sharded on dim 0 (the whole ``(like[i].shape[0], *parts[i].shape[1:])`` tensor is
    all-gathered), or a plain tensor (``parts[i]`` is already whole and is returned as it is). One all-gather for all
    sharded tensors; every rank must call it with the same ``like``."""
    sharded = [i for i, t in enumerate(like) if is_dtensor(t)]
    out = list(parts)
    if not sharded:
        return out
    world = world_size()
    rows = {i: shard_rows(like[i].shape[0], world) for i in sharded}
    inner = {i: math.prod(parts[i].shape[1:]) for i in sharded}
    ref = parts[sharded[0]]
    sizes = [sum(rows[i][w] * inner[i] for i in sharded) for w in range(world)]
    pieces = _all_gather_v(_cat([parts[i] for i in sharded], ref.dtype, ref.device), sizes)
    offsets = [0] * world
    for i in sharded:
        chunks = []
        for w in range(world):
            n = rows[i][w] * inner[i]
            chunks.append(pieces[w][offsets[w] : offsets[w] + n])
            offsets[w] += n
        out[i] = torch.cat(chunks).view(like[i].shape[0], *parts[i].shape[1:])
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
