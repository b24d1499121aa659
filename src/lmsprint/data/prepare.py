"""Text -> token shards: ``lmsprint prepare`` and the cache that ``lmsprint train`` uses.

A prepared data directory holds ``train-NNNNN.bin`` and ``val-NNNNN.bin`` shards (format in ``shards.py``),
the ``tokenizer.json`` that made them and ``meta.json``. It is written to a temporary directory and renamed
into place, so a prepared directory that exists is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import queue
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmsprint.config import DataConfig
from lmsprint.data import sources
from lmsprint.data.shards import Shard, ShardWriter, read_shard
from lmsprint.data.tokenizer import TextTokenizer, byte_tokenizer, load_tokenizer, train_bpe
from lmsprint.errors import DataError
from lmsprint.progress import progress_bar

META_VERSION = 1
SHARD_TOKENS = 200_000_000  # start a new shard after this many tokens (400 MB as uint16)
BATCH_BYTES = 4_000_000  # text per encode_batch call
BAR_DELAY = 1.0  # seconds of work before a progress bar appears: quick work (and quick errors) print none


@dataclass
class PreparedData:
    """A prepared data directory, opened: tokenizer and memory-mapped shards."""

    path: Path
    meta: dict
    tokenizer: TextTokenizer
    train: list[Shard]
    val: list[Shard]


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _prefetch(it: Iterator[list[str]], depth: int = 4) -> Iterator[list[str]]:
    """Read and parse the next batches in a thread while the current one is tokenized (Rust, all cores)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for item in it:
                q.put(item)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


class _SplitWriter:
    """Writes one split (train or val) as a sequence of shards."""

    def __init__(self, out: Path, split: str, tok: TextTokenizer) -> None:
        self.out, self.split, self.tok = out, split, tok
        self.shards: list[str] = []
        self.n_tokens = 0
        self.n_docs = 0
        self._w: ShardWriter | None = None

    def add(self, ids: np.ndarray) -> None:
        if self._w is None or self._w.n_tokens >= SHARD_TOKENS:
            self._finish()
            name = f"{self.split}-{len(self.shards):05d}.bin"
            self._w = ShardWriter(self.out / name, vocab_size=self.tok.vocab_size, eot_id=self.tok.eot_id,
                                  tokenizer_sha=self.tok.sha)
            self.shards.append(name)
        self._w.add(ids)
        self.n_tokens += int(ids.size)
        self.n_docs += 1

    def _finish(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None

    def close(self) -> None:
        self._finish()


def _bar(desc: str, total: int, enabled: bool, leave: bool = True) -> contextlib.AbstractContextManager[tqdm]:
    """A progress bar over file bytes that appears only once the work takes a while (``BAR_DELAY``)."""
    return progress_bar(enabled=enabled, total=total or None, unit="B", unit_scale=True, desc=desc, leave=leave,
                        delay=BAR_DELAY)


def _make_tokenizer(spec: str, vocab_size: int, train_source: sources.Source, progress: bool) -> TextTokenizer:
    if spec == "byte":
        return byte_tokenizer()
    if spec != "bpe":
        return load_tokenizer(spec)
    with _bar("train BPE", train_source.total_bytes(), progress, leave=False) as bar:
        return train_bpe(sources.iter_documents(train_source, bar.update), vocab_size)


def _first_documents(source: sources.Source, n: int) -> int:
    """How many documents ``source`` has, counted up to ``n`` (reads only as far as that)."""
    with contextlib.closing(sources.iter_documents(source)) as docs:
        return sum(1 for _ in itertools.islice(docs, n))


def _check_documents(spec: str, train_src: sources.Source, val_spec: str | None,
                     val_src: sources.Source | None) -> None:
    """The corpus errors that need no tokenizer, found before one is trained: an empty corpus, one document and no
    validation source, an empty validation source."""
    n = _first_documents(train_src, 2)
    if n == 0:
        raise DataError(f"the corpus {spec!r} is empty (no documents with text); check the path and format")
    if n == 1 and val_src is None:
        raise DataError(f"{spec!r} holds a single document, so no whole document can be held out for validation; "
                        "use --data.text_docs=paragraph, add documents, or pass --data.val_source")
    if val_src is not None and _first_documents(val_src, 1) == 0:
        raise DataError(f"the validation source {val_spec or val_src.name!r} is empty")


def prepare(
    source: str,
    out_dir: str | Path,
    *,
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    val_source: str | None = None,
    val_fraction: float = 0.02,
    text_docs: str = "auto",
    seed: int = 0,
    workers: int = 0,
    progress: bool = True,
) -> Path:
    """Tokenize a corpus into shards. Streams the text; tokenization runs on ``workers`` cores (0 = all).

    Validation is held out by whole documents: ``val_source`` if given (or the ``val*`` files of a train/val
    directory), else each document goes to validation with probability ``val_fraction`` (seeded).
    """
    if workers > 0:
        os.environ["RAYON_NUM_THREADS"] = str(workers)  # tokenizers' thread pool
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a directory; choose another --out")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir} already exists and is not empty; choose another --out or delete it")
    train_src, auto_val = sources.resolve(source, text_docs=text_docs)
    val_src = sources.resolve(val_source, text_docs=text_docs)[0] if val_source else auto_val
    if val_src is None and val_fraction <= 0:
        raise DataError("no validation data: set --data.val_fraction > 0 or pass --data.val_source")

    t0 = time.time()
    try:
        _check_documents(source, train_src, val_source, val_src)
        tok = _make_tokenizer(tokenizer, vocab_size, train_src, progress)  # BPE: reads the whole corpus
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise DataError(f"reading the corpus failed ({e.strerror or e}{where}); fix the file's permissions or "
                        "replace the damaged file") from None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as e:
        raise DataError(f"cannot create {out_dir} ({e.strerror or e}); choose another --out (or "
                        "--data.cache_dir) or check its permissions") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        train_w, val_w = _SplitWriter(tmp, "train", tok), _SplitWriter(tmp, "val", tok)
        rng = random.Random(seed)
        held: np.ndarray | None = None  # last document, held back so at least one can go to validation
        with _bar("tokenize", train_src.total_bytes(), progress) as bar:
            for batch in _prefetch(_batches(sources.iter_documents(train_src, bar.update))):
                for ids in tok.encode_docs(batch):
                    if held is not None:
                        (val_w if val_src is None and rng.random() < val_fraction else train_w).add(held)
                    held = ids
        if held is None:  # _check_documents found documents
            raise DataError(f"the corpus {source!r} changed while it was read; prepare it again")
        (val_w if val_src is None and val_w.n_docs == 0 else train_w).add(held)
        if train_w.n_tokens == train_w.n_docs:  # every document encoded to its end-of-document token alone
            raise DataError(f"the tokenizer {tokenizer!r} encodes the text of {source!r} to nothing (no token but "
                            "the end-of-document one); use a tokenizer that covers the text, e.g. "
                            "--data.tokenizer=bpe")
        if val_src is not None:
            for batch in _batches(sources.iter_documents(val_src)):
                for ids in tok.encode_docs(batch):
                    val_w.add(ids)
        train_w.close()
        val_w.close()
        tok.save(tmp / "tokenizer.json")
        meta = {
            "version": META_VERSION,
            "source": source,
            "val_source": val_source,
            "tokenizer": tokenizer if tokenizer in ("bpe", "byte") else str(Path(tokenizer).resolve()),
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "tokenizer_sha256": tok.sha.hex(),
            "train": {"shards": train_w.shards, "tokens": train_w.n_tokens, "docs": train_w.n_docs},
            "val": {"shards": val_w.shards, "tokens": val_w.n_tokens, "docs": val_w.n_docs},
            "seconds": round(time.time() - t0, 2),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        if isinstance(e, OSError):  # e.g. a full disk, an unreadable file
            raise DataError(f"preparing {out_dir} failed ({e.strerror or e}{f': {e.filename}' if e.filename else ''}); "
                            "free space or fix the file's permissions, then prepare again (nothing was written)") \
                from None
        raise
    return out_dir


def load_prepared(path: str | Path) -> PreparedData:
    """Open a prepared directory; checks that shards match the tokenizer that is stored with them."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise DataError(f"{path} is not a prepared data directory (no meta.json); run `lmsprint prepare` first")
    try:
        meta = json.loads(meta_path.read_text())
        version = meta["version"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DataError(f"{meta_path} is corrupt; delete {path} and prepare again") from None
    if version != META_VERSION:
        raise DataError(f"{path} was prepared by another lmsprint version; delete it and prepare again")
    tok = load_tokenizer(path / "tokenizer.json")
    try:
        train = [read_shard(path / name) for name in meta["train"]["shards"]]
        val = [read_shard(path / name) for name in meta["val"]["shards"]]
    except (KeyError, TypeError, OSError) as e:
        reason = "a shard cannot be read" if isinstance(e, OSError) else "meta.json lists no shards"
        raise DataError(f"{path} is corrupt ({reason}); delete it and prepare again") from None
    for shard in train + val:
        if shard.header.tokenizer_sha != tok.sha or shard.header.vocab_size != tok.vocab_size:
            raise DataError(f"{shard.path} was made with a different tokenizer than {path / 'tokenizer.json'}; "
                            "prepare the data again with one tokenizer")
    if not train or sum(s.header.n_tokens for s in train) == 0:
        raise DataError(f"{path} has no training tokens; prepare it again from a non-empty corpus")
    if not val:
        raise DataError(f"{path} has no validation shard; prepare it again with --data.val_fraction > 0")
    return PreparedData(path, meta, tok, train, val)


def cache_key(spec: str, *, tokenizer: str, vocab_size: int, val_source: str | None, val_fraction: float,
              text_docs: str) -> tuple[str, str]:
    """(name, key) of the prepared-data cache entry for these settings and the current state of the files."""
    train_src, _ = sources.resolve(spec, text_docs=text_docs)
    parts = [spec, train_src.fingerprint(), tokenizer, str(vocab_size), str(val_fraction), text_docs]
    if tokenizer not in ("bpe", "byte"):
        tok_file = Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)
        parts.append(hashlib.sha256(tok_file.read_bytes()).hexdigest() if tok_file.is_file() else "")
    else:
        parts.append("" if tokenizer == "byte" else str(vocab_size))
    if val_source:
        parts.append(sources.resolve(val_source, text_docs=text_docs)[0].fingerprint())
    return train_src.name, hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def prepared_data(data: DataConfig, *, progress: bool = True) -> PreparedData:
    """Open ``data.source`` if it is a prepared directory; otherwise prepare it with the tokenizer and split
    settings of ``data`` into the cache once, and open that."""
    spec = data.source
    if (Path(spec).expanduser() / "meta.json").exists():
        return load_prepared(Path(spec).expanduser())
    name, key = cache_key(spec, tokenizer=data.tokenizer, vocab_size=data.vocab_size, val_source=data.val_source,
                          val_fraction=data.val_fraction, text_docs=data.text_docs)
    path = sources.cache_root(data.cache_dir) / "data" / f"{name}-{key}"
    if not (path / "meta.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        prepare(spec, path, tokenizer=data.tokenizer, vocab_size=data.vocab_size, val_source=data.val_source,
                val_fraction=data.val_fraction, text_docs=data.text_docs, workers=data.workers, progress=progress)
    return load_prepared(path)
