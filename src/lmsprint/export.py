"""Export a trained run to a Hugging Face ``transformers`` model directory.

Every model lmsprint trains exports. Where a transformers class computes exactly what lmsprint computes, the
export uses it, with no change of maths:

- rotary positions + RMSNorm + SwiGLU  ->  ``LlamaForCausalLM`` (``tie_word_embeddings`` as trained);
- learned positions + LayerNorm + GELU ->  ``GPT2LMHeadModel`` (GPT-2 has biases everywhere: exported as zeros).

Any other combination (ReLU², QK-norm, logit soft-capping, rotary with LayerNorm, ...; the ``fast`` recipe)
exports as ``LmsprintForCausalLM``: the export directory gets ``modeling_lmsprint.py``
(``lmsprint/export_hf/``, copied from the installed package), a small transformers model that is lmsprint's
forward pass with its parameter names, registered through ``auto_map`` and loaded with
``trust_remote_code=True``.

The output directory holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32),
``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` (and ``modeling_lmsprint.py``
where needed), so that ``AutoModelForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer.from_pretrained(OUT)``
load it. Writing it needs no ``transformers``; loading it does. The export reads the checkpoint's
``meta.json``, ``model.safetensors`` and ``tokenizer.json`` (each verified against meta.json's checksums): data
only, nothing from the run directory is unpickled or executed.

The vocabulary is exported **sliced** to the tokenizer's size: lmsprint pads the embedding and head rows to a
multiple of ``vocab_multiple`` for matmul speed, but the padding ids are never produced by the tokenizer and
lmsprint's own logits leave them out, so the exported model's logits equal lmsprint's, id for id.

A new architecture option is exported by adding it to ``OPTIONS`` below and implementing it in
``export_hf/modeling_lmsprint.py`` (a field of ``LmsprintConfig`` of the same name, read by the module it
changes). Until then a model that sets it is refused with a one-line error naming the option.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmsprint.data.tokenizer import TextTokenizer
from lmsprint.errors import CheckpointError, LmsprintError
from lmsprint.model import GPTConfig
from lmsprint.training import best
from lmsprint.training import checkpoint as ckpt

NORM_EPS = 1e-5  # lmsprint's Norm default (layers.Norm): Llama's rms_norm_eps, GPT-2's layer_norm_epsilon

# What the export does with each GPTConfig field:
SHAPE = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_hidden")  # copied into config.json
# architecture options: each changes the forward pass, and modeling_lmsprint.py implements each (LmsprintConfig
# takes it by the same name, or as RENAMED)
OPTIONS = ("pos_emb", "norm", "mlp", "tie_embeddings", "qk_norm", "logit_softcap", "rope_base")
RENAMED = {"tie_embeddings": "tie_word_embeddings"}  # LmsprintConfig's names that differ from GPTConfig's
TRAINING_ONLY = ("init_std", "zero_init_proj", "vocab_multiple")  # initialisation and padding: no forward change
MODELING_FILE = "modeling_lmsprint.py"


@dataclass(frozen=True)
class Family:
    """A transformers class that computes exactly lmsprint's forward pass when the options in ``fixed`` have
    these values, those in ``free`` any value, and every other architecture option its default."""

    name: str
    fixed: dict[str, object]
    free: tuple[str, ...] = ("tie_embeddings", "rope_base")

    def matches(self, cfg: GPTConfig) -> bool:
        defaults = {f.name: f.default for f in fields(GPTConfig)}
        return all(getattr(cfg, k) == self.fixed.get(k, defaults[k]) for k in OPTIONS if k not in self.free)


FAMILIES = (
    Family("llama", {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu"}),
    Family("gpt2", {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"}),  # rope_base: unused
)


def _flag(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def architecture(cfg: GPTConfig) -> str:
    """"llama", "gpt2" or "lmsprint" (the modeling file): how the export represents ``cfg`` exactly.

    Raises:
        LmsprintError: naming an architecture option that the export does not implement (yet).
    """
    known = {*SHAPE, *OPTIONS, *TRAINING_ONLY}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in known and value != f.default:
            raise LmsprintError(f"--model.{f.name}={_flag(value)} cannot be exported yet: lmsprint's transformers "
                                f"model (lmsprint/export_hf/{MODELING_FILE}) does not implement it; train with "
                                f"--model.{f.name}={_flag(f.default)} to export")
    return next((family.name for family in FAMILIES if family.matches(cfg)), "lmsprint")


def _llama_weights(w: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    C, H = cfg.n_embd, cfg.mlp_hidden
    out = {"model.embed_tokens.weight": w["transformer.wte.weight"], "model.norm.weight": w["transformer.ln_f.weight"]}
    for i in range(cfg.n_layer):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        # c_attn rows are [q | k | v], each C = n_head x head_dim rows in head order: Llama's q/k/v_proj layout
        q, k, v = w[src + "attn.c_attn.weight"].split(C, dim=0)  # each (C, C)
        gate, up = w[src + "mlp.c_fc.weight"].split(H, dim=0)  # SwiGLU's fused c_fc is [gate | up], each (H, C)
        out.update({
            dst + "input_layernorm.weight": w[src + "ln_1.weight"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": w[src + "attn.c_proj.weight"],
            dst + "post_attention_layernorm.weight": w[src + "ln_2.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": w[src + "mlp.c_proj.weight"],
        })
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = w["lm_head.weight"]
    return out


def _gpt2_weights(w: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float32)

    C = cfg.n_embd
    out = {"transformer.wte.weight": w["transformer.wte.weight"], "transformer.wpe.weight": w["transformer.wpe.weight"],
           "transformer.ln_f.weight": w["transformer.ln_f.weight"], "transformer.ln_f.bias": zeros(C)}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        out.update({
            p + "ln_1.weight": w[p + "ln_1.weight"], p + "ln_1.bias": zeros(C),
            p + "ln_2.weight": w[p + "ln_2.weight"], p + "ln_2.bias": zeros(C),
        })
        # GPT-2's Conv1D stores (in, out): the transpose of nn.Linear's (out, in)
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            weight = w[p + name + ".weight"]
            out[p + name + ".weight"] = weight.t().contiguous()
            out[p + name + ".bias"] = zeros(weight.size(0))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = w["lm_head.weight"]
    return out


def _lmsprint_weights(w: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    # modeling_lmsprint.py has lmsprint's parameter names; a tied head is stored once, as the embedding
    return {k: v for k, v in w.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}


WEIGHTS = {"llama": _llama_weights, "gpt2": _gpt2_weights, "lmsprint": _lmsprint_weights}


def _hf_config(arch: str, cfg: GPTConfig, eot_id: int) -> dict[str, object]:
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eot_id,
              "eos_token_id": eot_id, "torch_dtype": "float32", "dtype": "float32", "initializer_range": cfg.init_std,
              "use_cache": True}
    if arch == "llama":
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
            "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head, "head_dim": cfg.head_dim,
            "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": NORM_EPS,
            # rope_theta for transformers 4.x, rope_parameters for 5.x; lmsprint's rotate-half layout is Llama's
            "rope_theta": cfg.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
            "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "pretraining_tp": 1,
        }
    if arch == "lmsprint":
        return {
            "architectures": ["LmsprintForCausalLM"], "model_type": "lmsprint", **common,
            "tokenizer_class": "PreTrainedTokenizerFast",  # for pipeline(), which cannot look a custom type up
            "auto_map": {"AutoConfig": "modeling_lmsprint.LmsprintConfig",
                         "AutoModel": "modeling_lmsprint.LmsprintModel",
                         "AutoModelForCausalLM": "modeling_lmsprint.LmsprintForCausalLM"},
            **{RENAMED.get(k, k): getattr(cfg, k) for k in (*SHAPE, *OPTIONS)}, "norm_eps": NORM_EPS,
        }
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.mlp_hidden,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "activation_function": "gelu",  # exact GELU
        "layer_norm_epsilon": NORM_EPS, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
    }


def _write_tokenizer(tok: TextTokenizer, out: Path, block_size: int) -> None:
    from tokenizers import Tokenizer, processors

    # lmsprint starts every document with the end-of-document token, so it is also the BOS that HF prepends.
    # Any other post-processor of a tokenizer passed by path was not used in training (lmsprint encodes without
    # special tokens) and is replaced; ByteLevel's (offset trimming, no ids) is kept.
    hf = Tokenizer.from_str(tok.tok.to_str())
    eot = tok.eot_token
    template = processors.TemplateProcessing(single=f"{eot} $A", pair=f"{eot} $A {eot} $B",
                                             special_tokens=[(eot, tok.eot_id)])
    keep = isinstance(hf.post_processor, processors.ByteLevel)
    hf.post_processor = processors.Sequence([hf.post_processor, template]) if keep else template
    hf.save(str(out / "tokenizer.json"))
    # padding is masked out, so any id does; lmsprint pads with the end-of-document token too
    special = {"bos_token": tok.eot_token, "eos_token": tok.eot_token, "pad_token": tok.eot_token}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": block_size,
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"]}  # no token_type_ids: generate() refuses them
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def how_to_load(out_dir: Path) -> str:
    """The transformers calls that load an export (``trust_remote_code=True`` where it has a modeling file)."""
    remote = ", trust_remote_code=True" if (out_dir / MODELING_FILE).exists() else ""
    return (f"transformers.AutoModelForCausalLM.from_pretrained({str(out_dir)!r}{remote}) and "
            f"AutoTokenizer.from_pretrained({str(out_dir)!r}{remote})")


def export(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the newest valid checkpoint of a run as a transformers model directory; returns ``out_dir``.

    Args:
        run_dir: a run directory (its newest valid checkpoint is exported) or a checkpoint directory.
        out_dir: the directory to create (must not exist, or be empty); written atomically.

    Raises:
        LmsprintError: the run or checkpoint is missing or corrupt, ``out_dir`` is not empty, or the model
            uses an architecture option that the export does not implement.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.exists():
        raise CheckpointError(f"{run_dir} does not exist; pass a run directory (runs/NAME) or a checkpoint")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LmsprintError(f"{out_dir} already exists and is not empty; choose another output directory or delete it")
    found = best.find_weights(run_dir)  # a run's best/ checkpoint when it has one
    meta = ckpt.verify(found)
    cfg = GPTConfig(**meta["model_config"])
    arch = architecture(cfg)
    tok = ckpt.checkpoint_tokenizer(found, meta)

    weights = load_file(str(found / "model.safetensors"))
    # float32, and the padding rows of the vocabulary dropped (never produced by the tokenizer)
    V = cfg.vocab_size
    weights = {k: v.float()[:V] if k in ("transformer.wte.weight", "lm_head.weight") else v.float()
               for k, v in weights.items()}
    tensors = WEIGHTS[arch](weights, cfg)
    tensors = {k: v.contiguous() for k, v in tensors.items()}

    cannot = "; choose another output directory or check its permissions and free space"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise LmsprintError(f"cannot write {out_dir} ({e.strerror or e}{where}){cannot}") from None
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)  # safetensors writes it private
        config = _hf_config(arch, cfg, tok.eot_id)
        config["lmsprint"] = {"checkpoint": found.name, "step": meta.get("step")}  # provenance
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "pad_token_id": tok.eot_id}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _write_tokenizer(tok, tmp, cfg.block_size)
        if arch == "lmsprint":  # the package's copy: nothing from the run directory is ever executed
            (tmp / MODELING_FILE).write_text(resources.files("lmsprint.export_hf").joinpath(MODELING_FILE).read_text())
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise LmsprintError(f"cannot write {out_dir} ({e.strerror or e}){cannot}") from None
        raise
    return out_dir
