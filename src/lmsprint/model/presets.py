"""Named model sizes. Architecture options (rope, norm, mlp, ...) come from ModelConfig, not from presets."""

from __future__ import annotations

import math
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


def ladder(min_width: int = 64, max_width: int = 1536) -> list[Preset]:
    """The sizes the budget planner picks from, smallest first: a width/depth rule through ``tiny``.

    Widths are the powers of two and 1.5 times them (64, 96, 128, 192, 256, 384, ..., about sqrt(2) apart), depth
    grows with the log of the width (round(2 log2(width / 32)) layers: 2, 3, 4, 5, 6, 7, ..., so the width/depth
    ratio rises from 32 to ~140, inside the range where Kaplan et al. 2020 found the shape to matter little), with
    heads of 32 dimensions below a width of 256 and of 64 from there on.
    """
    sizes = []
    k = 0
    while (width := 64 * 2 ** (k // 2) * (3 if k % 2 else 2) // 2) <= max_width:
        if width >= min_width:
            head = 32 if width < 256 else 64
            sizes.append(Preset(n_layer=round(2 * math.log2(width / 32)), n_head=width // head, n_embd=width))
        k += 1
    return sizes
