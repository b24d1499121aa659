import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run_cli, tiny_config

from lmsprint.config import DataConfig
from lmsprint.data.prepare import prepared_data
from lmsprint.model import GPT, GPTConfig
from lmsprint.training.metrics import read_metrics
from lmsprint.training.run import train


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


@pytest.mark.slow
def test_short_run_on_real_text_beats_unigram_entropy(tmp_path: Path, shared_data: Path) -> None:
    """~200 steps on tinyshakespeare end well under the unigram entropy of its tokens."""
    src = shared_data / "tinyshakespeare.txt"
    cfg = tiny_config(src, data__seq_len=128, train__batch_size=8, train__steps=200, train__eval_every=100,
                      train__eval_tokens=8192, train__log_every=20, optim__lr=3e-3, model__n_embd=64,
                      model__n_head=4, train__ckpt_every=0)
    result = train(cfg, run_dir=tmp_path / "run")
    data = prepared_data(DataConfig(str(src), tokenizer="byte", val_fraction=0.1), progress=False)
    counts = np.bincount(np.asarray(data.train[0].tokens), minlength=257).astype(float)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    assert result.val_loss is not None
    assert result.val_loss < unigram - 0.5, (result.val_loss, unigram)


def test_exact_resume(tmp_path: Path, corpus: Path) -> None:
    """N steps straight equal k steps, a stop, and a resume to N: same losses, same weights."""
    cfg = tiny_config(corpus, train__steps=12, train__ckpt_every=6)
    straight = train(cfg, run_dir=tmp_path / "a")
    first = tiny_config(corpus, train__steps=12, train__ckpt_every=6)
    from lmsprint.training.trainer import Trainer

    trainer = Trainer(first, tmp_path / "b")
    trainer.total_steps = 12

    class Stop(Exception):
        pass

    # run to step 6 (a checkpoint), then crash
    original = trainer.save

    def save_then_stop() -> None:
        original()
        if trainer.state.step == 6:
            raise Stop

    trainer.save = save_then_stop  # type: ignore[method-assign]
    with pytest.raises(Stop):
        trainer.run()
    resumed = train(first, run_dir=tmp_path / "b", resume=True)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    assert abs(straight.val_loss - resumed.val_loss) <= 1e-6
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "a" / "checkpoints" / "step_00000012" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "checkpoints" / "step_00000012" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_directory_contents(tmp_path: Path, corpus: Path) -> None:
    cfg = tiny_config(corpus, log__plot=True)
    result = train(cfg, run_dir=tmp_path / "run")
    run = result.run_dir
    for name in ("config.toml", "metrics.jsonl", "loss.png", "tokenizer.json"):
        assert (run / name).exists(), name
    records = read_metrics(run / "metrics.jsonl")
    kinds = {r["kind"] for r in records}
    assert {"config", "train", "val", "summary"} <= kinds
    train_rec = next(r for r in records if r["kind"] == "train")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens"} <= set(train_rec)
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-3:] == ["best", "step_00000005",
                                                                            "step_00000010"]  # best/ + keep 2
    assert math.isfinite(result.val_loss)


def test_resumed_run_plots_metrics_with_damaged_lines(tmp_path: Path, corpus: Path) -> None:
    """The loss plot drawn at the end of a run reads metrics.jsonl as compare does: damaged lines are skipped."""
    run = tmp_path / "run"
    train(tiny_config(corpus, train__steps=4, log__plot=True), run_dir=run)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "train", "step": 5, "loss": "\xff\xfe"}\n[]\n{"kind": "val", "step": null, "loss": 1}\n')
    (run / "loss.png").unlink()
    result = train(tiny_config(corpus, train__steps=8, log__plot=True), run_dir=run, resume=True)
    assert result.step == 8 and (run / "loss.png").stat().st_size > 10_000
    assert max(losses(run)) == 8


def test_sample_from_run(tmp_path: Path, corpus: Path) -> None:
    from lmsprint.sample import sample

    result = train(tiny_config(corpus), run_dir=tmp_path / "run")
    texts = sample(result.run_dir, prompt="the", max_new_tokens=10, num_samples=2)
    assert len(texts) == 2 and all(isinstance(t, str) and t.startswith("the") for t in texts)


def test_cli_sample_prints_the_prompt_once(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmsprint.cli import main

    result = train(tiny_config(corpus, train__steps=4), run_dir=tmp_path / "run")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(result.run_dir), "--prompt", "hello ", "--tokens", "0"])
    assert exit_.value.code == 0 and capsys.readouterr().out == "hello \n"


def test_sample_keeps_an_end_of_text_written_in_the_prompt(tmp_path: Path, corpus: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``<|endoftext|>`` typed in a prompt is text (it neither cuts the prompt nor the output); the output ends at
    the end-of-document token the model generates."""
    from lmsprint.data.tokenizer import load_tokenizer
    from lmsprint.sample import sample

    run = train(tiny_config(corpus, train__steps=4), run_dir=tmp_path / "run").run_dir
    prompt = "one <|endoftext|> two"
    assert sample(run, prompt=prompt, max_new_tokens=3, temperature=0)[0].startswith(prompt)
    tok = load_tokenizer(run / "tokenizer.json")
    said = tok.encode(" three") + [tok.eot_id] + tok.encode(" four")

    def generate(self: GPT, idx: torch.Tensor, max_new_tokens: int, **kwargs: object) -> torch.Tensor:
        return torch.cat([idx, torch.tensor([said] * idx.shape[0])], dim=1)

    monkeypatch.setattr(GPT, "generate", generate)
    assert sample(run, prompt=prompt, num_samples=2) == [prompt + " three"] * 2


def test_cli_sample_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    from lmsprint.cli import main

    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    helps = {h.split()[0]: h for h in re.split(r" (?=--[a-z-]+ [A-Z_]+ )", out.split("options:")[1])}
    for option, default in (("--tokens", 200), ("--temperature", 0.8), ("--top-k", 50), ("--seed", 0), ("--num", 1),
                            ("--device", "cpu")):
        assert helps[option].endswith(f"(default: {default})"), helps[option]


TINY = ["--data.tokenizer=byte", "--model.n_layer=1", "--model.n_embd=16", "--model.n_head=2", "--train.steps=2",
        "--log.progress=false", "--train.device=cpu", "--data.seq_len=16", "--train.batch_size=2"]


def test_cli_bad_inputs(tmp_path: Path, corpus: Path) -> None:
    assert_clean_error(run_cli("train", str(tmp_path / "nope.txt"), *TINY, cwd=tmp_path), "not found")
    (tmp_path / "empty.txt").write_text("")
    assert_clean_error(run_cli("train", str(tmp_path / "empty.txt"), *TINY, cwd=tmp_path), "is empty")
    assert_clean_error(run_cli("train", str(corpus), "--model.preset=gigantic", cwd=tmp_path), "unknown preset")
    assert_clean_error(run_cli("train", str(corpus), "--optim.lr=fast", cwd=tmp_path), "--optim.lr")
    assert_clean_error(run_cli("train", str(corpus), "--train.nonsense=1", cwd=tmp_path), "train.nonsense")
    assert_clean_error(run_cli("train", "--resume", str(tmp_path / "runs" / "ghost"), cwd=tmp_path), "no run to resume")
    # corrupted shard header in a prepared directory
    prep = tmp_path / "prep"
    proc = run_cli("prepare", str(corpus), "--out", str(prep), "--data.tokenizer=byte", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    shard = prep / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[:8] = b"garbage!"
    shard.write_bytes(bytes(raw))
    assert_clean_error(run_cli("train", str(prep), *TINY, cwd=tmp_path), "not an lmsprint token shard")


def test_cli_train_writes_run_and_sample(tmp_path: Path, corpus: Path) -> None:
    proc = run_cli("train", str(corpus), *TINY, "--train.run_name=r", "--sample=5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "final validation loss" in proc.stdout and "sample:" in proc.stdout
    cfg_text = (tmp_path / "runs" / "r" / "config.toml").read_text()
    assert 'tokenizer = "byte"' in cfg_text
    # the same run name again refuses to overwrite
    again = run_cli("train", str(corpus), *TINY, "--train.run_name=r", cwd=tmp_path)
    assert_clean_error(again, "already exists")
    json.loads((tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()[0])


def test_compiled_runs_in_one_process_stay_compiled(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of different shapes one after another in a process (bench, studies, restarts) each compile their
    own graphs: without a fresh Dynamo state per run, the ninth shape would pass Dynamo's recompile limit and
    run eager without a word (it did on the H200). The eager backend keeps the test quick; the limit and the
    graph count are Dynamo's, whatever the backend."""
    from lmsprint.model import GPT

    compile_blocks = GPT.compile_blocks
    monkeypatch.setattr(GPT, "compile_blocks", lambda self: compile_blocks(self, backend="eager"))
    graphs = []
    for i in range(10):  # more distinct widths than torch._dynamo.config.recompile_limit (8)
        cfg = tiny_config(corpus, train__compile=True, train__steps=3, train__eval_every=0, train__ckpt_every=0,
                          model__n_embd=32 + 8 * i, model__n_layer=1)
        run_dir = corpus.parent / f"run{i}"
        train(cfg, run_dir=run_dir)
        summary = next(r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "summary")
        graphs.append(summary["graphs"])
    assert graphs[0] > 0
    assert graphs == [graphs[0]] * 10  # each run compiled its own graphs (0 once Dynamo has given up)


def test_logged_rows_and_lengths_describe_the_step_taken(corpus: Path) -> None:
    """Every train record's tokens_per_row is real tokens over rows, and its seq_len is the curriculum length of
    the step just taken (not of the batch prepared for the next step)."""
    from lmsprint.data.curriculum import SeqLenSchedule

    cfg = tiny_config(corpus, data__batching="pad", data__pad_multiple=8, data__seq_len=512, train__steps=6,
                      train__ckpt_every=0, train__peak_tflops=1)
    run_dir = corpus.parent / "pad"
    train(cfg, run_dir=run_dir)
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    prev = 0
    for r in recs:  # log_every=1: one step, batch_size rows per record
        assert r["tokens_per_row"] == pytest.approx((r["tokens"] - prev) / cfg.train.batch_size)
        prev = r["tokens"]
    assert min(r["tokens_per_row"] for r in recs) < 0.8 * cfg.data.seq_len  # short documents: rows not full
    # MFU counts 12 L C T attention FLOPs per position with T the padded width attended over (one micro-batch of
    # all 4 rows per step here: its width, i.e. the step's slots per row), not the 512 of --data.seq_len
    model = next(r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "config")["model"]
    gpt = GPT(GPTConfig(**model))
    attn = [(implied_flops_per_token(r) - gpt.flops_per_token(0)) / (12 * 2 * 32) for r in recs]
    assert attn == pytest.approx([r["tokens_per_row"] / (1 - r["waste"]) for r in recs])
    assert min(attn) < 512

    cfg = tiny_config(corpus, data__seq_schedule="stages", data__seq_start=8, data__seq_warmup=0.5,
                      train__steps=8, train__ckpt_every=0, train__peak_tflops=1)
    run_dir = corpus.parent / "stages"
    train(cfg, run_dir=run_dir)
    curriculum = SeqLenSchedule("stages", 32, 8, 8, warmup=0.5)
    lengths = {r["step"]: r["seq_len"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}
    assert lengths == {s: curriculum.length_at(s - 1) for s in range(1, 9)}
    assert len(set(lengths.values())) == 3  # 8, 16, 32
    # MFU counts the attention FLOPs of the length trained, 12 L C T per token: T = 8, 16, 32 in turn
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    by_len = {r["seq_len"]: implied_flops_per_token(r) for r in recs}
    assert by_len[16] - by_len[8] == pytest.approx(12 * 2 * 32 * 8)
    assert by_len[32] - by_len[16] == pytest.approx(12 * 2 * 32 * 16)


def implied_flops_per_token(record: dict) -> float:
    """The FLOPs per computed position behind a record's MFU (peak 1 TFLOP/s, one process)."""
    slots_per_s = record["tokens_per_s"] / (1 - record["waste"])
    return record["mfu"] * 1e12 / slots_per_s



def test_out_dir_expands_the_home_directory(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--train.out_dir=~/runs means the home directory's runs/, as --data.source=~/... does; no literal '~'."""
    from lmsprint.cli import main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["train", str(corpus), *TINY, "--train.out_dir=~/runs", "--train.run_name=r", "--sample=0",
              "--log.plot=false"])
    assert e.value.code == 0
    assert (tmp_path / "home" / "runs" / "r" / "config.toml").exists() and not (tmp_path / "~").exists()


def test_sdpa_backend_falls_back_where_it_cannot_run(tmp_path: Path, corpus: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """--train.sdpa_backend=cudnn on a CPU: one warning line, and the run trains as with auto (same losses);
    a backend that runs here (math) is used, silently, with the same losses too."""
    auto = train(tiny_config(corpus, train__steps=4), run_dir=tmp_path / "auto")
    capsys.readouterr()
    cudnn = train(tiny_config(corpus, train__steps=4, train__sdpa_backend="cudnn"), run_dir=tmp_path / "cudnn")
    err = capsys.readouterr()
    warned = [x for x in (err.out + err.err).splitlines() if x.startswith("warning:")]
    assert len(warned) == 1 and warned[0].startswith("warning: --train.sdpa_backend=cudnn cannot run here (")
    assert warned[0].endswith("; using auto")
    math_run = train(tiny_config(corpus, train__steps=4, train__sdpa_backend="math"), run_dir=tmp_path / "math")
    assert "warning:" not in "".join(capsys.readouterr())
    assert losses(tmp_path / "cudnn") == losses(tmp_path / "auto")
    assert losses(tmp_path / "math") == pytest.approx(losses(tmp_path / "auto"), abs=1e-4)
    assert cudnn.val_loss == auto.val_loss and math_run.val_loss == pytest.approx(auto.val_loss, abs=1e-4)


def test_fp8_head_falls_back_on_a_cpu(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--train.fp8_head=true on a CPU: one warning line, and the run trains with the regular head -- the same
    losses as --train.fp8_head=false, step for step."""
    off = train(tiny_config(corpus, train__steps=4), run_dir=tmp_path / "off")
    assert "warning:" not in "".join(capsys.readouterr())
    on = train(tiny_config(corpus, train__steps=4, train__fp8_head=True), run_dir=tmp_path / "on")
    err = capsys.readouterr()
    warned = [x for x in (err.out + err.err).splitlines() if x.startswith("warning:")]
    assert warned == ["warning: --train.fp8_head=true cannot run here (FP8 matmuls need a CUDA GPU, this is cpu); "
                      "using the regular matmul"]
    assert losses(tmp_path / "on") == losses(tmp_path / "off") and len(losses(tmp_path / "on")) == 4
    assert on.val_loss == off.val_loss
