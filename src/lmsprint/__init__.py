"""lmsprint: train GPT-style language models fast.

The Python API mirrors the command line::

    from lmsprint import build_config, train, prepare
    cfg = build_config("tiny-cpu", ["--train.steps=200"])
    result = train(cfg)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["build_config", "prepare", "train", "__version__"]


def __getattr__(name: str) -> Any:  # imported lazily: `import lmsprint` stays cheap
    if name == "build_config":
        from lmsprint.config import build_config

        return build_config
    if name == "prepare":
        from lmsprint.data.prepare import prepare

        return prepare
    if name == "train":
        from lmsprint.training.run import train

        return train
    raise AttributeError(f"module 'lmsprint' has no attribute {name!r}")
