"""The GPT model, its layers and named sizes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmsprint.model.gpt import GPT, IGNORE_INDEX
from lmsprint.model.layers import GPTConfig
from lmsprint.model.presets import PRESETS

if TYPE_CHECKING:
    from lmsprint.config import ModelConfig

__all__ = ["GPT", "GPTConfig", "IGNORE_INDEX", "PRESETS", "resolve_model_config"]


def resolve_model_config(cfg: ModelConfig, *, vocab_size: int, block_size: int) -> GPTConfig:
    """Turn the user's ModelConfig (a preset plus overrides) into the exact shape of the model."""
    from lmsprint.errors import ConfigError

    if cfg.preset not in PRESETS:
        raise ConfigError(f"--model.preset: unknown preset {cfg.preset!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[cfg.preset]
    n_layer = cfg.n_layer or preset.n_layer
    n_head = cfg.n_head or preset.n_head
    n_embd = cfg.n_embd or preset.n_embd
    if n_embd % n_head != 0:
        raise ConfigError(f"--model.n_embd={n_embd} is not divisible by --model.n_head={n_head}")
    if cfg.pos_emb == "rope" and (n_embd // n_head) % 2 != 0:
        raise ConfigError(f"rotary embeddings need an even head size, got {n_embd // n_head}; change n_head")
    if cfg.mlp_hidden is not None:
        hidden = cfg.mlp_hidden
    elif cfg.mlp == "swiglu":
        hidden = (8 * n_embd // 3 + 63) // 64 * 64  # 8/3 d keeps the parameter count of a 4d MLP
    else:
        hidden = 4 * n_embd
    return GPTConfig(
        vocab_size=vocab_size,
        block_size=block_size,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        mlp_hidden=hidden,
        pos_emb=cfg.pos_emb,
        norm=cfg.norm,
        mlp=cfg.mlp,
        tie_embeddings=cfg.tie_embeddings,
        qk_norm=cfg.qk_norm,
        logit_softcap=cfg.logit_softcap,
        rope_base=cfg.rope_base,
        init_std=cfg.init_std,
        zero_init_proj=cfg.zero_init_proj,
        vocab_multiple=cfg.vocab_multiple,
    )
