"""The token shard format: a fixed header, the tokens, then the document start offsets.

Layout (all little-endian)::

    offset  size  field
    0       8     magic b"LMSPRINT"
    8       4     format version (uint32, currently 1)
    12      4     bytes per token (uint32: 2 = uint16, 4 = uint32)
    16      8     number of tokens N (uint64)
    24      8     number of documents D (uint64)
    32      8     vocabulary size (uint64)
    40      8     end-of-document token id (uint64)
    48      32    SHA-256 of the tokenizer that made the shard
    80      176   zero padding up to 256 bytes
    256     N*b   tokens
    ...     D*8   document start offsets into the tokens (uint64, increasing, the first is 0)

Every document begins with the end-of-document token, so documents are separated by it. uint16 is used when
the vocabulary fits in 65,536 ids, else uint32. Shards are written to a temporary file and renamed into
place, so a shard that exists is complete; the size check on read catches truncation.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmsprint.errors import DataError

MAGIC = b"LMSPRINT"
VERSION = 1
HEADER_BYTES = 256
_FIELDS = struct.Struct("<8sIIQQQQ32s")  # magic, version, itemsize, n_tokens, n_docs, vocab, eot, tokenizer sha


@dataclass(frozen=True)
class ShardHeader:
    itemsize: int
    n_tokens: int
    n_docs: int
    vocab_size: int
    eot_id: int
    tokenizer_sha: bytes


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _pack_header(h: ShardHeader) -> bytes:
    raw = _FIELDS.pack(MAGIC, VERSION, h.itemsize, h.n_tokens, h.n_docs, h.vocab_size, h.eot_id, h.tokenizer_sha)
    return raw.ljust(HEADER_BYTES, b"\0")


def read_header(path: Path) -> ShardHeader:
    """Read and check a shard's header; raise DataError naming the file and the fix if it is not valid."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"shard {path} not found; re-run `lmsprint prepare`") from None
    if len(raw) < _FIELDS.size or raw[:8] != MAGIC:
        raise DataError(f"{path} is not an lmsprint token shard (bad header); re-run `lmsprint prepare`")
    magic, version, itemsize, n_tokens, n_docs, vocab, eot, sha = _FIELDS.unpack(raw[: _FIELDS.size])
    if version != VERSION:
        raise DataError(f"{path} has shard format version {version}, this lmsprint reads {VERSION}; "
                        "re-run `lmsprint prepare`")
    if itemsize not in (2, 4) or vocab == 0 or eot >= vocab or (itemsize == 2 and vocab > 2**16):
        raise DataError(f"{path} has a corrupt header (dtype {itemsize} bytes, vocab {vocab}, eot {eot}); "
                        "re-run `lmsprint prepare`")
    expected = HEADER_BYTES + n_tokens * itemsize + n_docs * 8
    actual = os.path.getsize(path)
    if actual != expected:
        raise DataError(f"{path} is truncated or corrupt ({actual} bytes, header says {expected}); "
                        "re-run `lmsprint prepare`")
    return ShardHeader(itemsize, n_tokens, n_docs, vocab, eot, sha)


@dataclass
class Shard:
    path: Path
    header: ShardHeader
    tokens: np.ndarray  # (N,) memmap of uint16/uint32
    doc_starts: np.ndarray  # (D,) int64


def read_shard(path: Path) -> Shard:
    h = read_header(path)
    dtype = np.uint16 if h.itemsize == 2 else np.uint32
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(h.n_tokens,))
    starts = np.fromfile(path, dtype="<u8", count=h.n_docs, offset=HEADER_BYTES + h.n_tokens * h.itemsize)
    starts = starts.astype(np.int64)
    if h.n_docs and (starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= h.n_tokens):
        raise DataError(f"{path} has a corrupt document index; re-run `lmsprint prepare`")
    return Shard(path, h, tokens, starts)


class ShardWriter:
    """Stream documents into a shard file; ``close()`` writes the index and header and renames into place."""

    def __init__(self, path: Path, *, vocab_size: int, eot_id: int, tokenizer_sha: bytes) -> None:
        self.path = Path(path)
        self.dtype = dtype_for_vocab(vocab_size)
        self.vocab_size = vocab_size
        self.eot_id = eot_id
        self.tokenizer_sha = tokenizer_sha
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._f = open(self.tmp, "wb")
        self._f.write(b"\0" * HEADER_BYTES)
        self.n_tokens = 0
        self.doc_starts: list[int] = []

    def add(self, ids: np.ndarray) -> None:
        """Append one document (its token ids, starting with the end-of-document token)."""
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise DataError(f"token id {int(ids.max())} does not fit the vocabulary of {self.vocab_size}")
        self.doc_starts.append(self.n_tokens)
        self._f.write(ids.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self.n_tokens += int(ids.size)

    def close(self) -> ShardHeader:
        header = ShardHeader(self.dtype.itemsize, self.n_tokens, len(self.doc_starts), self.vocab_size, self.eot_id,
                             self.tokenizer_sha)
        self._f.write(np.asarray(self.doc_starts, dtype="<u8").tobytes())
        self._f.seek(0)
        self._f.write(_pack_header(header))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return header

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


def write_shard(path: Path, docs: list[np.ndarray], *, vocab_size: int, eot_id: int,
                tokenizer_sha: bytes = b"\0" * 32) -> ShardHeader:
    """Write a whole shard at once (tests and small data)."""
    w = ShardWriter(path, vocab_size=vocab_size, eot_id=eot_id, tokenizer_sha=tokenizer_sha)
    for d in docs:
        w.add(np.asarray(d))
    return w.close()
