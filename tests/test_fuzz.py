"""Property-based fuzzing of what users hand lmsprint: corpus files and metrics files.

Every input must end in a result or in one ``error: ...`` line with exit code 2 (an LmsprintError) — never a
traceback. The examples are derandomized (the same every run) and bounded, so CI spends well under two minutes
here. (Config overrides and recipe files are fuzzed elsewhere.)
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lmsprint.cli import main

zstandard = pytest.importorskip("zstandard")

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_cli(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of ``lmsprint ARGV`` in this process; any exception but SystemExit propagates (a bug)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            return int(e.code or 0), err.getvalue()
    raise AssertionError("lmsprint.cli.main returned without exiting")


def assert_result_or_one_line_error(code: int, stderr: str) -> None:
    event(f"exit {code}")  # pytest --hypothesis-show-statistics: how many inputs end in a result, how many in errors
    if code != 0:
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert code == 2, stderr
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr


# ----------------------------------------------------------------------------------------------------------
# corpus files

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def jsonl_line(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["doc"] * 12 + ["odd-text", "value", "nested", "huge-integer", "surrogate", "bytes",
                                                "blank"]))
    if kind == "doc":
        obj = {"text": draw(st.text(max_size=80)), **draw(st.dictionaries(st.text(max_size=6), JSON_VALUES,
                                                                            max_size=2))}
        return json.dumps(obj, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if kind == "odd-text":
        return json.dumps({"text": draw(JSON_VALUES)}).encode()
    if kind == "value":
        return json.dumps(draw(JSON_VALUES)).encode()
    if kind == "nested":
        depth = draw(st.sampled_from([3, 2000, 100_000]))
        return b'{"text": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "huge-integer":
        return b'{"text": "x", "n": ' + b"9" * draw(st.integers(4000, 6000)) + b"}"
    if kind == "surrogate":
        return b'{"text": "a \\ud800 b \\udfff"}'
    if kind == "bytes":
        return draw(st.binary(max_size=60))
    return b""


@st.composite
def corpus_file(draw: st.DrawFn) -> tuple[str, bytes]:
    """(file name, content): raw bytes, text in some encoding, or JSONL; maybe compressed, maybe damaged."""
    kind = draw(st.sampled_from(["bytes", "text", "jsonl", "jsonl"]))
    if kind == "bytes":
        name, data = draw(st.sampled_from(["c.txt", "c.jsonl"])), draw(st.binary(max_size=3000))
    elif kind == "text":
        paragraphs = draw(st.lists(st.text(min_size=1, max_size=200), min_size=1, max_size=12))
        encoding = draw(st.sampled_from(["utf-8"] * 4 + ["utf-8-sig", "utf-16", "latin-1", "cp1252"]))
        name, data = "c.txt", "\n\n".join(paragraphs).encode(encoding, "replace")
    else:
        name, data = "c.jsonl", b"\n".join(draw(st.lists(jsonl_line(), min_size=1, max_size=12)))
    compression = draw(st.sampled_from(["", "", ".gz", ".xz", ".bz2", ".zst"]))
    if compression:
        pack = {".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress,
                ".zst": zstandard.ZstdCompressor(write_checksum=draw(st.booleans())).compress}[compression]
        name, data = name + compression, pack(data)
    damage = draw(st.sampled_from(["none"] * 4 + ["truncate", "flip"]))
    if damage == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    return name, data


@settings(FUZZ, max_examples=400)
@given(st.lists(corpus_file(), min_size=1, max_size=2), st.booleans(), st.sampled_from(["byte", "byte", "byte", "bpe"]))
def test_any_corpus_prepares_or_is_one_line_error(files: list[tuple[str, bytes]], split: bool, tokenizer: str) -> None:
    """One file, or a directory of train/val files (or of two files)."""
    with tempfile.TemporaryDirectory() as d:
        corpus = Path(d) / "corpus"
        corpus.mkdir()
        for i, (name, data) in enumerate(files):
            (corpus / f"{('train', 'val')[i] if split else i}-{name}").write_bytes(data)
        source = corpus if len(files) > 1 else next(corpus.iterdir())
        out = Path(d) / "prepared"
        code, stderr = run_cli(["prepare", str(source), "--out", str(out), f"--data.tokenizer={tokenizer}",
                                "--data.vocab_size=300", "--data.val_fraction=0.5"])
        assert_result_or_one_line_error(code, stderr)
        assert (out / "meta.json").exists() if code == 0 else not out.exists()  # nothing half-written


# ----------------------------------------------------------------------------------------------------------
# metrics files

EXTREMES = st.sampled_from([0, -1, 1e-300, 3.4e38, 1e308, -1e308, float("inf"), float("-inf"), float("nan"), 2**63,
                            10**400])


def mostly(usual: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` four times in five, else ``odd``: records mostly well-formed, so that plots get drawn."""
    return st.sampled_from([True, True, True, True, False]).flatmap(lambda u: usual if u else odd)


@st.composite
def metrics_line(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["record"] * 6 + ["value", "bytes", "cut"]))
    if kind in ("record", "cut"):
        number = mostly(st.floats(0, 20), st.integers() | st.floats() | EXTREMES | JSON_VALUES)
        record = {"kind": draw(mostly(st.sampled_from(["train", "val", "event", "summary", "config"]), JSON_VALUES))}
        for key, values in (("step", mostly(st.integers(-3, 50), EXTREMES | JSON_VALUES)), ("loss", number),
                            ("tokens", number), ("time", number), ("lr", number), ("tokens_per_s", number),
                            ("mfu", number), ("event", mostly(st.sampled_from(["rollback", "resume"]), JSON_VALUES))):
            if draw(mostly(st.just(True), st.just(False))):
                record[key] = draw(values)
        line = json.dumps(record).encode()  # NaN and Infinity as Python writes them
        return line[: draw(st.integers(0, len(line)))] if kind == "cut" else line
    if kind == "value":
        return json.dumps(draw(JSON_VALUES)).encode()
    return draw(st.binary(max_size=60))


@pytest.mark.filterwarnings("error")  # a warning is a second stderr line (and a sign of trouble)
@settings(FUZZ, max_examples=60)
@given(st.lists(metrics_line(), max_size=15), st.sampled_from(["", "c.png"]),
       st.sampled_from([None, "3.0", "nan", "inf", "-1"]))
def test_any_metrics_file_compares_and_plots_or_is_one_line_error(lines: list[bytes], png: str,
                                                                    target: str | None) -> None:
    from lmsprint.plots import plot_run

    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        run.mkdir()
        (run / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        argv = ["compare", str(run), "--png", str(Path(d) / png) if png else ""]
        code, stderr = run_cli(argv + (["--target", target] if target else []))
        assert_result_or_one_line_error(code, stderr)
        if png:  # the loss plot a run draws when it ends (or is resumed) reads the same file
            assert plot_run(run).exists()
