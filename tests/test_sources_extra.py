"""Inputs users already have: parquet files and Hugging Face ``datasets`` directories go through prepare intact."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import make_docs

from lmsprint.config import DataConfig
from lmsprint.data.prepare import PreparedData, load_prepared, prepare
from lmsprint.errors import DataError

DOCS = [*make_docs(30, seed=3), "unicode: héllo, 日本語, emoji 🎉", "  leading spaces\n\nand a blank line\n"]
SKIPPED = ["", "   \n", None]  # rows with no text are not documents


def documents(data: PreparedData, split: str) -> list[str]:
    """Decode every document of a split (each starts with the end-of-document token)."""
    out = []
    for shard in getattr(data, split):
        ends = [*shard.doc_starts[1:].tolist(), shard.header.n_tokens]
        for start, end in zip(shard.doc_starts.tolist(), ends):
            assert shard.tokens[start] == data.tokenizer.eot_id
            out.append(data.tokenizer.decode(shard.tokens[start + 1 : end]))
    return out


def assert_all_documents(out: Path, expected: list[str]) -> PreparedData:
    data = load_prepared(out)
    got = documents(data, "train") + documents(data, "val")
    assert sorted(got) == sorted(expected)
    assert documents(data, "val"), "some whole documents are held out for validation"
    return data


def test_parquet_file(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = DOCS[:10] + SKIPPED + DOCS[10:]
    table = pa.table({"id": list(range(len(rows))), "text": rows})
    pq.write_table(table, tmp_path / "corpus.parquet", row_group_size=7)  # several row groups
    out = prepare(str(tmp_path / "corpus.parquet"), tmp_path / "out", tokenizer="byte", val_fraction=0.2,
                  progress=False)
    assert_all_documents(out, DOCS)


def test_parquet_train_val_directory(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table({"text": DOCS[:25]}), tmp_path / "corpus" / "train.parquet")
    pq.write_table(pa.table({"text": DOCS[25:]}), tmp_path / "corpus" / "validation.parquet")
    out = prepare(str(tmp_path / "corpus"), tmp_path / "out", tokenizer="byte", progress=False)
    data = load_prepared(out)
    assert sorted(documents(data, "train")) == sorted(DOCS[:25])
    assert sorted(documents(data, "val")) == sorted(DOCS[25:])


def test_parquet_without_text_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": DOCS}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match="no 'text' column"):
        prepare(str(tmp_path / "c.parquet"), tmp_path / "out", tokenizer="byte", progress=False)


def test_hf_datasets_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = DOCS + SKIPPED
    datasets.Dataset.from_dict({"text": rows, "n": list(range(len(rows)))}).save_to_disk(str(tmp_path / "ds"))
    out = prepare(str(tmp_path / "ds"), tmp_path / "out", tokenizer="byte", val_fraction=0.2, progress=False)
    assert_all_documents(out, DOCS)


def test_hf_dataset_dict_uses_the_train_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS}),
                               "test": datasets.Dataset.from_dict({"text": ["not training text"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    out = prepare(str(tmp_path / "dd"), tmp_path / "out", tokenizer="byte", val_fraction=0.2, progress=False)
    assert_all_documents(out, DOCS)


def test_hf_dataset_without_text_column(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"content": DOCS}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match="no 'text' column"):
        prepare(str(tmp_path / "ds"), tmp_path / "out", tokenizer="byte", progress=False)


def test_hf_datasets_directory_saved_again_is_prepared_again(tmp_path: Path) -> None:
    """save_to_disk rewrites the same file names (the directory's own size and time stay): the cache must see it."""
    datasets = pytest.importorskip("datasets")
    from lmsprint.data.prepare import prepared_data

    ds, cache = tmp_path / "ds", str(tmp_path / "cache")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(ds))
    first = prepared_data(DataConfig(str(ds), tokenizer="byte", val_fraction=0.2, cache_dir=cache), progress=False)
    changed = [d.upper() for d in DOCS]
    datasets.Dataset.from_dict({"text": changed}).save_to_disk(str(ds))
    second = prepared_data(DataConfig(str(ds), tokenizer="byte", val_fraction=0.2, cache_dir=cache), progress=False)
    assert second.path != first.path
    assert_all_documents(second.path, changed)


def test_a_tokenizer_directory_is_accepted(tmp_path: Path) -> None:
    from lmsprint.data.prepare import prepared_data

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    data = DataConfig(str(tmp_path / "c.jsonl"), tokenizer="byte", val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    first = prepared_data(data, progress=False)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes((first.path / "tokenizer.json").read_bytes())
    again = prepared_data(replace(data, tokenizer=str(tmp_path / "tok")), progress=False)
    assert again.tokenizer.vocab_size == first.tokenizer.vocab_size
