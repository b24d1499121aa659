"""Export to Hugging Face transformers: for every architecture option the loaded model gives lmsprint's logits and
its greedy text (generate() with and without a KV cache, and pipeline()), and the tokenizer gives its ids."""

import dataclasses
import json
import os
import pickle
import tempfile
from importlib import resources
from pathlib import Path

import pytest
import torch
from conftest import make_docs, tiny_config

# loading an export with a modeling file copies it into transformers' modules cache: a temporary one, not ~/.cache
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="lmsprint-hf-modules-"))

import lmsprint.export as export_module  # noqa: E402
from lmsprint.cli import main  # noqa: E402
from lmsprint.config import ModelConfig, build_config, recipe_names  # noqa: E402
from lmsprint.data.tokenizer import TextTokenizer, byte_tokenizer  # noqa: E402
from lmsprint.errors import LmsprintError  # noqa: E402
from lmsprint.export import MODELING_FILE, architecture, export  # noqa: E402
from lmsprint.model import GPT, GPTConfig, resolve_model_config  # noqa: E402
from lmsprint.sample import load_model, sample  # noqa: E402
from lmsprint.training import checkpoint as ckpt  # noqa: E402
from lmsprint.training.run import train  # noqa: E402

transformers = pytest.importorskip("transformers")

SHAPE_FIELDS = ("preset", "n_layer", "n_head", "n_embd", "mlp_hidden")


def recipe_options(recipe: str) -> dict[str, str]:
    """The architecture options a shipped recipe sets (its model section without the size), as overrides."""
    model = build_config(recipe).model
    return {f"model__{f.name}": str(value).lower() if isinstance(value, bool) else str(value)
            for f in dataclasses.fields(ModelConfig)
            if f.name not in SHAPE_FIELDS and (value := getattr(model, f.name)) != f.default}


GPT2 = {"model__pos_emb": "learned", "model__norm": "layernorm", "model__mlp": "gelu"}
# each architecture option alone (on the default rope + rmsnorm + swiglu model), GPT-2's combination, and `fast`'s
VARIANTS = {
    "default": {},
    "untied": {"model__tie_embeddings": "false"},
    "gpt2": GPT2,
    "gpt2-untied": {**GPT2, "model__tie_embeddings": "false"},
    "learned": {"model__pos_emb": "learned"},
    "layernorm": {"model__norm": "layernorm"},
    "gelu": {"model__mlp": "gelu"},
    "relu2": {"model__mlp": "relu2"},
    "qk_norm": {"model__qk_norm": "true"},
    "softcap": {"model__logit_softcap": "1.5"},  # small: the cap binds on the trained model's logits
    "zero_init_proj": {"model__zero_init_proj": "true"},
    "fast": recipe_options("fast"),
}
CLASSES = {"default": "LlamaForCausalLM", "untied": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel",
           "gpt2-untied": "GPT2LMHeadModel", "zero_init_proj": "LlamaForCausalLM"}  # the rest: the modeling file
PROMPT, NEW_TOKENS = "the q", 20  # 1 + 5 prompt tokens + 20 new ones: within the 32 trained positions


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One short trained run per variant (trained, so that norm gains are no longer ones and greedy choices are
    clear-cut), all with rotary base 500 (not the default)."""
    root = tmp_path_factory.mktemp("export-runs")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(40)))
    out = {}
    for name, overrides in VARIANTS.items():
        cfg = tiny_config(corpus, train__steps=8, train__eval_every=0, train__ckpt_every=0, model__rope_base=500.0,
                          optim__lr=1e-2, data__cache_dir=str(root / "cache"), **overrides)
        out[name] = train(cfg, run_dir=root / name).run_dir
    return out


@pytest.fixture(scope="module")
def exports(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {name: export(run, root / name.replace("-", "_")) for name, run in runs.items()}


def _load(out: Path) -> "transformers.PreTrainedModel":
    return transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


def test_the_fast_recipe_combines_options() -> None:
    fast = VARIANTS["fast"]
    assert {"model__mlp", "model__qk_norm", "model__logit_softcap", "model__tie_embeddings"} <= fast.keys()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_model_gives_lmsprint_logits(runs: dict[str, Path], exports: dict[str, Path], variant: str) -> None:
    out = exports[variant]
    model, tok, _ = load_model(runs[variant])
    cfg = model.config
    assert cfg.padded_vocab > cfg.vocab_size  # 257 byte tokens padded to 320: the export slices the padding off

    hf = _load(out)
    assert type(hf).__name__ == CLASSES.get(variant, "LmsprintForCausalLM")
    assert (out / MODELING_FILE).exists() == (variant not in CLASSES)
    assert hf.dtype == torch.float32
    c = json.loads((out / "config.json").read_text())
    assert c["vocab_size"] == cfg.vocab_size == tok.vocab_size
    assert c["bos_token_id"] == c["eos_token_id"] == tok.eot_id
    assert c["torch_dtype"] == c["dtype"] == "float32"
    assert hf.config.max_position_embeddings == cfg.block_size
    assert c["tie_word_embeddings"] == cfg.tie_embeddings
    tied = hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    assert tied == cfg.tie_embeddings

    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)
        theirs = hf(idx).logits
    assert theirs.shape == ours.shape == (2, cfg.block_size, cfg.vocab_size)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    if variant == "softcap":
        assert ours.abs().max() > 0.5 * cfg.logit_softcap  # the cap shapes these logits (tanh is not linear there)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_model_generates_lmsprint_greedy_text(runs: dict[str, Path], exports: dict[str, Path],
                                                       variant: str) -> None:
    """generate() with the cache, without it, and pipeline() all give ``lmsprint sample --top-k 1``'s text."""
    out = exports[variant]
    [ours] = sample(runs[variant], prompt=PROMPT, max_new_tokens=NEW_TOKENS, top_k=1)
    assert ours.startswith(PROMPT) and len(ours) > len(PROMPT)

    hf = _load(out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    inputs = hf_tok(PROMPT, return_tensors="pt")
    cached = hf.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)
    uncached = hf.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    assert hf_tok.decode(cached[0], skip_special_tokens=True) == ours

    pipe = transformers.pipeline("text-generation", model=str(out), trust_remote_code=True)
    # add_special_tokens: the prompt starts with the end-of-document token, as every lmsprint document does
    [result] = pipe(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, add_special_tokens=True)
    assert result["generated_text"] == ours


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_logits_equal_full_logits(exports: dict[str, Path], variant: str) -> None:
    """A prefill and then one token at a time through the KV cache give the logits of one full forward pass
    (greedy text alone could miss a small error: these tiny models mostly continue with spaces)."""
    hf = _load(exports[variant])
    idx = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = hf(idx).logits
        first = hf(idx[:, :12], use_cache=True)
        name = "cache" if "cache" in first else "past_key_values"  # transformers 5 / 4
        steps, cache = [first.logits], first[name]
        for t in range(12, 20):
            step = hf(idx[:, t : t + 1], use_cache=True, **{name: cache})
            steps.append(step.logits)
            cache = step[name]  # the same object, or (older transformers' Llama, GPT-2) a new tuple
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in CLASSES])
def test_left_padded_batch_generates_what_each_prompt_does_alone(exports: dict[str, Path], variant: str) -> None:
    """The modeling file's padding path: positions count from each row's first real token, padding is hidden."""
    hf = _load(exports[variant])
    hf_tok = transformers.AutoTokenizer.from_pretrained(exports[variant], trust_remote_code=True)
    hf_tok.padding_side = "left"
    prompts = ["a", "the quick"]
    batch = hf_tok(prompts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    together = hf.generate(**batch, max_new_tokens=8, do_sample=False)
    for row, prompt in zip(together, prompts):
        alone = hf.generate(**hf_tok(prompt, return_tensors="pt"), max_new_tokens=8, do_sample=False)
        assert hf_tok.decode(row, skip_special_tokens=True) == hf_tok.decode(alone[0], skip_special_tokens=True)
    with torch.no_grad():  # and the logits of the real tokens are those of the row alone
        padded = hf(**batch).logits[0, -2:]
        alone = hf(**hf_tok(prompts[0], return_tensors="pt")).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-4)


def test_exported_modeling_file_trains_and_saves(exports: dict[str, Path], tmp_path: Path) -> None:
    """labels give lmsprint's loss, and save_pretrained writes the modeling file along (for a model hub)."""
    hf = _load(exports["fast"])
    idx = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = hf(idx).logits
        loss = hf(idx, labels=idx).loss
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
    torch.testing.assert_close(loss, expected)
    hf.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / MODELING_FILE).exists()
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "saved")(idx).logits, logits)


def test_exported_tokenizer_matches_lmsprint(runs: dict[str, Path], exports: dict[str, Path]) -> None:
    _, tok, _ = load_model(runs["default"])
    hf_tok = transformers.AutoTokenizer.from_pretrained(exports["default"])
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    assert hf_tok.eos_token == hf_tok.bos_token == tok.eot_token
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == tok.eot_id
    for text in ("hello world", "  spaced\n\nlines\tand tabs ", "unicode: héllo, 日本語, emoji 🎉", ""):
        ids = tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids
        assert hf_tok(text)["input_ids"] == [tok.eot_id, *ids]  # documents start with the end-of-document token
        assert hf_tok.decode(ids) == tok.decode(ids) == text
        assert hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=True) == text
    assert set(hf_tok("x")) == {"input_ids", "attention_mask"}  # no token_type_ids, which generate() refuses


def test_export_refuses_a_non_empty_output_directory(runs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(LmsprintError, match="not empty"):
        export(runs["default"], tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "x"


def test_export_executes_nothing_from_the_run_directory(runs: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """No unpickling (the optimizer state is never read) and the modeling file is the package's own copy, whatever
    the run directory holds."""
    (runs["fast"] / MODELING_FILE).write_text("raise SystemExit('run directory code executed')\n")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("export unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    try:
        out = export(runs["fast"], tmp_path / "hf")
    finally:
        (runs["fast"] / MODELING_FILE).unlink()
    package_copy = resources.files("lmsprint.export_hf").joinpath(MODELING_FILE).read_text()
    assert (out / MODELING_FILE).read_text() == package_copy


BASE = dict(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16, mlp_hidden=32)


def test_architectures() -> None:
    assert architecture(GPTConfig(**BASE)) == "llama"
    assert architecture(GPTConfig(**BASE, zero_init_proj=True, tie_embeddings=False, rope_base=500.0)) == "llama"
    assert architecture(GPTConfig(**BASE, pos_emb="learned", norm="layernorm", mlp="gelu")) == "gpt2"
    assert architecture(GPTConfig(**BASE, pos_emb="learned", norm="layernorm", mlp="gelu", rope_base=1.0)) == "gpt2"
    for options in ({"qk_norm": True}, {"logit_softcap": 30.0}, {"mlp": "relu2"}, {"norm": "layernorm"},
                    {"pos_emb": "learned"}, {"mlp": "gelu"}, {"pos_emb": "learned", "norm": "layernorm"},
                    {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": True}):
        assert architecture(GPTConfig(**BASE, **options)) == "lmsprint", options


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_shipped_recipe_exports(recipe: str) -> None:
    gpt = resolve_model_config(build_config(recipe).model, vocab_size=32768, block_size=1024)
    assert architecture(gpt) in ("llama", "gpt2", "lmsprint")


def test_an_option_the_export_does_not_implement_is_refused_by_name() -> None:
    """An architecture option added to the model later (here a made-up one) exports at its default, and is
    refused by name when set, until the modeling file implements it."""
    NewConfig = dataclasses.make_dataclass("NewConfig", [("made_up_option", bool, False)], bases=(GPTConfig,),
                                           frozen=True)
    assert architecture(NewConfig(**BASE)) == "llama"
    with pytest.raises(LmsprintError, match=r"^--model\.made_up_option=true cannot be exported yet: .*"
                                            r"train with --model\.made_up_option=false to export$"):
        architecture(NewConfig(**BASE, made_up_option=True))


def test_the_modeling_file_takes_every_exported_option() -> None:
    """Each shape field and architecture option the export writes into config.json is a parameter of
    LmsprintConfig (not swallowed by its **kwargs, where the forward pass would never see it)."""
    import importlib
    import inspect

    modeling = importlib.import_module("lmsprint.export_hf.modeling_lmsprint")
    params = inspect.signature(modeling.LmsprintConfig.__init__).parameters
    written = export_module._hf_config("lmsprint", GPTConfig(**BASE), eot_id=256)
    for name in (*export_module.SHAPE, *export_module.OPTIONS):
        name = export_module.RENAMED.get(name, name)
        assert name in params and name in written, name


def test_export_template_is_a_package_module() -> None:
    """modeling_lmsprint.py ships in the wheel because export_hf is a package that setuptools finds."""
    setuptools = pytest.importorskip("setuptools")
    src = Path(__file__).resolve().parents[1] / "src"
    assert "lmsprint.export_hf" in setuptools.find_packages(where=str(src))
    assert (src / "lmsprint" / "export_hf" / MODELING_FILE).is_file()


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


def test_cli_export_of_an_unimplemented_option_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # as if qk_norm were an option added to the model after the export
    monkeypatch.setattr(export_module, "OPTIONS", tuple(o for o in export_module.OPTIONS if o != "qk_norm"))
    run = tmp_path / "run"
    _untrained_run(run, GPTConfig(**BASE, qk_norm=True), byte_tokenizer())
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run), str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model.qk_norm=true cannot be exported yet") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(("variant", "remote"), [("gpt2", False), ("fast", True)])
def test_cli_export(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, variant: str,
                    remote: bool) -> None:
    out = ["--out", str(tmp_path / "hf")] if remote else [str(tmp_path / "hf")]  # both spellings
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(runs[variant]), *out])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "from_pretrained" in printed and ("trust_remote_code=True" in printed) == remote
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= names
    assert (MODELING_FILE in names) == remote


def test_cli_export_needs_one_output_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for extra in ([], [str(tmp_path / "a"), "--out", str(tmp_path / "b")]):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(tmp_path), *extra])
        assert exit_info.value.code == 2
        assert "lmsprint export RUN --out DIR" in capsys.readouterr().err
