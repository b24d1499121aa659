"""FP8 matmul for the output head (``--train.fp8_head``): e4m3 forward, e5m2 gradients, dynamic per-tensor scales.

``fp8_linear(x, w)`` is ``x @ w.T`` on the FP8 tensor cores through ``torch._scaled_mm``: x and w are scaled so
their largest magnitude maps to e4m3's largest value (448) and cast to ``float8_e4m3fn``; the product comes out
in bf16. Backward, the output gradient is scaled the same way into ``float8_e5m2`` (largest 57344: fewer
mantissa bits, more range) and both gradient matmuls run in FP8 with fp32 accumulation, their results in the
dtypes of x and w. Scales are recomputed from each tensor's amax on every call (no history to keep or
checkpoint).

The two matmul steps are ``torch.library`` custom ops, opaque to ``torch.compile``; the output gradient's
quantisation sits between them in the registered backward, where the compiled backward graph fuses it with the
loss's backward. Only CUDA GPUs of compute capability 8.9 or newer run it (:func:`fp8_linear_runs` says why
not); elsewhere the model keeps its regular matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmsprint.errors import first_line

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
AMAX_FLOOR = 1e-12
"""The smallest amax a scale is computed from: an all-zero tensor gets a finite scale, not inf (and no NaN)."""
MULTIPLE = 16
"""``torch._scaled_mm`` on CUDA needs every matmul dimension to be a multiple of 16."""


def quantize(t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``t`` scaled so its largest magnitude is ``dtype``'s largest finite value, cast to ``dtype`` (a float8 type);
    returns it with the inverse scale (fp32, 0-dim), which :func:`dequantize` and ``torch._scaled_mm`` multiply by."""
    fmax = torch.finfo(dtype).max
    amax = torch.linalg.vector_norm(t, float("inf")).float()  # max |t|, without an |t| temporary in eager mode
    scale = fmax / amax.clamp(min=AMAX_FLOOR)
    # the clamp catches fp32 rounding past fmax: casting beyond it gives NaN (e4m3fn has no inf) or inf (e5m2)
    q = (t.float() * scale).clamp(-fmax, fmax).to(dtype)
    return q, scale.reciprocal()


def dequantize(q: Tensor, inv_scale: Tensor) -> Tensor:
    """The fp32 values a quantized tensor stands for."""
    return q.float() * inv_scale


@torch.library.custom_op("lmsprint::fp8_mm", mutates_args=())
def _fp8_mm(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x @ w.T in bf16, and for backward: x and w in e4m3 with their inverse scales); x (M, K), w (N, K)."""
    x_f8, x_inv = quantize(x, E4M3)
    w_f8, w_inv = quantize(w, E4M3)
    # _scaled_mm takes its first operand row-major and its second column-major (cuBLASLt's FP8 layout): w_f8.t()
    # of the row-major (N, K) w_f8 is that. Fast accumulation in the forward, as torchao's default recipe does.
    out = torch._scaled_mm(x_f8.contiguous(), w_f8.t(), x_inv, w_inv, out_dtype=torch.bfloat16, use_fast_accum=True)
    return out, x_f8, w_f8, x_inv, w_inv


@_fp8_mm.register_fake
def _(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    torch._check(x.dim() == 2 and w.dim() == 2 and x.size(1) == w.size(1), lambda: "fp8_mm: x (M, K) @ w (N, K).T")
    scalar = x.new_empty((), dtype=torch.float32)
    return (x.new_empty(x.size(0), w.size(0), dtype=torch.bfloat16), torch.empty_like(x, dtype=E4M3),
            torch.empty_like(w, dtype=E4M3), scalar, torch.empty_like(scalar))


@torch.library.custom_op("lmsprint::fp8_mm_backward", mutates_args=())
def _fp8_mm_backward(g_f8: Tensor, x_f8: Tensor, w_f8: Tensor, g_inv: Tensor, x_inv: Tensor, w_inv: Tensor,
                     x_dtype: torch.dtype, w_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """grad_x = g @ w (M, N) @ (N, K) and grad_w = g.T @ x (N, M) @ (M, K), e5m2 x e4m3, fp32 accumulation."""
    g_f8 = g_f8.contiguous()
    grad_x = torch._scaled_mm(g_f8, w_f8.t().contiguous().t(), g_inv, w_inv, out_dtype=x_dtype)
    grad_w = torch._scaled_mm(g_f8.t().contiguous(), x_f8.t().contiguous().t(), g_inv, x_inv, out_dtype=w_dtype)
    return grad_x, grad_w


@_fp8_mm_backward.register_fake
def _(g_f8: Tensor, x_f8: Tensor, w_f8: Tensor, g_inv: Tensor, x_inv: Tensor, w_inv: Tensor,
      x_dtype: torch.dtype, w_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x_f8, dtype=x_dtype), torch.empty_like(w_f8, dtype=w_dtype)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Tensor, Tensor],
                   output: tuple[Tensor, ...]) -> None:
    x, w = inputs
    _, x_f8, w_f8, x_inv, w_inv = output
    ctx.save_for_backward(x_f8, w_f8, x_inv, w_inv)
    ctx.dtypes = (x.dtype, w.dtype)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor, *_: Tensor) -> tuple[Tensor, Tensor]:
    x_f8, w_f8, x_inv, w_inv = ctx.saved_tensors
    g_f8, g_inv = quantize(grad_out, E5M2)  # traced into the compiled backward: fused with the loss's backward
    return torch.ops.lmsprint.fp8_mm_backward(g_f8, x_f8, w_f8, g_inv, x_inv, w_inv, *ctx.dtypes)


_fp8_mm.register_autograd(_backward, setup_context=_setup_context)


def fp8_linear(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` in FP8 (module docstring), in bf16: x (..., K), w (N, K) -> (..., N).

    K and N must be multiples of 16; rows are padded to one with zeros (which change no scale or gradient).
    Runs on CUDA GPUs where :func:`fp8_linear_runs` says so.
    """
    *lead, k = x.shape
    if k % MULTIPLE or w.size(0) % MULTIPLE:
        raise ValueError(f"fp8_linear needs both matrix sizes to be multiples of {MULTIPLE}, got {tuple(w.shape)}")
    x2 = x.reshape(-1, k)  # (M, K)
    m = x2.size(0)
    pad = -m % MULTIPLE
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    out = torch.ops.lmsprint.fp8_mm(x2.contiguous(), w.contiguous())[0]  # (M + pad, N)
    return (out[:m] if pad else out).view(*lead, w.size(0))


def fp8_linear_reference(x: Tensor, w: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What :func:`fp8_linear` computes, in plain fp32 (fake quantisation: to float8 and back, then fp32 matmuls):
    the output, grad_x and grad_w for output gradient ``grad_out``. x (M, K), w (N, K), grad_out (M, N)."""
    xq, wq, gq = (dequantize(*quantize(t, dt)) for t, dt in ((x, E4M3), (w, E4M3), (grad_out, E5M2)))
    return xq @ wq.T, gq @ wq, gq.T @ xq


def fp8_supported(device: torch.device) -> str | None:
    """None where FP8 matmuls run (a CUDA GPU of compute capability >= 8.9 on which a small :func:`fp8_linear`
    forward and backward succeeds); else why not, in a few words."""
    if device.type != "cuda":
        return f"FP8 matmuls need a CUDA GPU, this is {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"FP8 matmuls need compute capability 8.9 or newer (Ada, Hopper), this GPU has {major}.{minor}"
    gen = torch.Generator(device=device).manual_seed(0)  # the global RNG stream stays the run's
    x = torch.randn(32, 64, device=device, generator=gen).requires_grad_()
    w = torch.randn(48, 64, device=device, generator=gen).requires_grad_()
    try:
        fp8_linear(x, w).float().square().sum().backward()
    except RuntimeError as e:
        return first_line(e)
    if x.grad is None or w.grad is None or not (x.grad.isfinite().all() and w.grad.isfinite().all()):
        return "the FP8 probe's gradients are not finite"
    return None


def fp8_linear_runs(device: torch.device, in_features: int, out_features: int) -> str | None:
    """None where :func:`fp8_linear` runs a ``in_features -> out_features`` layer here; else why not."""
    if in_features % MULTIPLE or out_features % MULTIPLE:
        return (f"FP8 matmuls need sizes that are multiples of {MULTIPLE}, the head is {in_features} -> "
                f"{out_features}")
    return fp8_supported(device)
