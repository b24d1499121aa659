"""The arithmetic of one training step and of an evaluation: forward and backward over a step's micro-batches
(gradient accumulation), gradient clipping, and the mean validation loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lmsprint import distributed as D
from lmsprint.data.loader import MicroBatch, StepBatch
from lmsprint.model import IGNORE_INDEX
from lmsprint.training.precision import autocast


def forward_backward(model: nn.Module, batch: StepBatch, *, strategy: str, amp: str, device: torch.device,
                     scaler: torch.amp.GradScaler | None, on_loss: Callable[[Tensor], Tensor]) -> Tensor:
    """Backward passes of every micro-batch of this rank; returns its share of the step's mean loss.

    Gradients are synchronised over the ranks on the last micro-batch only; ``on_loss`` may replace each
    micro-batch's loss before its backward pass (the trainer's callbacks).
    """
    world = D.world_size()
    scale = world / max(batch.n_targets, 1)  # DDP averages gradients over ranks
    total = torch.zeros((), device=device)
    n = len(batch.micro)
    for i, mb in enumerate(batch.micro):
        with D.no_grad_sync(model, strategy, enabled=i < n - 1):
            with autocast(amp, device):
                loss_sum = model(mb.inputs, mb.targets, pos=mb.pos, doc_ids=mb.doc_ids, reduction="sum")
            loss = on_loss(loss_sum.float() * scale)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total += loss.detach()
    return total / world


def clip_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, *,
                   clip_norm: float, clip_value: float) -> Tensor:
    """Clip (by norm and/or by value; 0 = off) and return the global gradient norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    if clip_value > 0:
        torch.nn.utils.clip_grad_value_(params, clip_value)
    return norm


def evaluate_loss(model: nn.Module, eval_set: Sequence[MicroBatch], *, amp: str, device: torch.device) -> float:
    """Mean loss over the fixed validation tokens (all ranks)."""
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    with torch.no_grad():
        for mb in eval_set:
            with autocast(amp, device):
                loss = model(mb.inputs, mb.targets, pos=mb.pos, doc_ids=mb.doc_ids, reduction="sum")
            total[0] += loss.double()
            total[1] += (mb.targets != IGNORE_INDEX).sum()
    D.all_reduce_sum(total)
    model.train()
    return float(total[0] / total[1].clamp(min=1))
