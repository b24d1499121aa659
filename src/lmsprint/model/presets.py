"""Named model sizes. Architecture options (rope, norm, mlp, ...) come from ModelConfig, not from presets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_head: int
    n_embd: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(n_layer=4, n_head=4, n_embd=128),  # ~1.4M params with a 4K vocabulary: CPU-sized
    "small": Preset(n_layer=6, n_head=8, n_embd=512),  # ~36M params with a 32K vocabulary
    "gpt2-124m": Preset(n_layer=12, n_head=12, n_embd=768),  # GPT-2 small shape
    "gpt2-350m": Preset(n_layer=24, n_head=16, n_embd=1024),  # GPT-2 medium shape
}
