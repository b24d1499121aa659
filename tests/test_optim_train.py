"""Training a tiny language model with each optimizer (through build_optimizer) lowers the loss: a stand-in
model, and lmsprint's own GPT at the ``tiny`` preset under the run's lr schedule."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmsprint.config import ModelConfig, OptimConfig, ScheduleConfig
from lmsprint.model import GPT, resolve_model_config
from lmsprint.optim import build_optimizer
from lmsprint.schedules import build_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, D = 16, 32


class TinyLM(nn.Module):
    """An embedding, one residual MLP block and an untied head, under GPT-2 names (no attention: the task is a
    bigram)."""

    def __init__(self):
        super().__init__()
        block = nn.Module()
        block.ln_1 = nn.LayerNorm(D)
        block.mlp = nn.Module()
        block.mlp.c_fc = nn.Linear(D, 4 * D)
        block.mlp.c_proj = nn.Linear(4 * D, D)
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(VOCAB, D), h=nn.ModuleList([block]),
                                              ln_f=nn.LayerNorm(D)))
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx):
        x = self.transformer.wte(idx)  # (B, T, D)
        for block in self.transformer.h:
            x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_1(x))))
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)


CONFIGS = {
    "adamw": OptimConfig(name="adamw", lr=1e-2),
    "lion": OptimConfig(name="lion", lr=2e-3, weight_decay=0.5),  # ~5x lower lr, ~5x higher decay than AdamW
    "soap": OptimConfig(name="soap", lr=1e-2),
    "ademamix": OptimConfig(name="ademamix", lr=1e-2),
    "muon": OptimConfig(name="muon", lr=0.02, embed_lr=1e-2, head_lr=1e-2, scalar_lr=1e-2),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_lm_loss_goes_down(name):
    torch.manual_seed(0)
    perm = torch.randperm(VOCAB)
    seq = [0]
    for _ in range(4 * VOCAB):
        seq.append(int(perm[seq[-1]]))
    data = torch.tensor(seq)  # a repeating cycle: every token has one successor
    model = TinyLM()
    steps = 200
    opt = build_optimizer(model.named_parameters(), CONFIGS[name], total_steps=steps)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 9, (8,), generator=gen)
        batch = torch.stack([data[s:s + 9] for s in starts])  # (8, 9)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.1 * first, f"{name}: loss {first:.3f} -> {last:.3f}"


GPT_CONFIGS = {
    "adamw": OptimConfig(name="adamw", lr=3e-3),
    "lion": OptimConfig(name="lion", lr=5e-4, weight_decay=0.5),
    "soap": OptimConfig(name="soap", lr=3e-3),
    "ademamix": OptimConfig(name="ademamix", lr=3e-3),
    "muon": OptimConfig(name="muon", lr=0.02, embed_lr=3e-3, head_lr=3e-3, scalar_lr=3e-3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", GPT_CONFIGS)
def test_tiny_gpt_loss_goes_down(name):
    """The ``tiny`` preset (tied embedding, RMSNorm gains, SwiGLU, RoPE) as the trainer builds its optimizer and
    schedule, on the cycle task above with a small vocabulary (SOAP then preconditions every side)."""
    vocab, seq_len, steps = 32, 16, 250  # "a few hundred steps"
    torch.manual_seed(0)
    perm = torch.randperm(vocab)
    seq = [0]
    for _ in range(8 * vocab):
        seq.append(int(perm[seq[-1]]))
    data = torch.tensor(seq)
    model = GPT(resolve_model_config(ModelConfig(preset="tiny"), vocab_size=vocab, block_size=seq_len))
    model.init_weights(seed=0)
    cfg = GPT_CONFIGS[name]
    opt = build_optimizer(model.named_parameters(), cfg, total_steps=steps)
    sched = build_schedule(opt, ScheduleConfig(warmup_steps=10), total_steps=steps, peak_lr=cfg.lr)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (8,), generator=gen)
        batch = torch.stack([data[s:s + seq_len + 1] for s in starts])  # (8, seq_len + 1)
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.1 * first, f"{name}: loss {first:.3f} -> {last:.3f}"
