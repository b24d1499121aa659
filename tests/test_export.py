"""Export to Hugging Face transformers: the loaded model gives lmsprint's logits, the tokenizer its ids."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_docs, tiny_config

from lmsprint.cli import main
from lmsprint.data.tokenizer import TextTokenizer, byte_tokenizer
from lmsprint.errors import LmsprintError
from lmsprint.export import architecture, export
from lmsprint.model import GPT, GPTConfig
from lmsprint.sample import load_model
from lmsprint.training import checkpoint as ckpt
from lmsprint.training.trainer import train

transformers = pytest.importorskip("transformers")

LLAMA = {}
GPT2 = {"model__pos_emb": "learned", "model__norm": "layernorm", "model__mlp": "gelu"}
VARIANTS = {
    "llama-tied": LLAMA,
    "llama-untied": {**LLAMA, "model__tie_embeddings": "false"},
    "gpt2-tied": GPT2,
    "gpt2-untied": {**GPT2, "model__tie_embeddings": "false"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One short trained run per exportable architecture (trained, so norm gains are no longer all ones)."""
    root = tmp_path_factory.mktemp("export-runs")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(40)))
    out = {}
    for name, overrides in VARIANTS.items():
        cfg = tiny_config(corpus, train__steps=3, train__eval_every=0, train__ckpt_every=0, model__rope_base=500.0,
                          data__cache_dir=str(root / "cache"), **overrides)
        out[name] = train(cfg, run_dir=root / name).run_dir
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_model_gives_lmsprint_logits(runs: dict[str, Path], tmp_path: Path, variant: str) -> None:
    out = export(runs[variant], tmp_path / "hf")
    model, tok, _ = load_model(runs[variant])
    cfg = model.config
    assert cfg.padded_vocab > cfg.vocab_size  # 257 byte tokens padded to 320: the export slices the padding off

    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf.eval()
    family = variant.split("-")[0]
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    assert hf.dtype == torch.float32
    c = json.loads((out / "config.json").read_text())
    assert c["vocab_size"] == cfg.vocab_size == tok.vocab_size
    assert c["bos_token_id"] == c["eos_token_id"] == tok.eot_id
    assert c["torch_dtype"] == c["dtype"] == "float32"
    assert c["max_position_embeddings" if family == "llama" else "n_positions"] == cfg.block_size
    assert c["tie_word_embeddings"] == cfg.tie_embeddings
    tied = hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    assert tied == cfg.tie_embeddings

    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)
        theirs = hf(idx).logits
    assert theirs.shape == ours.shape == (2, cfg.block_size, cfg.vocab_size)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_exported_tokenizer_matches_lmsprint(runs: dict[str, Path], tmp_path: Path) -> None:
    out = export(runs["llama-tied"], tmp_path / "hf")
    _, tok, _ = load_model(runs["llama-tied"])
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    assert hf_tok.eos_token == hf_tok.bos_token == tok.eot_token
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == tok.eot_id
    for text in ("hello world", "  spaced\n\nlines\tand tabs ", "unicode: héllo, 日本語, emoji 🎉", ""):
        ids = tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids
        assert hf_tok(text)["input_ids"] == [tok.eot_id, *ids]  # documents start with the end-of-document token
        assert hf_tok.decode(ids) == tok.decode(ids) == text
        assert hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=True) == text


def test_export_refuses_a_non_empty_output_directory(runs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(LmsprintError, match="not empty"):
        export(runs["llama-tied"], tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "x"


BASE = dict(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16, mlp_hidden=32)


@pytest.mark.parametrize(("options", "flag"), [
    ({"qk_norm": True}, "--model.qk_norm"),
    ({"logit_softcap": 30.0}, "--model.logit_softcap"),
    ({"mlp": "relu2"}, "--model.mlp=relu2"),
    ({"norm": "layernorm"}, "--model.norm=layernorm"),
    ({"pos_emb": "learned"}, "--model.norm=rmsnorm"),
    ({"mlp": "gelu"}, "--model.mlp=gelu"),
])
def test_unsupported_architectures_name_the_option(options: dict, flag: str) -> None:
    with pytest.raises(LmsprintError, match=flag.replace(".", r"\.")):
        architecture(GPTConfig(**BASE, **options))


def test_supported_architectures() -> None:
    assert architecture(GPTConfig(**BASE)) == "llama"
    assert architecture(GPTConfig(**BASE, zero_init_proj=True, tie_embeddings=False)) == "llama"
    assert architecture(GPTConfig(**BASE, pos_emb="learned", norm="layernorm", mlp="gelu")) == "gpt2"


def _untrained_run(run: Path, cfg: GPTConfig, tok: TextTokenizer) -> GPT:
    """A run directory as the trainer leaves it (a checkpoint and the tokenizer), without training."""
    model = GPT(cfg)
    model.init_weights(seed=1)
    ckpt.save_checkpoint(run / "checkpoints", 1, model_sd=ckpt.model_state(model), state={}, model_config=cfg, keep=1)
    tok.save(run / "tokenizer.json")
    return model.eval()


def test_tokenizer_with_another_eot_and_a_post_processor(tmp_path: Path) -> None:
    """A tokenizer.json passed by path: its own end-of-document token, its ByteLevel post-processor kept."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    raw = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=True)
    raw.add_special_tokens(["</s>"])
    tok = TextTokenizer(raw)
    assert tok.eot_token == "</s>"
    model = _untrained_run(tmp_path / "run", GPTConfig(**BASE), tok)
    out = export(tmp_path / "run", tmp_path / "hf")

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token == hf_tok.bos_token == "</s>" and hf_tok.eos_token_id == tok.eot_id == 256
    text = "def main():\n    return 1"
    assert hf_tok(text)["input_ids"] == [tok.eot_id, *tok.encode(text)]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    idx = torch.tensor([[tok.eot_id, *tok.encode(text)][:BASE["block_size"]]])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=1e-4)


def test_cli_export_of_unsupported_model_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    _untrained_run(run, GPTConfig(**BASE, qk_norm=True), byte_tokenizer())
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run), str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model.qk_norm=true cannot be exported") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "hf").exists()


def test_cli_export(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(runs["gpt2-tied"]), str(tmp_path / "hf")])
    assert exit_info.value.code == 0
    assert "from_pretrained" in capsys.readouterr().out
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= names
