"""Fused output head and loss (``--train.fused_ce``): cross-entropy of soft-capped logits ``x @ w.T``, computed a
chunk of rows at a time, so that no (rows, vocab) tensor exists -- only (chunk, vocab) ones.

The loss and the head's gradients are computed together in the forward, chunk by chunk, as Liger-Kernel's
``FusedLinearCrossEntropy`` does: a chunk's logits come out of the matmul in its dtype (bf16 under autocast), the
soft-cap and the log-sum-exp run in fp32 (or wider), and the chunk's logit gradient -- (softmax - one-hot) times
the soft-cap's derivative 1 - tanh^2, weighted for the reduction -- goes at once into ``grad_x[chunk] = dlogits @
w`` and ``grad_w += dlogits.T @ x[chunk]`` (summed in fp32). Backward only scales the two stored gradients by
the loss's incoming gradient. What is saved for backward is ``grad_x`` (rows, width) and ``grad_w`` (vocab,
width); the unfused head saves the (rows, vocab) fp32 logits (8.6 GB at 65536 rows x 32768 columns).

The chunk loop is plain PyTorch inside a ``torch.autograd.Function`` that ``torch.compile`` traces (the model's
compiled loss head, ``GPT.compile_blocks``): the loop is unrolled into one graph, so Inductor fuses each chunk's
soft-cap, log-sum-exp and gradient into a few kernels. The loop's length comes from the number of rows, so a
compiled head is specialised to its rows per micro-batch (one graph per distinct micro-batch shape).
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ROWS = 8192
"""Rows per chunk: the transient logits are (CHUNK_ROWS, vocab), 0.5 GiB in bf16 at a 32K vocabulary, and the
124M model's 64 x 1024-token micro-batch is eight chunks."""
REDUCTIONS = ("mean", "sum")


def linear_softcap_cross_entropy(x: Tensor, w: Tensor, targets: Tensor, *, softcap: float = 0.0,
                                 ignore_index: int = -100, reduction: str = "mean",
                                 chunk_rows: int = CHUNK_ROWS) -> Tensor:
    """``F.cross_entropy(softcap(x @ w.T), targets)`` without materialising the logits (module docstring).

    Args:
        x: (..., C) inputs of the head (the final norm's output).
        w: (V, C) head weight (every row a class: a padded vocabulary's extra rows take part in the softmax).
        targets: (...) class ids; ``ignore_index`` marks rows that contribute nothing.
        softcap: logits become ``softcap * tanh(logits / softcap)``; 0 = off.
        ignore_index: the target value of ignored rows.
        reduction: "mean" over the non-ignored rows (nan if there are none, as ``F.cross_entropy``) or "sum".
        chunk_rows: rows per chunk.

    Returns:
        The loss, a scalar in fp32 (fp64 for fp64 inputs). Under autocast the matmuls run in autocast's dtype, as
        ``F.linear`` would.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 = off), got {softcap}")
    x2 = x.reshape(-1, x.size(-1))  # (N, C)
    t = targets.reshape(-1)  # (N,)
    if x2.size(0) != t.size(0):
        raise ValueError(f"x has {x2.size(0)} rows but targets has {t.size(0)}")
    args = (softcap, ignore_index, reduction, chunk_rows, _matmul_dtype(x, w))
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _LinearSoftcapCE.apply(x2, w, t, *args)
    return _chunked(x2, w, t, *args, grads=False)[0]


def _matmul_dtype(x: Tensor, w: Tensor) -> torch.dtype:
    """The dtype ``F.linear(x, w)`` computes in here: autocast's where it is on (fp64 is left alone by it)."""
    dtype = torch.promote_types(x.dtype, w.dtype)
    if torch.is_autocast_enabled(x.device.type) and dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return dtype


def _chunked(x: Tensor, w: Tensor, targets: Tensor, softcap: float, ignore_index: int, reduction: str,
             chunk_rows: int, dtype: torch.dtype, *, grads: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The loss and, with ``grads``, its gradients with respect to x (N, C) and w (V, C), a chunk of rows at a time."""
    acc = torch.promote_types(dtype, torch.float32)  # soft-cap, log-sum-exp and grad_w sums: fp32 at least
    with torch.autocast(x.device.type, enabled=False):  # the casts are explicit: dtype for matmuls, acc for the rest
        xc, wc = x.to(dtype), w.to(dtype)
        valid = targets != ignore_index  # (N,)
        n_valid = valid.sum()
        # d loss / d (row's loss): 1 (sum) or 1 / n_valid (mean), 0 for an ignored row; an all-ignored batch gets
        # zero gradients (and a nan mean loss), as F.cross_entropy gives
        row_weight = valid.to(acc) / n_valid.clamp(min=1) if reduction == "mean" else valid.to(acc)
        safe_targets = torch.where(valid, targets, 0)  # ignored rows gather column 0, then are masked out
        loss_sum = torch.zeros((), dtype=acc, device=x.device)
        grad_x_chunks: list[Tensor] = []
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if grads else None
        columns = torch.arange(w.size(0), device=x.device)  # (V,)
        for start in range(0, max(x.size(0), 1), chunk_rows):  # no rows: one empty chunk (torch.cat needs one)
            rows = slice(start, start + chunk_rows)
            z = (xc[rows] @ wc.T).to(acc)  # (n, V): the logits, rounded to the matmul's dtype as F.linear's are
            if softcap > 0:
                tanh = torch.tanh(z / softcap)
                z = softcap * tanh
            lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
            target_z = z.gather(1, safe_targets[rows, None])  # (n, 1)
            loss_sum = loss_sum + torch.where(valid[rows, None], lse - target_z, 0).sum()
            if not grads:
                continue
            # d loss / d z = (softmax - one-hot) * row weight; through the soft-cap: * (1 - tanh^2)
            p = torch.exp(z - lse)  # softmax
            dz = torch.where(columns == safe_targets[rows, None], p - 1, p) * row_weight[rows, None]
            if softcap > 0:
                dz = dz * (1 - tanh * tanh)
            dlogits = dz.to(dtype)  # (n, V), as the unfused backward hands the matmul's backward
            grad_x_chunks.append((dlogits @ wc).to(x.dtype))  # (n, C)
            grad_w.add_(dlogits.T @ xc[rows])  # (V, C), summed over chunks in acc
    loss = loss_sum / n_valid if reduction == "mean" else loss_sum
    if not grads:
        return loss, None, None
    return loss, torch.cat(grad_x_chunks), grad_w.to(w.dtype)


class _LinearSoftcapCE(torch.autograd.Function):
    """Gradients computed in the forward (:func:`_chunked`), saved, and scaled by the loss's gradient in backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, w: Tensor, targets: Tensor, softcap: float,
                ignore_index: int, reduction: str, chunk_rows: int, dtype: torch.dtype) -> Tensor:
        loss, grad_x, grad_w = _chunked(x, w, targets, softcap, ignore_index, reduction, chunk_rows, dtype,
                                        grads=True)
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None, None, None, None
