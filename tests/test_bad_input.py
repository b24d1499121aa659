"""The bad-input inventory (docs/errors.md): every case runs the CLI and must fail cleanly.

Clean means: exit code 2, one stderr line ``error: ...`` that names the problem and the fix, no traceback, and
nothing half-written: the case's directory (its inputs, its runs, its data cache) is as it was, except for
complete prepared-data cache entries. The cases run two at a time in subprocesses (each has its own
directory and cache), once per session.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_clean_error, make_docs, run_cli, screen_lines, tiny_config

from lmsprint.config import ModelConfig
from lmsprint.data.prepare import prepare
from lmsprint.data.tokenizer import train_bpe
from lmsprint.errors import CheckpointError
from lmsprint.model import build_model, resolve_model_config
from lmsprint.training import checkpoint as ckpt
from lmsprint.training.run import train

TINY = ("--data.tokenizer=byte", "--model.n_layer=1", "--model.n_embd=16", "--model.n_head=2", "--train.steps=2",
        "--train.device=cpu", "--data.seq_len=16", "--train.batch_size=2", "--log.progress=false",
        "--log.plot=false", "--sample=0")
CPU_ONLY = not torch.cuda.is_available()


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    expect: str  # a piece of the one error line
    setup: Callable[[Path, Path], None] | None = None  # (case dir, shared assets dir)
    cpu_only: bool = False  # only a failure where there is no GPU


def _write(name: str, data: str | bytes) -> Callable[[Path, Path], None]:
    def setup(d: Path, assets: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def _copy(*names: str, then: Callable[[Path], None] | None = None) -> Callable[[Path, Path], None]:
    def setup(d: Path, assets: Path) -> None:
        for name in names:
            src = assets / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, d / name)
        if then is not None:
            then(d)
    return setup


def _patch_shard(name: str, patch: Callable[[bytearray], None]) -> Callable[[Path], None]:
    def then(d: Path) -> None:
        path = d / "prep" / name
        raw = bytearray(path.read_bytes())
        patch(raw)
        path.write_bytes(bytes(raw))
    return then


def _other_tokenizer(d: Path) -> None:
    train_bpe(iter(make_docs(50)), vocab_size=300).save(d / "prep" / "tokenizer.json")


def _corrupt_all_checkpoints(d: Path) -> None:
    root = d / "runs" / "good" / "checkpoints"
    for path in [*ckpt.list_checkpoints(root), root / "best"]:
        raw = bytearray((path / "state.pt").read_bytes())
        raw[10] ^= 0xFF
        (path / "state.pt").write_bytes(bytes(raw))


def _tokenizer_without_eot(d: Path, assets: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(d / "noeot.json"))


def _tokenizer_without_unknown_token(d: Path, assets: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={"the": 0, "<|endoftext|>": 1}))  # no unk_token: other words fail
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "words.json"))


def _tokenizer_of_nothing(d: Path, assets: Path) -> None:
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE(vocab={}, merges=[]))  # no token for any text: every document encodes to []
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(d / "nothing.json"))


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def _flip(data: bytes, start: int, end: int) -> bytes:
    return data[:start] + bytes(b ^ 0x55 for b in data[start:end]) + data[end:]


def _fifo(name: str) -> Callable[[Path, Path], None]:
    def setup(d: Path, assets: Path) -> None:
        os.mkfifo(d / name)
    return setup


JSONL = "".join(json.dumps({"text": d}) + "\n" for d in make_docs(200)).encode()


def _set_token(offset: int, value: int) -> Callable[[bytearray], None]:
    def patch(raw: bytearray) -> None:
        raw[256 + 2 * offset : 256 + 2 * offset + 2] = value.to_bytes(2, "little")
    return patch


def _set_vocab(raw: bytearray) -> None:
    raw[32:40] = struct.pack("<Q", 70_000)  # uint16 tokens cannot hold a 70,000-id vocabulary


def _truncate(raw: bytearray) -> None:
    del raw[1000:]


CASES = [
    # corpus files
    Case("missing-file", ("train", "nope.txt", *TINY), "data source 'nope.txt' not found"),
    Case("empty-file", ("train", "empty.txt", *TINY), "is empty", _write("empty.txt", "")),
    Case("empty-file-progress-bars-on", ("train", "empty.txt", *TINY, "--log.progress=true", "--data.tokenizer=bpe",
                                         "--data.vocab_size=300"), "is empty", _write("empty.txt", "")),
    Case("binary-file", ("train", "blob.txt", *TINY), "looks binary", _write("blob.txt", bytes(range(256)) * 8)),
    Case("non-utf8-text", ("train", "latin.txt", *TINY), "is not UTF-8 text",
         _write("latin.txt", "café\n\nmore text".encode("latin-1"))),
    Case("jsonl-without-text", ("train", "c.jsonl", *TINY), "line 1 has no 'text' string field",
         _write("c.jsonl", '{"body": "x"}\n')),
    Case("directory-without-usable-files", ("train", "folder", *TINY), "holds no .txt, .jsonl or .parquet files",
         _write("folder/notes.csv", "a,b\n")),
    # prepared shards and tokenizers
    Case("shards-from-another-tokenizer", ("train", "prep", *TINY), "was made with a different tokenizer",
         _copy("prep", then=_other_tokenizer)),
    Case("shard-vocab-beyond-its-dtype", ("train", "prep", *TINY), "has a corrupt header (dtype 2 bytes, vocab 70000",
         _copy("prep", then=_patch_shard("train-00000.bin", _set_vocab))),
    Case("shard-token-beyond-vocab", ("train", "prep", *TINY), "holds token id 300, beyond its vocabulary of 257",
         _copy("prep", then=_patch_shard("val-00000.bin", _set_token(5, 300)))),
    # config values and flags
    Case("unknown-preset", ("train", "c.jsonl", *TINY, "--model.preset=gigantic"), "unknown preset 'gigantic'"),
    Case("unknown-optimizer", ("train", "c.jsonl", *TINY, "--optim.name=sgdx"), "unknown optimizer 'sgdx'"),
    Case("unknown-schedule", ("train", "c.jsonl", *TINY, "--schedule.name=exponential"),
         "--schedule.name: 'exponential' is not one of"),
    Case("negative-learning-rate", ("train", "c.jsonl", *TINY, "--optim.lr=-1e-3"), "--optim.lr must be a positive"),
    Case("zero-learning-rate", ("train", "c.jsonl", *TINY, "--optim.lr=0"), "--optim.lr must be a positive"),
    Case("batch-not-divisible-by-micro-batch", ("train", "c.jsonl", *TINY, "--train.batch_size=6",
                                                "--train.micro_batch_size=4"), "is not divisible by"),
    Case("unknown-config-key", ("train", "c.jsonl", *TINY, "--train.nonsense=1"),
         "unknown config key 'train.nonsense'"),
    Case("invalid-integer", ("train", "c.jsonl", *TINY, "--train.steps=ten"), "--train.steps: expected an integer"),
    Case("override-without-value", ("train", "c.jsonl", *TINY, "--optim.lr"), "--optim.lr needs a value"),
    Case("nproc-zero", ("train", "c.jsonl", *TINY, "--nproc=0"), "--nproc must be >= 1, got 0"),
    Case("nproc-batch-not-divisible", ("train", "c.jsonl", *TINY, "--train.batch_size=6",
                                       "--train.micro_batch_size=2", "--nproc=2"),
         "--train.batch_size=6 is not divisible by --train.micro_batch_size=2 x 2 processes"),
    Case("bad-command-line-argument", ("train", "c.jsonl", "--nproc=two"), "argument --nproc: invalid int value"),
    Case("unknown-recipe", ("train", "c.jsonl", "--config", "nosuch"), "config 'nosuch' not found"),
    Case("bad-toml", ("train", "c.jsonl", "--config", "bad.toml"), "not valid TOML", _write("bad.toml", "[train\nx=")),
    Case("cuda-on-a-cpu-machine", ("train", "c.jsonl", *TINY, "--train.device=cuda"), "no CUDA GPU", cpu_only=True),
    # run directories and checkpoints
    Case("run-directory-exists", ("train", "corpus.jsonl", *TINY, "--train.run_name=good"), "already exists",
         _copy("corpus.jsonl", "runs")),
    Case("out-dir-is-a-file", ("train", "corpus.jsonl", *TINY, "--train.out_dir=afile"),
         "cannot write the run directory", lambda d, a: (_copy("corpus.jsonl")(d, a), _write("afile", "x")(d, a))),
    Case("resume-missing-run", ("train", "--resume", "runs/ghost"), "no run to resume at runs/ghost"),
    Case("resume-with-another-model-shape", ("train", "--resume", "runs/good", "--model.n_embd=64"),
         "resume cannot change the model shape", _copy("runs")),
    Case("resume-with-longer-sequences", ("train", "--resume", "runs/good", "--data.seq_len=64"),
         "resume cannot change the model shape", _copy("runs")),
    Case("resume-with-another-batching", ("train", "--resume", "runs/good", "--data.batching=pad"),
         "resume cannot change --data.batching", _copy("runs")),
    Case("resume-with-another-tokenizer", ("train", "--resume", "runs/good", "--data.tokenizer=bpe",
                                          "--data.vocab_size=300"), "tokenized with another tokenizer", _copy("runs")),
    Case("resume-every-checkpoint-corrupt", ("train", "--resume", "runs/good"), "no valid checkpoint in",
         _copy("runs", then=_corrupt_all_checkpoints)),
    Case("sample-missing-run", ("sample", "runs/ghost"), "runs/ghost does not exist"),
    Case("sample-bad-count", ("sample", "runs/good", "--num=0"), "--num must be at least 1", _copy("runs")),
    Case("prepare-into-a-file", ("prepare", "corpus.jsonl", "--out", "afile"), "exists and is not a directory",
         lambda d, a: (_copy("corpus.jsonl")(d, a), _write("afile", "x")(d, a))),
]
# more cases, run in-process through lmsprint.cli.main (the same code path without a process per case)
MORE_CASES = [
    Case("jsonl-not-json", ("train", "c.jsonl", *TINY), "line 2 is not valid JSON",
         _write("c.jsonl", '{"text": "fine"}\n{"text": oops}\n')),
    Case("corrupt-gzip", ("train", "c.jsonl.gz", *TINY), "is corrupt or truncated",
         _write("c.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 100)[:40])),
    Case("truncated-zstd", ("train", "c.jsonl.zst", *TINY), "is corrupt or truncated (the file ends inside a zstd "
         "frame)", _write("c.jsonl.zst", _zstd(JSONL)[:-100])),
    Case("corrupt-zstd", ("train", "c.jsonl.zst", *TINY), "c.jsonl.zst is corrupt or truncated",
         _write("c.jsonl.zst", _flip(_zstd(JSONL), 20, 60))),
    Case("corrupt-gzip-text", ("train", "c.txt.gz", *TINY), "c.txt.gz is corrupt or truncated (Error -3 while "
         "decompressing data", _write("c.txt.gz", _flip(gzip.compress(JSONL), 30, 80))),
    Case("json-nested-too-deeply", ("train", "c.jsonl", *TINY), "c.jsonl line 2 is nested too deeply to read as JSON",
         _write("c.jsonl", '{"text": "fine"}\n' + "[" * 200_000 + "]" * 200_000 + "\n")),
    Case("json-huge-integer", ("train", "c.jsonl", *TINY), "c.jsonl line 2 has no 'text' string field",
         _write("c.jsonl", '{"text": "fine"}\n' + "9" * 5000 + "\n")),
    Case("corpus-is-a-fifo", ("train", "fifo.txt", *TINY), "fifo.txt is not a regular file or directory (a FIFO",
         _fifo("fifo.txt")),
    Case("tokenizer-without-unknown-token", ("train", "corpus.jsonl", *TINY, "--data.tokenizer=words.json"),
         "the tokenizer cannot encode the text (WordLevel error: Missing [UNK] token from the vocabulary)",
         lambda d, a: (_copy("corpus.jsonl")(d, a), _tokenizer_without_unknown_token(d, a))),
    Case("tokenizer-encodes-to-nothing", ("train", "corpus.jsonl", *TINY, "--data.tokenizer=nothing.json"),
         "the tokenizer 'nothing.json' encodes the text of 'corpus.jsonl' to nothing",
         lambda d, a: (_copy("corpus.jsonl")(d, a), _tokenizer_of_nothing(d, a))),
    Case("unsupported-file-type", ("train", "data.csv", *TINY), "unsupported file type", _write("data.csv", "a,b\n")),
    Case("glob-matching-nothing", ("train", "nothing*.txt", *TINY), "matches no .txt"),
    Case("single-document", ("train", "one.jsonl", *TINY), "no whole document can be held out",
         _write("one.jsonl", '{"text": "only one"}\n')),
    Case("no-validation-data", ("train", "corpus.jsonl", *TINY, "--data.val_fraction=0"), "no validation data",
         _copy("corpus.jsonl")),
    Case("shard-truncated", ("train", "prep", *TINY), "is truncated or corrupt",
         _copy("prep", then=_patch_shard("train-00000.bin", _truncate))),
    Case("prepared-meta-corrupt", ("train", "prep", *TINY), "prep/meta.json is corrupt; delete prep",
         _copy("prep", then=lambda d: (d / "prep" / "meta.json").write_text("{"))),
    Case("tokenizer-file-missing", ("train", "corpus.jsonl", *TINY, "--data.tokenizer=tok.json"),
         "tokenizer tok.json not found", _copy("corpus.jsonl")),
    Case("tokenizer-file-invalid", ("train", "corpus.jsonl", *TINY, "--data.tokenizer=tok.json"),
         "tok.json is not a valid tokenizer.json",
         _copy("corpus.jsonl", then=lambda d: (d / "tok.json").write_text("{}"))),
    Case("tokenizer-without-end-of-document", ("train", "corpus.jsonl", *TINY, "--data.tokenizer=noeot.json"),
         "no end-of-document token", lambda d, a: (_copy("corpus.jsonl")(d, a), _tokenizer_without_eot(d, a))),
    Case("width-not-divisible-by-heads", ("train", "corpus.jsonl", *TINY, "--model.n_embd=30", "--model.n_head=4"),
         "--model.n_embd=30 is not divisible by --model.n_head=4", _copy("corpus.jsonl")),
    Case("value-embeds-deeper-than-the-model", ("train", "corpus.jsonl", *TINY, "--model.value_embeds=1"),
         "--model.value_embeds=1 needs 2 layers", _copy("corpus.jsonl")),
    Case("unet-skips-in-one-layer", ("train", "corpus.jsonl", *TINY, "--model.unet_skips=true"),
         "--model.unet_skips needs at least 2 layers", _copy("corpus.jsonl")),
    Case("negative-bigram-embed", ("train", "c.jsonl", *TINY, "--model.bigram_embed=-1"),
         "--model.bigram_embed must be 0 (off) or >= 2 (hash buckets plus the reserved row), got -1"),
    Case("invalid-boolean", ("train", "c.jsonl", *TINY, "--train.compile=maybe"), "expected true or false"),
    Case("unknown-ns-coefficients", ("train", "c.jsonl", *TINY, "--optim.name=muon", "--optim.ns_coefficients=newton"),
         "--optim.ns_coefficients: 'newton' is not one of jordan, polar_express"),
    Case("normuon-beta2-out-of-range", ("train", "c.jsonl", *TINY, "--optim.name=muon", "--optim.normuon_beta2=1"),
         "--optim.normuon_beta2 must be in [0, 1), got 1.0"),
    Case("fp8-head-not-a-boolean", ("train", "c.jsonl", *TINY, "--train.fp8_head=e4m3"),
         "--train.fp8_head: expected true or false, got 'e4m3'"),
    Case("fused-ce-not-a-boolean", ("train", "c.jsonl", *TINY, "--train.fused_ce=chunked"),
         "--train.fused_ce: expected true or false, got 'chunked'"),
    Case("fused-ce-with-fp8-head", ("train", "c.jsonl", *TINY, "--train.fused_ce=true", "--train.fp8_head=true"),
         "--train.fused_ce and --train.fp8_head both replace the output head's matmul"),
    Case("toml-unknown-section", ("train", "c.jsonl", "--config", "r.toml"), "unknown section [bogus]",
         _write("r.toml", "[bogus]\nx = 1\n")),
    Case("toml-wrong-type", ("train", "c.jsonl", "--config", "r.toml"), "--train.steps: expected an integer",
         _write("r.toml", '[train]\nsteps = "many"\n')),
    Case("sample-every-checkpoint-corrupt", ("sample", "runs/good"), "no valid checkpoint under runs/good",
         _copy("runs", then=_corrupt_all_checkpoints)),
    Case("prepare-into-a-non-empty-directory", ("prepare", "corpus.jsonl", "--out", "runs"), "already exists and is "
         "not empty", _copy("corpus.jsonl", "runs")),
    Case("schedule-step-not-a-number", ("schedule", "--at", "5,x"), "--at takes comma-separated step numbers"),
    Case("schedule-in-epochs", ("schedule", "--train.epochs=2"), "needs the run length in steps"),
    Case("too-few-length-milestones", ("train", "c.jsonl", *TINY, "--data.seq_schedule=tokens", "--data.seq_start=4",
                                       "--data.seq_milestones=100"), "needs 2 doublings"),
    Case("negative-spike-warmup", ("train", "c.jsonl", *TINY, "--guard.spike_warmup=-1"),
         "--guard.spike_warmup must be >= 0"),
    Case("run-directory-is-a-file", ("train", "corpus.jsonl", *TINY, "--train.run_name=afile"), "already exists",
         lambda d, a: (_copy("corpus.jsonl")(d, a), (d / "runs").mkdir(), _write("runs/afile", "x")(d, a))),
    Case("prepared-meta-without-shards", ("train", "prep", *TINY), "prep is corrupt (meta.json lists no shards)",
         _copy("prep", then=lambda d: _edit_json(d / "prep" / "meta.json", lambda m: m.pop("train")))),
    Case("sample-a-file", ("sample", "afile"), "afile is not a directory", _write("afile", "x")),
    Case("sample-nan-temperature", ("sample", "runs/good", "--temperature", "nan"),
         "--temperature must be a finite number >= 0", _copy("runs")),
    Case("sample-tiny-temperature", ("sample", "runs/good", "--temperature", "1e-45"),
         "--temperature 1e-45 is below 0.001, where sampling is greedy anyway; use --temperature 0", _copy("runs")),
    Case("sample-seed-not-an-integer", ("sample", "runs/good", "--seed", "1e23"),
         "argument --seed: invalid int value: '1e23'", _copy("runs")),
    Case("sample-seed-too-large", ("sample", "runs/good", "--seed", str(10**23)),
         "--seed must be an integer from 0 to 2**64 - 1", _copy("runs")),
    Case("sample-prompt-not-utf8", ("sample", "runs/good", "--prompt", "ab\udcff"), "--prompt is not valid UTF-8",
         _copy("runs")),
    Case("sample-unknown-device", ("sample", "runs/good", "--device", "meta"), "--device: unknown device 'meta'",
         _copy("runs")),
    Case("export-under-a-file", ("export", "runs/good", "afile/hf"), "cannot write afile/hf",
         lambda d, a: (_copy("runs")(d, a), _write("afile", "x")(d, a))),
    Case("budget-not-a-duration", ("train", "c.jsonl", *TINY, "--train.budget=5"),
         "--train.budget must be a duration like 90s, 10m, 2h"),
    Case("budget-and-epochs", ("train", "c.jsonl", *TINY, "--train.budget=2m", "--train.epochs=1"),
         "--train.budget and --train.epochs both set the run's length"),
    Case("dry-run-without-budget", ("train", "c.jsonl", *TINY, "--dry-run"), "--dry-run prints the plan of a "
         "--train.budget run"),
    Case("resume-adding-a-budget", ("train", "--resume", "runs/good", "--train.budget=2m"),
         "resume cannot change --train.budget (the run was not planned for one)", _copy("runs")),
    Case("budget-with-several-processes", ("train", "c.jsonl", *TINY, "--train.budget=2m", "--nproc=2"),
         "--train.budget plans runs of one process"),
    Case("budget-spent-before-planning", ("train", "corpus.jsonl", *TINY, "--train.budget=1s"), "went to start-up "
         "and data preparation before planning", _copy("corpus.jsonl")),
    Case("compare-png-not-an-image", ("compare", "runs/good", "--png", "out.txt"), "--png out.txt: give a file name "
         "ending in .png", _copy("runs")),
]


def _edit_json(path: Path, edit: object) -> None:
    data = json.loads(path.read_text())
    edit(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))


def _snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    return {p.relative_to(root).as_posix(): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def _allowed(root: Path, rel: str) -> bool:
    """New paths a failed command may leave: complete prepared-data cache entries (written atomically)."""
    parts = rel.split("/")
    if parts[0] != "cache":
        return False
    if len(parts) <= 2:
        return parts[1:] in ([], ["data"])
    return parts[1] == "data" and (root / "cache" / "data" / parts[2] / "meta.json").exists()


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus, a trained run (runs/good, checkpoints at steps 2 and 4) and a prepared directory (prep)."""
    root = tmp_path_factory.mktemp("bad-input-assets")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(60)))
    train(tiny_config(corpus, train__steps=4, train__ckpt_every=2), run_dir=root / "runs" / "good")
    prepare(str(corpus), root / "prep", tokenizer="byte", val_fraction=0.1, progress=False)
    return root


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, assets: Path) -> dict:
    """Run every selected case (two at a time): {id: (process, case dir, snapshot before)}."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params}
    root = tmp_path_factory.mktemp("bad-input")
    jobs = {}
    for case in CASES:
        if case.id not in selected or (case.cpu_only and not CPU_ONLY):
            continue
        d = root / case.id
        d.mkdir()
        if case.setup is not None:
            case.setup(d, assets)
        jobs[case.id] = (case, d, _snapshot(d))

    def run(case: Case, d: Path) -> object:
        return run_cli(*case.args, cwd=d, env_extra={"LMSPRINT_CACHE": str(d / "cache")}, timeout=120)

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(run, case, d) for key, (case, d, _) in jobs.items()}
        return {key: (futures[key].result(), d, before) for key, (_, d, before) in jobs.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_cleanly(case: Case, outcomes: dict) -> None:
    if case.cpu_only and not CPU_ONLY:
        pytest.skip("a GPU is present")
    proc, d, before = outcomes[case.id]
    assert_clean_error(proc, case.expect)
    _assert_untouched(d, before)


@pytest.mark.parametrize("case", MORE_CASES, ids=[c.id for c in MORE_CASES])
def test_more_bad_input_fails_cleanly(case: Case, tmp_path: Path, assets: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    from lmsprint.cli import main

    if case.setup is not None:
        case.setup(tmp_path, assets)
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LMSPRINT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as e:
        main(list(case.args))
    err = capsys.readouterr().err
    assert_clean_error(subprocess.CompletedProcess(case.args, e.value.code, "", err), case.expect)
    _assert_untouched(tmp_path, before)


def test_an_error_under_progress_bars_is_one_line_on_screen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    """Bars drawn at once (no delay), then a bad line in the corpus's second file: the bars are wiped, and the
    terminal shows the error line alone."""
    from lmsprint.cli import main
    from lmsprint.data import prepare as prep

    monkeypatch.setattr(prep, "BAR_DELAY", 0.0)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_bytes(JSONL)
    (tmp_path / "corpus" / "b.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    for tokenizer, bar in (("bpe", "train BPE"), ("byte", "tokenize")):
        with pytest.raises(SystemExit) as e:
            main(["train", "corpus", *TINY, "--log.progress=true", f"--data.tokenizer={tokenizer}",
                  "--data.vocab_size=300"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and bar in err  # the bar was drawn
        assert screen_lines(err) == ["error: corpus/b.jsonl line 2 is not valid JSON; each line must be one JSON "
                                     "object"], err


def test_a_training_bar_is_wiped_when_training_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The training loop's bar (say a run diverges at step 3) leaves the screen to the error line; a loop that
    ends normally keeps its bar."""
    from lmsprint.config import LogConfig
    from lmsprint.training.report import Report

    report = Report(tmp_path, LogConfig(progress=True), is_main=True)
    with pytest.raises(CheckpointError), report.progress(10, 0) as bar:
        bar.update(3)
        raise CheckpointError("training diverged")
    assert screen_lines(capsys.readouterr().err) == []
    with report.progress(10, 0) as bar:
        bar.update(10)
    assert screen_lines(capsys.readouterr().err)[0].startswith("train: 100%")


def _assert_untouched(d: Path, before: dict[str, tuple[bool, int, int]]) -> None:
    after = _snapshot(d)
    changed = sorted(k for k in before if k in after and before[k] != after[k] and not before[k][0])
    removed = sorted(set(before) - set(after))
    added = sorted(k for k in set(after) - set(before) if not _allowed(d, k))
    assert not (changed or removed or added), f"changed {changed}, removed {removed}, left behind {added}"


def test_inventory_is_documented() -> None:
    """Every case has a row in docs/errors.md (and at least 20 run the CLI in a subprocess)."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    assert len(CASES) >= 20
    missing = [c.id for c in CASES + MORE_CASES if f"`{c.id}`" not in doc]
    assert not missing, missing


# ----------------------------------------------------------------------------------------------------------
# a full disk while checkpointing (simulated in-process: a subprocess cannot be given a full disk portably)


def _save(root: Path, step: int) -> Path:
    config = resolve_model_config(ModelConfig(n_layer=1, n_head=2, n_embd=16), vocab_size=257, block_size=16)
    model = build_model(config, device=torch.device("cpu"), seed=step)  # a checkpoint's weights fit its meta.json
    return ckpt.save_checkpoint(root, step, model_sd=ckpt.model_state(model), state={"step": step},
                                model_config=config, keep=3)


def _raise(error: BaseException) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise error
    return fail


FULL_DISK = {
    # how each writer reports ENOSPC (measured on a full tmpfs)
    "safetensors": ("save_file", ckpt.SafetensorError("Error while serializing: I/O error: No space left on device "
                                                      "(os error 28)")),
    "torch.save": ("torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")),
    "oserror": ("save_file", OSError(errno.ENOSPC, "No space left on device")),
}


@pytest.mark.parametrize("writer", sorted(FULL_DISK))
def test_full_disk_while_checkpointing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str) -> None:
    _save(tmp_path, 1)
    target, error = FULL_DISK[writer]
    if target == "torch.save":
        monkeypatch.setattr(ckpt.torch, "save", _raise(error))
        monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, free=4096))
    else:
        monkeypatch.setattr(ckpt, target, _raise(error))
    with pytest.raises(CheckpointError) as e:
        _save(tmp_path, 2)
    message = str(e.value)
    assert message.startswith(f"disk full while writing checkpoint {tmp_path / 'step_00000002'}"), message
    assert "earlier checkpoints are intact" in message and f"--resume {tmp_path.parent}" in message
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # no temporary directory left
    ckpt.verify(tmp_path / "step_00000001")


def test_checkpoint_write_error_other_than_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, 1)
    monkeypatch.setattr(ckpt, "save_file", _raise(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .* \(Permission denied; earlier "
                                              r"checkpoints are intact\); check the run directory's permissions"):
        _save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]


@pytest.mark.parametrize(("target", "shown"), [("step_00000006", "step_00000006"), ("best", "checkpoints/best")])
def test_full_disk_during_training_stops_cleanly_and_resumes(tmp_path: Path, corpus: Path,
                                                             monkeypatch: pytest.MonkeyPatch, target: str,
                                                             shown: str) -> None:
    """What `lmsprint train` does on a full disk, writing a step's checkpoint or best/: the error (exit 2) naming
    the checkpoint and the run to resume, earlier checkpoints kept, --resume later."""
    real = ckpt.save_file
    failed = []

    def full_at_target(sd: object, path: str, *args: object, **kwargs: object) -> None:
        if not failed and f".tmp-{target}-" in path:  # the first write of that checkpoint
            failed.append(path)
            raise ckpt.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(sd, path, *args, **kwargs)

    cfg = tiny_config(corpus, train__steps=10, train__ckpt_every=3, train__eval_every=5)
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(ckpt, "save_file", full_at_target)
        with pytest.raises(CheckpointError, match=f"disk full while writing checkpoint .*{shown} .*--resume {run}$"):
            train(cfg, run_dir=run)
    assert failed
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000003"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    result = train(cfg, run_dir=run, resume=True)
    assert result.step == 10


def test_interrupted_prepare_leaves_nothing(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk (or Ctrl-C) while preparing: no output directory, no temporary one."""
    from lmsprint.data import shards
    from lmsprint.errors import DataError

    monkeypatch.setattr(shards.os, "fsync", _raise(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DataError, match="No space left on device.*free space"):
        prepare(str(corpus), tmp_path / "out", tokenizer="byte", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]
