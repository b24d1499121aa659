"""The training and evaluation loaders: deterministic, resumable and rank-aware.

Epoch plans (``batching.py``) are concatenated into one endless stream of rows; optimizer step ``k`` takes
the next ``batch_size`` rows of it, and rank ``r`` of ``W`` takes the ``r``-th contiguous share, split into
micro-batches. Every rank walks the same plan, so ranks see disjoint rows and agree on the step's global
target count (used to normalise the loss exactly) without communicating. The state is (epoch, position,
seed): three integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lmsprint.data.batching import RowPlan, TokenStream, epoch_plan, padded_length
from lmsprint.data.curriculum import SeqLenSchedule
from lmsprint.errors import DataError
from lmsprint.model.gpt import IGNORE_INDEX  # the loss skips these targets (padding)


@dataclass
class MicroBatch:
    inputs: Tensor  # (m, T) int64
    targets: Tensor  # (m, T) int64, IGNORE_INDEX where padded
    pos: Tensor | None = None  # (m, T) positions restarting at each sequence
    doc_ids: Tensor | None = None  # (m, T) sequence ids: attention stays within an id

    def to(self, device: torch.device) -> MicroBatch:
        """Copy to ``device``; from pinned memory and asynchronously on CUDA."""
        if device.type != "cuda":
            return self

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.pin_memory().to(device, non_blocking=True)

        return MicroBatch(move(self.inputs), move(self.targets), move(self.pos), move(self.doc_ids))  # type: ignore[arg-type]


@dataclass
class StepBatch:
    micro: list[MicroBatch]  # this rank's micro-batches
    n_targets: int  # non-ignored targets in the whole step, all ranks together
    n_tokens: int  # real (non-padding) input tokens in the whole step, all ranks together
    seq_len: int  # curriculum length at this step
    sequences: int  # sequences in the whole step (rows cut into seq_len-long pieces)
    n_slots: int  # computed positions (real + padding) in the whole step, all ranks together
    attn_len: float  # attention length per computed position, averaged over n_slots (the T of 12 L C T FLOPs)


def _row_arrays(stream: TokenStream, plan: RowPlan, width: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """inputs, targets and stream positions (-1 for padding) of the plan's rows, each (rows, width)."""
    rows = plan.n_rows
    inputs = np.full((rows, width), pad_id, dtype=np.int64)
    targets = np.full((rows, width), IGNORE_INDEX, dtype=np.int64)
    positions = np.full((rows, width), -1, dtype=np.int64)
    for i in range(rows):
        off = 0
        for j in range(plan.ptr[i], plan.ptr[i + 1]):
            s, n = int(plan.span_start[j]), int(plan.span_len[j])
            toks = stream.read(s, min(n + 1, stream.n_tokens - s))
            inputs[i, off : off + n] = toks[:n]
            targets[i, off : off + len(toks) - 1] = toks[1:]
            positions[i, off : off + n] = np.arange(s, s + n)
            off += n
    _check_ids(stream, inputs, targets, positions)
    return inputs, targets, positions


def _check_ids(stream: TokenStream, inputs: np.ndarray, targets: np.ndarray, positions: np.ndarray) -> None:
    """Token ids beyond the vocabulary (a damaged shard) would index past the embedding: say which shard."""
    if not stream.shards or not inputs.size:
        return
    vocab = stream.shards[0].header.vocab_size
    if max(int(inputs.max()), int(targets.max())) < vocab:
        return
    where = np.argwhere(inputs >= vocab)
    pos = int(positions[tuple(where[0])]) if len(where) else int(positions.max())
    shard = stream.shards[int(np.searchsorted(stream.offsets, pos, side="right")) - 1]
    raise DataError(f"{shard.path} holds token id {max(int(inputs.max()), int(targets.max()))}, beyond its "
                    f"vocabulary of {vocab}: the shard is corrupt; re-run `lmsprint prepare`")


def segments(doc: np.ndarray | None, shape: tuple[int, int], cut: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Sequence ids and positions of rows, given per-token document ids and per-row cut lengths.

    A new sequence starts at column 0, wherever the document changes (if ``doc`` is given) and every
    ``cut[i]`` columns of row ``i`` (if ``cut`` is given). Positions restart at 0 at each sequence start.
    """
    rows, width = shape
    col = np.arange(width)
    starts = np.zeros(shape, dtype=bool)
    starts[:, 0] = True
    if doc is not None:
        starts[:, 1:] |= doc[:, 1:] != doc[:, :-1]
    if cut is not None:
        starts |= (col[None, :] % cut[:, None]) == 0
    seg = np.cumsum(starts, axis=1, dtype=np.int64)
    first = np.maximum.accumulate(np.where(starts, col[None, :], 0), axis=1)
    return seg, col[None, :] - first


class Loader:
    """Training batches for one rank.

    Args:
        stream: the training token stream.
        strategy: pack, pad, bucket or best-fit.
        seq_len: row length.
        batch_rows: rows per optimizer step over all ranks.
        micro_rows: rows per forward pass on this rank.
        rank, world: this process's rank and the number of processes.
        seed: seed of the epoch shuffles.
        doc_mask: attention stays within documents (pack/best-fit).
        curriculum: sequence-length schedule (None = full length always).
        pad_multiple, bucket_window: pad/bucket settings.
        pad_id: token id written into padding (never a target).
    """

    def __init__(self, stream: TokenStream, *, strategy: str, seq_len: int, batch_rows: int, micro_rows: int,
                 rank: int = 0, world: int = 1, seed: int = 0, doc_mask: bool = False,
                 curriculum: SeqLenSchedule | None = None, pad_multiple: int = 64, bucket_window: int = 64,
                 pad_id: int = 0) -> None:
        if batch_rows % (micro_rows * world) != 0:
            raise ValueError(f"batch of {batch_rows} rows does not split into {world} ranks x micro-batches of "
                             f"{micro_rows}")
        self.stream = stream
        self.strategy = strategy
        self.seq_len = seq_len
        self.batch_rows = batch_rows
        self.micro_rows = micro_rows
        self.rank, self.world = rank, world
        self.doc_mask = doc_mask
        self.curriculum = curriculum
        self.pad_multiple = pad_multiple
        self.bucket_window = bucket_window
        self.pad_id = pad_id
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._lead = 0  # rows of the current epoch's first step taken from the previous epoch (bucket alignment)
        self._plan: RowPlan | None = None

    @property
    def masked(self) -> bool:
        """Whether batches carry sequence ids and positions (document masking or a length curriculum)."""
        return self.doc_mask or self.curriculum is not None

    def _epoch_plan(self) -> RowPlan:
        if self._plan is None:
            self._plan = epoch_plan(self.stream, self.strategy, self.seq_len, seed=self.seed, epoch=self.epoch,
                                    batch_rows=self.batch_rows, bucket_window=self.bucket_window, lead=self._lead)
        return self._plan

    def _take_rows(self, n: int) -> RowPlan:
        parts: list[RowPlan] = []
        want = n
        while n > 0:
            plan = self._epoch_plan()
            take = min(n, plan.n_rows - self.pos)
            parts.append(plan.take(np.arange(self.pos, self.pos + take)))
            self.pos += take
            n -= take
            if self.pos >= plan.n_rows:
                self.epoch, self.pos, self._plan = self.epoch + 1, 0, None
                self._lead = (want - n) % self.batch_rows  # rows of this step already taken
        ptrs, offset = [np.zeros(1, np.int64)], 0
        for p in parts:
            ptrs.append(p.ptr[1:] + offset)
            offset += len(p.span_start)
        return RowPlan(np.concatenate(ptrs), np.concatenate([p.span_start for p in parts]),
                       np.concatenate([p.span_len for p in parts]))

    def _cuts(self, step: int, length: int) -> np.ndarray | None:
        """Per-row sequence length for this rank's rows (None when every row is one full-length sequence)."""
        c = self.curriculum
        if c is None:
            return None
        cut = np.full(self.batch_rows, length, dtype=np.int64)
        if length == self.seq_len and c.short_mix > 0:
            rng = np.random.default_rng([self.seed, 7, step])
            cut[rng.random(self.batch_rows) < c.short_mix] = c.start
        return cut

    def _micro_rows(self, rank: int) -> list[np.ndarray]:
        """Rows (indices into the step's rows) of ``rank``'s micro-batches. The step is cut into consecutive
        micro-batches dealt to ranks in snake order (0..W-1, W-1..0, ...): bucket steps are sorted longest
        first, so contiguous shares gave rank 0 all the longest rows and made every other rank wait for it."""
        m, w = self.micro_rows, self.world
        out = []
        for k in range(self.batch_rows // (m * w)):
            g = k * w + (rank if k % 2 == 0 else w - 1 - rank)
            out.append(np.arange(g * m, (g + 1) * m))
        return out

    def _width(self, row_lengths: np.ndarray) -> int:
        if self.strategy in ("pad", "bucket"):
            return padded_length(int(row_lengths.max()), multiple=self.pad_multiple, seq_len=self.seq_len)
        return self.seq_len

    def next(self, step: int) -> StepBatch:
        """The batch of optimizer step ``step`` for this rank (host tensors)."""
        plan = self._take_rows(self.batch_rows)
        length = self.curriculum.length_at(step) if self.curriculum else self.seq_len
        cuts = self._cuts(step, length)
        ends = plan.span_start + plan.span_len
        n_tokens = int(plan.span_len.sum())
        n_targets = n_tokens - int((ends == self.stream.n_tokens).sum())
        sequences = int(np.sum(-(-self.seq_len // cuts))) if cuts is not None else self.batch_rows
        lens = plan.row_lengths()
        dealt = [self._micro_rows(r) for r in range(self.world)]
        widths = {r: [self._width(lens[rows]) for rows in dealt[r]] for r in range(self.world)}
        n_slots = self.micro_rows * sum(sum(w) for w in widths.values())
        if self.strategy in ("pad", "bucket"):  # a position attends over its micro-batch's width
            attn_len = self.micro_rows * sum(w * w for ws in widths.values() for w in ws) / n_slots
        else:  # full-width rows, cut into sequences of the curriculum's length(s)
            attn_len = float(self.seq_len if cuts is None else cuts.mean())
        micro = []
        for rows, width in zip(dealt[self.rank], widths[self.rank]):
            sub = plan.take(rows)
            inputs, targets, positions = _row_arrays(self.stream, sub, width, self.pad_id)
            mb = MicroBatch(torch.from_numpy(inputs), torch.from_numpy(targets))
            if self.masked:
                doc = None
                if self.doc_mask:
                    doc = np.where(positions >= 0, self.stream.doc_index(np.maximum(positions, 0)), -1)
                seg, pos = segments(doc, inputs.shape, None if cuts is None else cuts[rows])
                mb.doc_ids, mb.pos = torch.from_numpy(seg), torch.from_numpy(pos)
            micro.append(mb)
        return StepBatch(micro, n_targets, n_tokens, length, sequences, n_slots, attn_len)

    def reseed(self, seed: int) -> None:
        """Continue with a different shuffle (after a rollback), from the start of a new epoch."""
        self.seed, self.epoch, self.pos, self._plan, self._lead = seed, self.epoch + 1, 0, None, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos, self.seed = int(state["epoch"]), int(state["pos"]), int(state["seed"])
        # states are saved between steps, so the epoch's first step ended at pos = batch_rows - lead (mod batch_rows)
        self._lead = -self.pos % self.batch_rows
        self._plan = None


def eval_batches(stream: TokenStream, *, seq_len: int, micro_rows: int, max_tokens: int, rank: int = 0,
                 world: int = 1, masked: bool = False, doc_mask: bool = False, pad_id: int = 0
                 ) -> list[MicroBatch]:
    """A fixed validation set: the first ``max_tokens`` tokens of the stream in rows of ``seq_len``.

    Rows are dealt to ranks round-robin; every rank gets the same number of micro-batches of ``micro_rows``
    (the last padded with ignored rows), so shapes match training and nothing recompiles.
    """
    n = min(max_tokens, stream.n_tokens)
    starts = np.arange(0, n, seq_len, dtype=np.int64)
    lens = np.minimum(seq_len, n - starts)
    per_rank = -(-len(starts) // world)
    n_micro = -(-per_rank // micro_rows)
    out = []
    mine = np.arange(rank, len(starts), world)
    for k in range(n_micro):
        rows = mine[k * micro_rows : (k + 1) * micro_rows]
        plan = RowPlan(np.arange(len(rows) + 1, dtype=np.int64), starts[rows], lens[rows])
        inputs, targets, positions = _row_arrays(stream, plan, seq_len, pad_id)
        if len(rows) < micro_rows:  # pad with ignored rows to the training shape
            extra = micro_rows - len(rows)
            inputs = np.concatenate([inputs, np.full((extra, seq_len), pad_id, np.int64)])
            targets = np.concatenate([targets, np.full((extra, seq_len), IGNORE_INDEX, np.int64)])
            positions = np.concatenate([positions, np.full((extra, seq_len), -1, np.int64)])
        # the last evaluated token's target lies beyond the budget: ignore it so every rank counts the same set
        targets[positions >= n - 1] = IGNORE_INDEX
        mb = MicroBatch(torch.from_numpy(inputs), torch.from_numpy(targets))
        if masked:
            doc = np.where(positions >= 0, stream.doc_index(np.maximum(positions, 0)), -1) if doc_mask else None
            seg, pos = segments(doc, inputs.shape, None)
            mb.doc_ids, mb.pos = torch.from_numpy(seg), torch.from_numpy(pos)
        out.append(mb)
    return out
