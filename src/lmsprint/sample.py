"""Load a trained model from a run (or checkpoint) directory and generate text."""

from __future__ import annotations

from pathlib import Path

import torch

from lmsprint.data.tokenizer import TextTokenizer
from lmsprint.errors import CheckpointError
from lmsprint.model import GPT, GPTConfig
from lmsprint.training import best
from lmsprint.training import checkpoint as ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, TextTokenizer, Path]:
    """(model in eval mode, tokenizer, checkpoint dir) from a run directory or a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory (runs/NAME) or a checkpoint")
    found = best.find_weights(path)  # a run's best/ checkpoint when it has one
    meta, weights, _ = ckpt.load_checkpoint(found)
    tok = ckpt.checkpoint_tokenizer(found, meta)
    model = GPT(GPTConfig(**meta["model_config"]))
    ckpt.load_model_state(model, weights)
    return model.to(device).eval(), tok, found


def sample(path: str | Path, *, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int | None = 50, seed: int = 0, num_samples: int = 1, device: str = "cpu") -> list[str]:
    """Generate ``num_samples`` texts: ``prompt`` followed by its continuation (an empty prompt starts a new
    document), each cut where the model ends the document. ``<|endoftext|>`` written in the prompt is text."""
    model, tok, _ = load_model(path, device)
    prompt_ids = tok.encode(prompt)
    ids = [tok.eot_id] + prompt_ids
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    texts = []
    for row in out[:, len(ids) :].tolist():
        new = row[: row.index(tok.eot_id)] if tok.eot_id in row else row  # cut at the generated end of document
        texts.append(tok.decode(prompt_ids + new))
    return texts
