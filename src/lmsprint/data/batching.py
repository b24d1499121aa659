"""Row plans: how one epoch of the token stream is cut into rows, for each batching strategy.

A row is a list of spans ``(start, n)`` of the token stream: the row's inputs are ``stream[start:start+n]``
and its targets ``stream[start+1:start+n+1]``, span after span; the rest of the row is padding (targets
ignored). Over an epoch every stream position is an input exactly once, so no token is lost or repeated.

- ``pack``: the stream cut into consecutive rows of ``seq_len`` (the last one padded); rows shuffled.
- ``pad``: one document per row (documents longer than a row continue in the next rows); documents shuffled.
- ``bucket``: the ``pad`` rows, sorted by length within windows of ``bucket_window`` batches, so each batch
  holds rows of similar length and pads less; batches shuffled within the window, aligned with optimizer steps.
- ``best-fit``: whole documents placed into rows by best-fit decreasing (each into the fullest row it still
  fits); a document longer than a row fills whole rows and its remainder is placed like a document.

One strategy samples instead of partitioning: ``random`` draws each row as a window of ``seq_len`` tokens starting
at a uniformly random stream position, with replacement (nanoGPT's ``get_batch``); an "epoch" is as many rows as
``pack`` cuts, so some tokens are seen twice and others not at all.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from lmsprint.data.shards import Shard
from lmsprint.errors import DataError

STRATEGIES = ("pack", "pad", "bucket", "best-fit")  # each partitions an epoch: every token an input exactly once
SAMPLED = ("random",)  # rows drawn with replacement
BEST_FIT_WINDOW = 65536  # documents placed together; bounds memory and time on very large corpora


class TokenStream:
    """The concatenation of a split's shards, with global document starts."""

    def __init__(self, shards: list[Shard]) -> None:
        self.shards = shards
        sizes = [s.header.n_tokens for s in shards]
        self.offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        self.n_tokens = int(self.offsets[-1])
        self.doc_starts = np.concatenate([s.doc_starts + off for s, off in zip(shards, self.offsets)]) \
            if shards else np.zeros(0, np.int64)
        self.doc_lens = np.diff(np.append(self.doc_starts, self.n_tokens))

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens ``[start, start+n)`` as int64 (crossing shard boundaries if needed)."""
        out = np.empty(n, dtype=np.int64)
        filled = 0
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < n:
            shard, off = self.shards[i], int(self.offsets[i])
            lo = start + filled - off
            take = min(n - filled, shard.header.n_tokens - lo)
            out[filled : filled + take] = shard.tokens[lo : lo + take]
            filled += take
            i += 1
        return out

    def doc_index(self, positions: np.ndarray) -> np.ndarray:
        """The document each stream position belongs to."""
        return np.searchsorted(self.doc_starts, positions, side="right") - 1


@dataclass
class RowPlan:
    """Rows of one epoch in CSR form: the spans of row i are ``span_start/len[ptr[i]:ptr[i+1]]``."""

    ptr: np.ndarray  # (R+1,) int64
    span_start: np.ndarray  # (S,) int64
    span_len: np.ndarray  # (S,) int64

    @property
    def n_rows(self) -> int:
        return len(self.ptr) - 1

    def row_lengths(self) -> np.ndarray:
        return np.add.reduceat(self.span_len, self.ptr[:-1]) if len(self.span_len) else np.zeros(0, np.int64)

    def take(self, rows: np.ndarray) -> RowPlan:
        """The plan restricted to (and reordered as) ``rows``."""
        counts = self.ptr[rows + 1] - self.ptr[rows]
        ptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        idx = np.concatenate([np.arange(self.ptr[r], self.ptr[r + 1]) for r in rows]) if len(rows) else \
            np.zeros(0, np.int64)
        return RowPlan(ptr, self.span_start[idx], self.span_len[idx])


def _single_span_rows(starts: np.ndarray, lens: np.ndarray) -> RowPlan:
    return RowPlan(np.arange(len(starts) + 1, dtype=np.int64), starts.astype(np.int64), lens.astype(np.int64))


def _chunk(starts: np.ndarray, lens: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut each (start, len) into consecutive pieces of at most ``size``."""
    pieces = (lens + size - 1) // size
    doc = np.repeat(np.arange(len(starts)), pieces)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    s = starts[doc] + k * size
    n = np.minimum(size, lens[doc] - k * size)
    return s, n


def pack_plan(stream: TokenStream, seq_len: int, rng: np.random.Generator) -> RowPlan:
    starts = np.arange(0, stream.n_tokens, seq_len, dtype=np.int64)
    lens = np.minimum(seq_len, stream.n_tokens - starts)
    order = rng.permutation(len(starts))
    return _single_span_rows(starts[order], lens[order])


def random_plan(stream: TokenStream, seq_len: int, rng: np.random.Generator) -> RowPlan:
    """nanoGPT's sampling: row starts uniform in ``[0, n_tokens - seq_len)``, so every row has ``seq_len`` inputs and
    ``seq_len`` targets (``torch.randint(len(data) - block_size, ...)``); as many rows per epoch as ``pack``."""
    high = stream.n_tokens - seq_len  # a window needs seq_len + 1 tokens
    if high < 1:
        raise DataError(f"--data.batching=random needs more than seq_len + 1 = {seq_len + 1} training tokens, the "
                        f"corpus has {stream.n_tokens}; use a shorter --data.seq_len or --data.batching=pack")
    n_rows = -(-stream.n_tokens // seq_len)
    return _single_span_rows(rng.integers(0, high, size=n_rows, dtype=np.int64), np.full(n_rows, seq_len, np.int64))


def pad_plan(stream: TokenStream, seq_len: int, rng: np.random.Generator) -> RowPlan:
    order = rng.permutation(len(stream.doc_starts))
    s, n = _chunk(stream.doc_starts[order], stream.doc_lens[order], seq_len)
    return _single_span_rows(s, n)


def bucket_plan(stream: TokenStream, seq_len: int, rng: np.random.Generator, *, batch_rows: int, window: int,
                lead: int = 0) -> RowPlan:
    """Batches are aligned with optimizer steps, so that no step straddles two buckets: ``lead`` rows of the
    epoch's first step come from the previous epoch (the first batch is short by as many), and a short last
    batch stays last (it shares a step with the next epoch)."""
    plan = pad_plan(stream, seq_len, rng)
    lens = plan.span_len
    first = min((batch_rows - lead) % batch_rows, len(lens))
    edges = sorted({0, first, *range(first, len(lens), batch_rows * window), len(lens)})
    order: list[np.ndarray] = []
    for lo, hi in zip(edges, edges[1:]):
        idx = np.arange(lo, hi)
        idx = idx[np.argsort(-lens[idx], kind="stable")]  # longest first within the window
        batches = [idx[i : i + batch_rows] for i in range(0, len(idx), batch_rows)]
        full = [b for b in batches if len(b) == batch_rows]  # a short batch is the window's last (or only) one
        order += [full[j] for j in rng.permutation(len(full))] + batches[len(full) :]
    rows = np.concatenate(order) if order else np.zeros(0, np.int64)
    return _single_span_rows(plan.span_start[rows], plan.span_len[rows])


def best_fit_plan(stream: TokenStream, seq_len: int, rng: np.random.Generator) -> RowPlan:
    order = rng.permutation(len(stream.doc_starts))
    starts, lens = stream.doc_starts[order], stream.doc_lens[order]
    full = lens // seq_len
    rows: list[list[tuple[int, int]]] = []
    # whole rows of long documents
    fs, fn = _chunk(starts[full > 0], full[full > 0] * seq_len, seq_len)
    rows += [[(int(a), int(b))] for a, b in zip(fs, fn)]
    # remainders (and short documents), best-fit decreasing within windows
    rem_s, rem_n = starts + full * seq_len, lens - full * seq_len
    keep = rem_n > 0
    rem_s, rem_n = rem_s[keep], rem_n[keep]
    for lo in range(0, len(rem_s), BEST_FIT_WINDOW):
        ws, wn = rem_s[lo : lo + BEST_FIT_WINDOW], rem_n[lo : lo + BEST_FIT_WINDOW]
        free: list[tuple[int, int]] = []  # (free space, row index), sorted
        for j in np.argsort(-wn, kind="stable"):
            n = int(wn[j])
            k = bisect.bisect_left(free, (n, -1))
            if k < len(free):
                space, r = free.pop(k)
                rows[r].append((int(ws[j]), n))
                if space - n > 0:
                    bisect.insort(free, (space - n, r))
            else:
                rows.append([(int(ws[j]), n)])
                if seq_len - n > 0:
                    bisect.insort(free, (seq_len - n, len(rows) - 1))
    perm = rng.permutation(len(rows))
    counts = np.array([len(rows[r]) for r in perm], dtype=np.int64)
    flat = [span for r in perm for span in rows[r]]
    ptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    arr = np.array(flat, dtype=np.int64).reshape(-1, 2)
    return RowPlan(ptr, arr[:, 0], arr[:, 1])


def epoch_plan(stream: TokenStream, strategy: str, seq_len: int, *, seed: int, epoch: int, batch_rows: int = 1,
               bucket_window: int = 64, lead: int = 0) -> RowPlan:
    """The rows of ``epoch`` for ``strategy`` (deterministic in seed, epoch and, for bucket, ``lead``)."""
    rng = np.random.default_rng([seed, epoch])
    if strategy == "pack":
        return pack_plan(stream, seq_len, rng)
    if strategy == "pad":
        return pad_plan(stream, seq_len, rng)
    if strategy == "bucket":
        return bucket_plan(stream, seq_len, rng, batch_rows=batch_rows, window=bucket_window, lead=lead)
    if strategy == "best-fit":
        return best_fit_plan(stream, seq_len, rng)
    if strategy == "random":
        return random_plan(stream, seq_len, rng)
    raise ValueError(f"unknown batching strategy {strategy!r}; choose from {', '.join(STRATEGIES + SAMPLED)}")


def padded_length(longest: int, *, multiple: int, seq_len: int) -> int:
    """pad/bucket rows are padded to the longest row of the micro-batch, rounded up to ``multiple``."""
    return min(seq_len, (longest + multiple - 1) // multiple * multiple)


def plan_stats(plan: RowPlan, *, strategy: str, seq_len: int, micro_rows: int, pad_multiple: int) -> dict:
    """Rows, real tokens, padded tokens and waste fraction of an epoch, micro-batch by micro-batch."""
    lens = plan.row_lengths()
    slots = 0
    for lo in range(0, len(lens), micro_rows):
        chunk = lens[lo : lo + micro_rows]
        width = padded_length(int(chunk.max()), multiple=pad_multiple, seq_len=seq_len) \
            if strategy in ("pad", "bucket") else seq_len
        slots += len(chunk) * width
    real = int(lens.sum())
    return {
        "strategy": strategy,
        "rows": int(plan.n_rows),
        "tokens": real,
        "slots": int(slots),
        "waste": 1.0 - real / slots if slots else 0.0,
        "tokens_per_row": real / max(plan.n_rows, 1),
    }
