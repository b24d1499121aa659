import bz2
import gzip
import json
import lzma
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_docs, tiny_config

from lmsprint.config import DataConfig
from lmsprint.data import sources
from lmsprint.data.batching import STRATEGIES
from lmsprint.data.prepare import load_prepared, prepare, prepared_data
from lmsprint.data.shards import HEADER_BYTES, read_shard, write_shard
from lmsprint.data.tokenizer import EOT, byte_tokenizer, load_tokenizer, train_bpe
from lmsprint.errors import DataError

TEXTS = ["Hello, world!", "naïve café — ünïcödé ✓ 日本語", "  leading spaces\n\ttabs\n", "<|endoftext|> literal"]


def test_byte_tokenizer_round_trip() -> None:
    tok = byte_tokenizer()
    assert tok.vocab_size == 257 and tok.eot_id == 256
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert len(ids) == len(text.encode("utf-8"))  # "<|endoftext|>" in a text is text: its bytes
        assert tok.eot_id not in ids


def test_bpe_round_trip_and_eot(tmp_path: Path) -> None:
    tok = train_bpe(iter(make_docs(200) + TEXTS), vocab_size=400)
    assert tok.vocab_size <= 400 and tok.decode([tok.eot_id]) == EOT
    for text in TEXTS + make_docs(5, seed=9):
        assert tok.decode(tok.encode(text)) == text
    docs = tok.encode_docs(["a b", "c", f"quoting {EOT} in a document"])
    assert all(d[0] == tok.eot_id and tok.eot_id not in d[1:] for d in docs)  # one boundary per document
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.sha == tok.sha and again.encode("quick fox") == tok.encode("quick fox")


def test_shard_round_trip(tmp_path: Path) -> None:
    docs = [np.array([5, 1, 2, 3]), np.array([5, 9]), np.array([5, 7, 7, 7, 7])]
    write_shard(tmp_path / "s.bin", docs, vocab_size=10, eot_id=5)
    shard = read_shard(tmp_path / "s.bin")
    assert shard.tokens.dtype == np.uint16
    assert np.array_equal(np.asarray(shard.tokens), np.concatenate(docs))
    assert shard.doc_starts.tolist() == [0, 4, 6]
    # a vocabulary beyond uint16 switches to uint32
    write_shard(tmp_path / "big.bin", [np.array([70000, 1])], vocab_size=70001, eot_id=70000)
    big = read_shard(tmp_path / "big.bin")
    assert big.tokens.dtype == np.uint32 and big.tokens[0] == 70000


def test_shard_rejects_ids_beyond_vocab(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not fit the vocabulary"):
        write_shard(tmp_path / "s.bin", [np.array([1, 12])], vocab_size=10, eot_id=1)


@pytest.mark.parametrize("damage", ["magic", "version", "truncate", "dtype"])
def test_corrupt_shards_are_detected(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "s.bin"
    write_shard(path, [np.array([1, 2, 3])], vocab_size=10, eot_id=1)
    raw = bytearray(path.read_bytes())
    if damage == "magic":
        raw[:8] = b"NOTASHRD"
    elif damage == "version":
        raw[8] = 99
    elif damage == "truncate":
        raw = raw[: HEADER_BYTES + 3]
    else:
        raw[12] = 3
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="re-run `lmsprint prepare`"):
        read_shard(path)


def _write(path: Path, text: str) -> Path:
    opener = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}.get(path.suffix, open)
    with opener(path, "wt", encoding="utf-8") as f:  # type: ignore[operator]
        f.write(text)
    return path


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz", ".bz2", ".zst"])
def test_jsonl_formats_and_compression(tmp_path: Path, suffix: str) -> None:
    docs = make_docs(7)
    text = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    path = tmp_path / f"c.jsonl{suffix}"
    if suffix == ".zst":
        zstd = pytest.importorskip("zstandard")
        path.write_bytes(zstd.ZstdCompressor().compress(text.encode()))
    else:
        _write(path, text)
    src, val = sources.resolve(str(path))
    assert val is None
    assert list(sources.iter_documents(src)) == docs


def test_txt_document_modes(tmp_path: Path) -> None:
    one = _write(tmp_path / "one.txt", "para one\nline two\n\n\npara two\n  \npara three")
    src, _ = sources.resolve(str(one))
    assert src.text_docs == "paragraph"
    assert list(sources.iter_documents(src)) == ["para one\nline two", "para two", "para three"]
    src, _ = sources.resolve(str(one), text_docs="file")
    assert len(list(sources.iter_documents(src))) == 1
    folder = tmp_path / "dir"
    folder.mkdir()
    for i in range(3):
        _write(folder / f"f{i}.txt", f"doc {i}\n\nsecond paragraph")
    src, _ = sources.resolve(str(folder))
    assert src.text_docs == "file" and len(list(sources.iter_documents(src))) == 3
    src, _ = sources.resolve(str(tmp_path / "dir" / "*.txt"))
    assert len(src.files) == 3


def test_train_val_directory(tmp_path: Path) -> None:
    _write(tmp_path / "train-0.jsonl", json.dumps({"text": "a"}) + "\n")
    _write(tmp_path / "val-0.jsonl", json.dumps({"text": "b"}) + "\n")
    train, val = sources.resolve(str(tmp_path))
    assert [p.name for p in train.files] == ["train-0.jsonl"]
    assert val is not None and [p.name for p in val.files] == ["val-0.jsonl"]


def test_stdlib_source() -> None:
    src, _ = sources.resolve("stdlib")
    assert len(src.files) > 100 and all(p.suffix == ".py" for p in src.files)
    assert not any("site-packages" in p.parts or "test" in p.parts for p in src.files)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_prepare_keeps_every_token_once(tmp_path: Path, corpus: Path, tokenizer: str) -> None:
    """train + val documents are exactly the corpus documents, each encoded once, held out whole."""
    out = prepare(str(corpus), tmp_path / "data", tokenizer=tokenizer, vocab_size=300, val_fraction=0.2,
                  progress=False)
    data = load_prepared(out)
    tok = data.tokenizer
    expected = [tuple(ids) for ids in tok.encode_docs(make_docs(60))]

    def docs(shards: list) -> list[tuple]:
        out = []
        for s in shards:
            bounds = list(s.doc_starts) + [s.header.n_tokens]
            out += [tuple(np.asarray(s.tokens[a:b]).tolist()) for a, b in zip(bounds, bounds[1:])]
        return out

    train, val = docs(data.train), docs(data.val)
    assert len(val) >= 1 and len(train) >= 1
    assert sorted(train + val) == sorted(expected)
    assert data.meta["train"]["tokens"] + data.meta["val"]["tokens"] == sum(len(d) for d in expected)
    assert all(d[0] == tok.eot_id for d in train + val)


def test_prepared_cache_is_reused(corpus: Path) -> None:
    a = prepared_data(DataConfig(str(corpus), tokenizer="byte"), progress=False)
    b = prepared_data(DataConfig(str(corpus), tokenizer="byte"), progress=False)
    assert a.path == b.path
    c = prepared_data(DataConfig(str(a.path)))  # a prepared directory opens directly
    assert c.path == a.path


def test_prepare_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        prepare(str(tmp_path / "missing.txt"), tmp_path / "o1", progress=False)
    empty = _write(tmp_path / "empty.jsonl", "\n\n")
    with pytest.raises(DataError, match="is empty"):
        prepare(str(empty), tmp_path / "o2", tokenizer="byte", progress=False)
    assert not (tmp_path / "o2").exists()  # nothing half-written
    single = _write(tmp_path / "single.jsonl", json.dumps({"text": "only one"}) + "\n")
    with pytest.raises(DataError, match="single document"):
        prepare(str(single), tmp_path / "o3", tokenizer="byte", progress=False)
    notext = _write(tmp_path / "notext.jsonl", json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="line 1 has no 'text'"):
        prepare(str(notext), tmp_path / "o4", tokenizer="byte", progress=False)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n\nmore".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        prepare(str(latin), tmp_path / "o5", tokenizer="byte", progress=False)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="binary"):
        prepare(str(binary), tmp_path / "o6", tokenizer="byte", progress=False)
    (tmp_path / "o7").mkdir()
    (tmp_path / "o7" / "x").write_text("keep me")
    with pytest.raises(DataError, match="already exists"):
        prepare(str(latin), tmp_path / "o7", tokenizer="byte", progress=False)
    assert (tmp_path / "o7" / "x").read_text() == "keep me"


def test_shards_from_another_tokenizer_are_rejected(tmp_path: Path, corpus: Path) -> None:
    out = prepare(str(corpus), tmp_path / "data", tokenizer="byte", progress=False)
    train_bpe(iter(make_docs(50)), vocab_size=300).save(out / "tokenizer.json")
    with pytest.raises(DataError, match="different tokenizer"):
        load_prepared(out)


def test_tinyshakespeare_is_shipped_and_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network: the text comes with the package (xz), its SHA-256 verified before it is used."""
    src, _ = sources.resolve("tinyshakespeare")
    docs = list(sources.iter_documents(src))
    assert docs[0].startswith("First Citizen:") and len(docs) > 7000  # one document per paragraph
    damaged = tmp_path / "tinyshakespeare.txt.xz"
    text = lzma.decompress(sources.TINYSHAKESPEARE.read_bytes())
    damaged.write_bytes(lzma.compress(text.replace(b"Citizen", b"Zitizen")))
    monkeypatch.setattr(sources, "TINYSHAKESPEARE", damaged)
    with pytest.raises(DataError, match="shipped with lmsprint .* is missing or damaged; reinstall lmsprint"):
        sources.resolve("tinyshakespeare")


def _docs(path: Path) -> list[str]:
    return list(sources.iter_documents(sources.resolve(str(path))[0]))


def test_zstd_reads_every_frame_and_detects_truncation(tmp_path: Path) -> None:
    zstd = pytest.importorskip("zstandard")
    lines = [json.dumps({"text": d}) + "\n" for d in make_docs(400)]
    half = len(lines) // 2
    one, two = ("".join(lines[:half]).encode(), "".join(lines[half:]).encode())
    frames = zstd.ZstdCompressor().compress(one) + zstd.ZstdCompressor(write_checksum=True).compress(two)
    (tmp_path / "frames.jsonl.zst").write_bytes(frames)
    assert _docs(tmp_path / "frames.jsonl.zst") == make_docs(400)  # two frames (e.g. files concatenated)
    for cut in (len(frames) // 2, len(frames) - 3):  # inside the first frame; the second frame's checksum
        (tmp_path / "cut.jsonl.zst").write_bytes(frames[:cut])
        with pytest.raises(DataError, match="cut.jsonl.zst is corrupt or truncated"):
            _docs(tmp_path / "cut.jsonl.zst")
    damaged = bytearray(frames)
    damaged[len(frames) - 40 : len(frames) - 20] = bytes(20)
    (tmp_path / "bad.jsonl.zst").write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"bad.jsonl.zst is corrupt or truncated \(.*\); re-download or remove it"):
        _docs(tmp_path / "bad.jsonl.zst")


@pytest.mark.parametrize("suffix", [".gz", ".xz", ".bz2", ".zst"])
def test_damaged_compressed_text_is_corrupt_not_non_utf8(tmp_path: Path, suffix: str) -> None:
    """A damaged stream decompresses to garbage before its own check fails: the error names the damage, while an
    intact file of non-UTF-8 text is still reported as such."""
    latin = ("café\n\n" + "\n\n".join(make_docs(300))).encode("latin-1")
    compress = {".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress}.get(suffix)
    if compress is None:
        compress = pytest.importorskip("zstandard").ZstdCompressor(write_checksum=True).compress
    packed = compress(latin)
    (tmp_path / f"ok.txt{suffix}").write_bytes(packed)
    with pytest.raises(DataError, match="is not UTF-8 text"):
        _docs(tmp_path / f"ok.txt{suffix}")
    (tmp_path / f"cut.txt{suffix}").write_bytes(packed[:-4])  # the trailer (checksum) cut off
    with pytest.raises(DataError, match=f"cut.txt\\{suffix} is corrupt or truncated"):
        _docs(tmp_path / f"cut.txt{suffix}")


def test_corrupt_gzip_text_is_a_data_error(tmp_path: Path) -> None:
    packed = bytearray(gzip.compress("\n\n".join(make_docs(300)).encode()))
    packed[30:80] = bytes(b ^ 0x55 for b in packed[30:80])  # zlib.error: an invalid deflate block
    (tmp_path / "c.txt.gz").write_bytes(bytes(packed))
    with pytest.raises(DataError, match=r"c.txt.gz is corrupt or truncated \(Error -3 while decompressing"):
        _docs(tmp_path / "c.txt.gz")


def test_odd_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + "[" * 200_000 + "]" * 200_000 + "\n")
    with pytest.raises(DataError, match="c.jsonl line 2 is nested too deeply to read as JSON"):
        _docs(path)
    # an integer beyond Python's default conversion limit: not text, and no reason to refuse the document
    path.write_text('{"text": "kept", "id": ' + "7" * 5000 + "}\n")
    assert _docs(path) == ["kept"]
    path.write_text("7" * 5000 + "\n")
    with pytest.raises(DataError, match="c.jsonl line 1 has no 'text' string field"):
        _docs(path)
    path.write_text('{"text": "cut", "id": ' + "7" * 5000 + ",\n")
    with pytest.raises(DataError, match="c.jsonl line 1 is not valid JSON"):
        _docs(path)
    # a lone surrogate is no character (UTF-8 cannot hold it): replaced, as a decoder would, so BPE can train
    path.write_text('{"text": "a \\ud800 b \\ud83d\\ude00"}\n{"text": "two"}\n')
    docs = _docs(path)
    assert docs == ["a \ufffd b \U0001f600", "two"]
    assert train_bpe(iter(docs * 20), vocab_size=300).vocab_size > 256


def test_a_fifo_is_not_a_corpus(tmp_path: Path) -> None:
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="corpus.txt is not a regular file or directory .a FIFO, socket or device."):
        sources.resolve(str(fifo))


def test_corpus_errors_come_before_a_tokenizer_is_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmsprint.data.prepare as prep

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tokenizer was trained")

    monkeypatch.setattr(prep, "train_bpe", no_training)
    empty = _write(tmp_path / "empty.jsonl", "\n\n")
    with pytest.raises(DataError, match="is empty"):
        prepare(str(empty), tmp_path / "o1", tokenizer="bpe", progress=False)
    single = _write(tmp_path / "single.jsonl", json.dumps({"text": "only one"}) + "\n")
    with pytest.raises(DataError, match="single document"):
        prepare(str(single), tmp_path / "o2", tokenizer="bpe", progress=False)
    with pytest.raises(DataError, match="the validation source .* is empty"):
        prepare(str(single), tmp_path / "o3", tokenizer="bpe", val_source=str(empty), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "single.jsonl"]


def test_data_stats_reports_every_strategy(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lmsprint data stats`: rows, real tokens, computed slots, waste and tokens per row of each strategy."""
    from lmsprint.cli import main
    from lmsprint.data.stats import strategy_stats

    rows = strategy_stats(tiny_config(corpus, data__seq_len=256))
    assert [r["strategy"] for r in rows] == list(STRATEGIES)
    assert len({r["tokens"] for r in rows}) == 1  # every strategy places every token once
    for r in rows:
        assert r["slots"] >= r["tokens"] and r["waste"] == pytest.approx(1 - r["tokens"] / r["slots"])
        assert r["tokens_per_row"] == pytest.approx(r["tokens"] / r["rows"])
    by = {r["strategy"]: r for r in rows}
    assert by["pack"]["waste"] < by["bucket"]["waste"] <= by["pad"]["waste"]
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "stats", str(corpus), "--data.tokenizer=byte", "--data.seq_len=256"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "| strategy | rows | real tokens | computed slots | waste | tokens/row |" in out
    assert all(f"| {s} |" in out for s in STRATEGIES)
