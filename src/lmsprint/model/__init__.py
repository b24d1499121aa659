"""The GPT model, its layers and named sizes."""

from __future__ import annotations

from dataclasses import fields

import torch

from lmsprint.config import ModelConfig
from lmsprint.errors import ConfigError
from lmsprint.model.gpt import GPT, IGNORE_INDEX
from lmsprint.model.layers import GPTConfig
from lmsprint.model.presets import PRESETS

__all__ = ["GPT", "GPTConfig", "IGNORE_INDEX", "PRESETS", "build_model", "model_shape", "resolve_model_config"]


def build_model(config: GPTConfig, *, device: torch.device, seed: int, dtype: torch.dtype | None = None) -> GPT:
    """A model with its initial weights, the same every time for a seed: built, initialised in float32
    (:meth:`GPT.init_weights`), then cast to ``dtype`` if given."""
    model = GPT(config).to(device)
    model.init_weights(seed=seed)
    if dtype is not None:
        model.to(dtype)
    return model


def model_shape(cfg: ModelConfig) -> dict[str, int]:
    """``n_layer``, ``n_head``, ``n_embd`` and ``mlp_hidden`` of a preset with its overrides (``auto``: the shape
    the budget planner wrote into n_layer, n_head and n_embd, tiny's where it wrote none).

    Raises:
        ConfigError: A shape that cannot work (checked before any data is prepared).
    """
    cfg.check()
    preset = PRESETS["tiny" if cfg.preset == "auto" else cfg.preset]
    n_layer, n_head, n_embd = cfg.n_layer or preset.n_layer, cfg.n_head or preset.n_head, cfg.n_embd or preset.n_embd
    if n_embd % n_head != 0:
        raise ConfigError(f"--model.n_embd={n_embd} is not divisible by --model.n_head={n_head}; pick a width that "
                          "is a multiple of the number of heads")
    if cfg.pos_emb == "rope" and (n_embd // n_head) % 2 != 0:
        raise ConfigError(f"rotary embeddings need an even head size, got {n_embd // n_head}; change n_head")
    if 2 * cfg.value_embeds > n_layer:
        raise ConfigError(f"--model.value_embeds={cfg.value_embeds} needs {2 * cfg.value_embeds} layers (the first "
                          f"and the last {cfg.value_embeds} use them), the model has {n_layer}; lower it to "
                          f"--model.value_embeds={n_layer // 2} or add layers with --model.n_layer")
    if cfg.unet_skips and n_layer < 2:
        raise ConfigError(f"--model.unet_skips needs at least 2 layers, the model has {n_layer}; add layers with "
                          "--model.n_layer or set --model.unet_skips=false")
    if cfg.mlp_hidden is not None:
        hidden = cfg.mlp_hidden
    elif cfg.mlp == "swiglu":
        hidden = (8 * n_embd // 3 + 63) // 64 * 64  # 8/3 d keeps the parameter count of a 4d MLP
    else:
        hidden = 4 * n_embd
    return {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "mlp_hidden": hidden}


def resolve_model_config(cfg: ModelConfig, *, vocab_size: int, block_size: int) -> GPTConfig:
    """Turn the user's ModelConfig (a preset plus overrides) into the exact shape of the model: the resolved sizes,
    then every other field of GPTConfig taken from the ModelConfig field of the same name."""
    given = {"vocab_size": vocab_size, "block_size": block_size, **model_shape(cfg)}
    same = {f.name: getattr(cfg, f.name) for f in fields(GPTConfig) if f.name not in given}
    return GPTConfig(**given, **same)
