"""Where documents come from: named datasets, files, directories and globs, streamed one document at a time.

Formats, by file name (each optionally compressed as ``.gz``, ``.xz``, ``.bz2`` or ``.zst``):

- ``.txt`` (and ``.md``, ``.py``, ``.text``): one document per file, or one per blank-line separated paragraph
  (``--data.text_docs``: ``auto`` splits a single file into paragraphs and treats several files as one document
  each);
- ``.jsonl``: one JSON object per line with a ``text`` string field;
- ``.parquet``: a ``text`` column (needs ``pyarrow``);
- a directory saved by Hugging Face ``datasets`` (``save_to_disk``), with a ``text`` column (needs ``datasets``).

A directory is searched recursively for those files. In a directory whose files are named ``train*`` and
``val*`` (or ``valid*``/``test*``), the ``val`` files become the validation set.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import sysconfig
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lmsprint.errors import DataError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".py"}
COMPRESSED = {".gz", ".xz", ".bz2", ".zst"}
# karpathy/char-rnn's tinyshakespeare input.txt, shipped xz-compressed; the checksum is of the text
TINYSHAKESPEARE = Path(__file__).parent / "tinyshakespeare.txt.xz"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
NAMED = ("stdlib", "tinyshakespeare")
# how the decompressors report damaged data (zstd's errors are turned into OSError by _ZstdReader)
_CORRUPT = (EOFError, OSError, lzma.LZMAError, zlib.error)
_SURROGATE = re.compile("[\ud800-\udfff]")


def cache_root(cache_dir: str | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LMSPRINT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmsprint"


def read_cached_json(name: str) -> dict[str, Any]:
    """The entries of a JSON file of measurements in the cache (``peak_flops.json``, ``throughput.json``); empty
    when it is missing or unreadable (it is measured again)."""
    try:
        entries = json.loads((cache_root() / name).read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def write_cached_json(name: str, entries: dict[str, Any]) -> None:
    """Replace a cached JSON file atomically; a cache that cannot be written is skipped (it is only a cache)."""
    path = cache_root() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


@dataclass
class Source:
    """A resolved corpus: the files (or one datasets directory) to read, and how .txt files split."""

    name: str
    files: list[Path]
    text_docs: str  # "file" or "paragraph" (resolved from "auto")
    hf_dataset: Path | None = None

    def fingerprint(self) -> str:
        """Changes when the files change (paths, sizes, modification times): keys the prepared-data cache."""
        h = hashlib.sha256(self.text_docs.encode())
        files = list(self.files)
        if self.hf_dataset:  # save_to_disk rewrites the same file names: the directory's own stat does not change
            files += sorted(p for p in self.hf_dataset.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def _kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    if not suffixes:
        return None
    if suffixes[-1] in TEXT_SUFFIXES:
        return "text"
    if suffixes[-1] in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffixes[-1] == ".parquet":
        return "parquet"
    return None


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                              or (path / "dataset_dict.json").exists())


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library sources (tests, IDLE, codecs and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    # generated codec tables (encodings/) are left out too: repetitive, they make losses look better than they are
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "encodings"}
    files = [p for p in sorted(root.rglob("*.py")) if not skip.intersection(p.relative_to(root).parts)]
    if not files:
        raise DataError(f"no Python standard library sources found under {root}; pass a corpus path instead")
    return files


def tinyshakespeare() -> Path:
    """The tinyshakespeare text shipped with lmsprint (xz-compressed), its checksum verified."""
    try:
        text = lzma.decompress(TINYSHAKESPEARE.read_bytes())
    except (OSError, lzma.LZMAError):
        text = b""
    if hashlib.sha256(text).hexdigest() != TINYSHAKESPEARE_SHA256:
        raise DataError(f"the copy of tinyshakespeare shipped with lmsprint ({TINYSHAKESPEARE}) is missing or "
                        "damaged; reinstall lmsprint")
    return TINYSHAKESPEARE


def resolve(spec: str, *, text_docs: str = "auto") -> tuple[Source, Source | None]:
    """Resolve a data spec to a training source and, for train/val directories, a validation source."""
    if spec == "stdlib":
        return Source("stdlib", stdlib_files(), "file" if text_docs == "auto" else text_docs), None
    if spec == "tinyshakespeare":
        path = tinyshakespeare()
        return Source("tinyshakespeare", [path], "paragraph" if text_docs == "auto" else text_docs), None
    path = Path(spec).expanduser()
    if _is_hf_dataset(path):
        return Source(path.name, [], text_docs, hf_dataset=path), None
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None)
        if not files:
            raise DataError(f"{path} holds no .txt, .jsonl or .parquet files (optionally .gz/.xz/.bz2/.zst); "
                            "pass a directory or glob of such files")
    elif path.is_file():
        if _kind(path) is None:
            raise DataError(f"{path}: unsupported file type; use .txt, .jsonl or .parquet (optionally compressed)")
        files = [path]
    elif path.exists():
        raise DataError(f"{path} is not a regular file or directory (a FIFO, socket or device): lmsprint reads a "
                        "corpus more than once; save it to a file and pass that")
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)
                       if Path(p).is_file() and _kind(Path(p)) is not None)
        if not files:
            raise DataError(f"the pattern {spec!r} matches no .txt, .jsonl or .parquet files; check it (and quote "
                            "it, so that the shell leaves it to lmsprint)")
    else:
        raise DataError(f"data source {spec!r} not found; pass a file, directory or glob, or one of: "
                        f"{', '.join(NAMED)}")
    mode = text_docs if text_docs != "auto" else ("paragraph" if len(files) == 1 else "file")
    name = path.stem.split(".")[0] if path.is_file() else path.name or "data"
    train = [f for f in files if f.name.lower().startswith("train")]
    val = [f for f in files if f.name.lower().startswith(("val", "valid", "test"))]
    if path.is_dir() and train and val:
        return Source(name, train, mode), Source(name + "-val", val, mode)
    return Source(name, files, mode), None


# ----------------------------------------------------------------------------------------------------------
# reading


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of every frame of a .zst file. A file that ends inside a frame raises EOFError, as
    gzip, lzma and bz2 do (zstandard's own stream_reader ends quietly there: a truncated file would read as whole)."""

    def __init__(self, raw: IO[bytes], zstandard: Any) -> None:
        self._raw, self._zstd = raw, zstandard
        self._frame: Any = None  # the decompressor of the frame being read; None between frames
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._out:
            if self._frame is not None and self._frame.eof:  # what follows a frame's end starts the next frame
                data, self._frame = self._frame.unused_data, None
            else:
                data = self._raw.read(1 << 16)
                if not data:
                    if self._frame is not None:
                        raise EOFError("the file ends inside a zstd frame")
                    return 0
            if data:
                self._frame = self._frame or self._zstd.ZstdDecompressor().decompressobj()
                try:
                    self._out = memoryview(self._frame.decompress(data))
                except self._zstd.ZstdError as e:
                    raise OSError(str(e)) from None
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


def _open_binary(path: Path, raw: IO[bytes]) -> IO[bytes]:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if suffix == ".xz":
        return lzma.LZMAFile(raw, "rb")
    if suffix == ".bz2":
        return bz2.BZ2File(raw, "rb")
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the zstandard package: pip install zstandard") from None
        return io.BufferedReader(_ZstdReader(raw, zstandard), 1 << 16)
    return raw


def _corrupt(path: Path, e: BaseException) -> DataError:
    return DataError(f"{path} is corrupt or truncated ({e}); re-download or remove it")


def _not_text(path: Path, binary: IO[bytes], raw: IO[bytes], problem: str) -> DataError:
    """``problem`` (not UTF-8, binary), unless the file is compressed and the rest of its stream is damaged: corrupt
    data decompresses to garbage before the format's own check (a CRC, the end marker) fails."""
    if binary is not raw:
        try:
            while binary.read(1 << 20):
                pass
        except _CORRUPT as e:
            return _corrupt(path, e)
    return DataError(f"{path} {problem}")


ProgressFn = Callable[[int], None]


def _text_lines(path: Path, progress: ProgressFn | None = None) -> Iterator[str]:
    """Lines of a (possibly compressed) UTF-8 file, with clear errors for binary, non-UTF-8 and damaged input.

    ``progress`` is called now and then with the number of (compressed) file bytes read since the last call."""
    raw = open(path, "rb")
    done = 0
    try:
        binary = _open_binary(path, raw)
        with io.TextIOWrapper(binary, encoding="utf-8", errors="strict", newline=None) as f:
            lineno = 0
            try:
                for lineno, line in enumerate(f, start=1):  # noqa: B007
                    if progress is not None and lineno % 256 == 0:
                        pos = raw.tell()
                        progress(pos - done)
                        done = pos
                    if "\0" in line:
                        raise _not_text(path, binary, raw, f"looks binary (NUL byte on line {lineno}); pass text "
                                        "files only")
                    yield line
            except UnicodeDecodeError as e:
                if b"\0" in e.object:
                    raise _not_text(path, binary, raw, "looks binary (NUL bytes); pass text files only") from None
                raise _not_text(path, binary, raw, f"is not UTF-8 text (near line {lineno + 1}: {e.reason}); convert "
                                "it, e.g. `iconv -f latin1 -t utf-8`") from None
            except _CORRUPT as e:
                raise _corrupt(path, e) from None
    finally:
        if progress is not None:
            progress(os.path.getsize(path) - done)
        raw.close()


def _docs_from_text(path: Path, mode: str, progress: ProgressFn | None) -> Iterator[str]:
    if mode == "file":
        text = "".join(_text_lines(path, progress)).strip()
        if text:
            yield text
        return
    para: list[str] = []
    for line in _text_lines(path, progress):
        if line.strip():
            para.append(line)
        elif para:
            yield "".join(para).strip("\n")
            para = []
    if para:
        yield "".join(para).strip("\n")


def _json_line(path: Path, lineno: int, line: str) -> Any:
    try:
        try:
            return json.loads(line)
        except ValueError as e:
            if isinstance(e, json.JSONDecodeError):
                raise
            return json.loads(line, parse_int=str)  # an integer longer than Python converts (4300 digits): not text
    except RecursionError:
        raise DataError(f"{path} line {lineno} is nested too deeply to read as JSON; each line must be one JSON "
                        'object like {"text": "..."}') from None
    except json.JSONDecodeError:
        raise DataError(f"{path} line {lineno} is not valid JSON; each line must be one JSON object") from None


def _docs_from_jsonl(path: Path, progress: ProgressFn | None) -> Iterator[str]:
    for lineno, line in enumerate(_text_lines(path, progress), start=1):
        if not line.strip():
            continue
        obj = _json_line(path, lineno, line)
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path} line {lineno} has no 'text' string field; each line must look like "
                            '{"text": "..."}')
        if "\\u" in line:  # a lone surrogate escaped in the JSON (\ud800) is no character: U+FFFD, as decoders do
            text = _SURROGATE.sub("\ufffd", text)
        if text.strip():
            yield text


def _docs_from_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path} is not a readable parquet file ({e})") from None
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path} has no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def _docs_from_hf(path: Path) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a Hugging Face datasets directory; reading it needs: pip install datasets") \
            from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged state.json / arrow file: whatever datasets raises
        raise DataError(f"{path} is not a readable datasets directory ({e.__class__.__name__}: {e}); save it again "
                        "with save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path} holds splits {list(ds)}; point at one split's directory")
        ds = ds["train"]
    if "text" not in ds.column_names:
        raise DataError(f"{path} has no 'text' column (columns: {', '.join(ds.column_names)})")
    for batch in ds.iter(batch_size=1024):
        for text in batch["text"]:
            if isinstance(text, str) and text.strip():
                yield text


def iter_documents(source: Source, progress: ProgressFn | None = None) -> Iterator[str]:
    """Yield document texts, streaming file by file; ``progress`` receives file bytes read as they are read."""
    if source.hf_dataset is not None:
        yield from _docs_from_hf(source.hf_dataset)
        return
    for path in source.files:
        kind = _kind(path)
        if kind == "text":
            yield from _docs_from_text(path, source.text_docs, progress)
        elif kind == "jsonl":
            yield from _docs_from_jsonl(path, progress)
        else:
            yield from _docs_from_parquet(path)
            if progress is not None:
                progress(path.stat().st_size)
