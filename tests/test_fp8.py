"""The FP8 head (model/fp8.py) on a CPU: its quantisation against the float8 formats' precision, the fallback where
FP8 matmuls cannot run, and -- where torch's CPU build has ``torch._scaled_mm``, which lmsprint never uses for
training -- the custom ops' plumbing (autograd, fake tensors, torch.compile, CUDA's operand layouts) against the
pure-PyTorch reference. The FP8 numerics on a GPU are in tests/test_gpu.py."""

from __future__ import annotations

import functools

import pytest
import torch

from lmsprint.config import ModelConfig
from lmsprint.model import GPT, resolve_model_config
from lmsprint.model.fp8 import (
    AMAX_FLOOR,
    E4M3,
    E5M2,
    dequantize,
    fp8_linear,
    fp8_linear_reference,
    fp8_linear_runs,
    fp8_supported,
    quantize,
)

FORMATS = {"e4m3": (E4M3, 3, -6, -9), "e5m2": (E5M2, 2, -14, -16)}
"""name -> (dtype, mantissa bits, exponent of the smallest normal, exponent of the smallest subnormal)."""


@functools.cache
def cpu_scaled_mm_runs() -> bool:
    a = torch.zeros(16, 16, dtype=E4M3)
    try:
        torch._scaled_mm(a, a.t(), torch.tensor(1.0), torch.tensor(1.0), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


needs_cpu_scaled_mm = pytest.mark.skipif(not cpu_scaled_mm_runs(), reason="this torch has no CPU torch._scaled_mm")


def _spread(n: int = 4096, seed: int = 0) -> torch.Tensor:
    """Values over twelve orders of magnitude, both signs: normals and subnormals of both formats after scaling."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 10.0 ** torch.empty(n).uniform_(-8, 4, generator=g)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_quantize_round_trips_within_the_formats_precision(fmt: str) -> None:
    """quantize -> dequantize loses at most half a unit in the last place: a relative 2^-(mantissa+1) where the
    scaled value is normal, half the smallest subnormal step below that."""
    dtype, mantissa, min_normal, min_subnormal = FORMATS[fmt]
    t = _spread()
    q, inv = quantize(t, dtype)
    assert q.dtype == dtype and inv.dtype == torch.float32 and inv.dim() == 0
    back = dequantize(q, inv)
    scaled = t.abs() / inv
    normal = scaled >= 2.0**min_normal
    assert normal.any() and (~normal).any()
    rel = ((back - t).abs() / t.abs())[normal]
    assert rel.max() <= 2.0 ** -(mantissa + 1) * (1 + 1e-6), rel.max()
    assert ((back - t).abs()[~normal] <= 2.0 ** (min_subnormal - 1) * inv * (1 + 1e-6)).all()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("magnitude", [1e-10, 1e-4, 1.0, 3e4, 1e30])
def test_scale_maps_amax_to_the_largest_value_and_never_beyond(fmt: str, magnitude: float) -> None:
    """Whatever the tensor's magnitude (above AMAX_FLOOR), its largest element becomes the format's largest finite
    value (448 for e4m3, 57344 for e5m2): no overflow to NaN/inf, and the whole range in use."""
    dtype = FORMATS[fmt][0]
    fmax = torch.finfo(dtype).max
    t = _spread(seed=1) * magnitude / 1e4
    t[17] = -t.abs().max() * 1.5  # a negative outlier holds the amax
    q, inv = quantize(t, dtype)
    qf = q.float()
    assert qf.isfinite().all()
    assert qf.abs().max() == fmax and qf[17] == -fmax
    assert dequantize(q, inv)[17] == pytest.approx(t[17].item(), rel=2.0 ** -(FORMATS[fmt][1] + 1))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_zero_tensor_gives_zeros_not_nan(fmt: str) -> None:
    """An all-zero tensor (amax 0) quantizes to zeros with a finite scale; one below the amax floor stays finite."""
    q, inv = quantize(torch.zeros(64, 32), FORMATS[fmt][0])
    assert inv.isfinite() and (q.float() == 0).all() and (dequantize(q, inv) == 0).all()
    tiny = torch.full((16,), AMAX_FLOOR / 4)
    assert dequantize(*quantize(tiny, FORMATS[fmt][0])).isfinite().all()
    out, grad_x, grad_w = fp8_linear_reference(torch.zeros(32, 16), torch.randn(48, 16), torch.zeros(32, 48))
    for t in (out, grad_x, grad_w):
        assert (t == 0).all()


def test_fp8_is_refused_on_a_cpu_and_for_sizes_off_16() -> None:
    cpu = torch.device("cpu")
    assert fp8_supported(cpu) == "FP8 matmuls need a CUDA GPU, this is cpu"
    assert fp8_linear_runs(cpu, 768, 32768) == fp8_supported(cpu)
    assert "multiples of 16, the head is 40 -> 32768" in str(fp8_linear_runs(cpu, 40, 32768))
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_linear(torch.randn(4, 40), torch.randn(64, 40))


# ----------------------------------------------------------------------------------------------------------
# the custom ops' plumbing, on torch's CPU _scaled_mm


def _case(seed: int = 0, m: int = 40) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 64, generator=g)
    w = torch.randn(48, 64, generator=g) * 0.05
    grad = torch.randn(m, 48, generator=g)
    return x, w, grad


def _run(fn: object, x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = fn(x, w)  # type: ignore[operator]
    out.backward(grad.to(out.dtype))
    return out.detach(), x.grad, w.grad


@needs_cpu_scaled_mm
@pytest.mark.parametrize("m", [48, 40])  # 40 rows: padded to 48
def test_fp8_linear_computes_the_reference(m: int) -> None:
    """Output and both gradients equal the fake-quantised fp32 reference (the output up to its bf16 rounding);
    the gradients come back in the inputs' dtypes."""
    x, w, grad = _case(m=m)
    out, grad_x, grad_w = _run(fp8_linear, x, w, grad)
    ref_out, ref_x, ref_w = fp8_linear_reference(x, w, grad.bfloat16().float())
    assert out.dtype == torch.bfloat16 and grad_x.dtype == grad_w.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, rtol=2**-8, atol=1e-5)
    torch.testing.assert_close(grad_x, ref_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-5, atol=1e-6)
    _, bf16_x, bf16_w = _run(fp8_linear, x.bfloat16(), w.bfloat16(), grad)
    assert bf16_x.dtype == bf16_w.dtype == torch.bfloat16


@needs_cpu_scaled_mm
def test_scaled_mm_operands_follow_the_cuda_layout_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every _scaled_mm call gets what the CUDA kernel demands (the CPU one accepts any layout): a row-major first
    and a column-major second operand, sizes multiples of 16, never two e5m2 operands, fp32 scalar scales."""
    real, calls = torch._scaled_mm, []

    def checked(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                **kwargs: object) -> torch.Tensor:
        assert a.stride(1) == 1 and a.stride(0) >= a.size(1), a.stride()
        assert b.stride(0) == 1 and b.stride(1) >= b.size(0), b.stride()
        assert a.size(1) % 16 == 0 and b.size(0) % 16 == 0 and b.size(1) % 16 == 0, (a.shape, b.shape)
        assert not (a.dtype == b.dtype == E5M2)
        assert scale_a.dtype == scale_b.dtype == torch.float32 and scale_a.numel() == scale_b.numel() == 1
        calls.append((a.dtype, b.dtype))
        return real(a, b, scale_a, scale_b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    x, w, grad = _case(m=40)
    _run(fp8_linear, x.view(5, 8, 64), w, grad.view(5, 8, 48))
    assert calls == [(E4M3, E4M3), (E5M2, E4M3), (E5M2, E4M3)]


@needs_cpu_scaled_mm
def test_fp8_linear_compiles_to_one_graph_that_equals_eager() -> None:
    x, w, grad = _case()
    explained = torch._dynamo.explain(fp8_linear)(x, w)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    eager = _run(fp8_linear, x, w, grad)
    compiled = _run(torch.compile(fp8_linear, fullgraph=True), x, w, grad)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_cpu_scaled_mm
def test_custom_ops_pass_opcheck() -> None:
    """Autograd registration and fake-tensor (meta) shapes/dtypes of both ops. (opcheck's schema and AOT checks
    compare or sum the float8 outputs, which the CPU build cannot do.)"""
    x, w, grad = _case(m=48)
    utils = ("test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.lmsprint.fp8_mm.default, (x.requires_grad_(), w.requires_grad_()),
                          test_utils=utils)
    (g_f8, g_inv), (x_f8, x_inv), (w_f8, w_inv) = quantize(grad, E5M2), quantize(x, E4M3), quantize(w, E4M3)
    torch.library.opcheck(torch.ops.lmsprint.fp8_mm_backward.default,
                          (g_f8, x_f8.detach(), w_f8.detach(), g_inv, x_inv.detach(), w_inv.detach(),
                           torch.float32, torch.bfloat16), test_utils=("test_faketensor",))


@needs_cpu_scaled_mm
@pytest.mark.parametrize("tied", [False, True])
def test_model_uses_the_fp8_head_only_when_training(tied: bool) -> None:
    """set_fp8_head(True): the training loss goes through fp8_linear (close to, not equal to, the regular head's),
    every parameter gets a gradient (the tied embedding's too); evaluation and logits are the regular head's."""
    cfg = resolve_model_config(ModelConfig(n_layer=1, n_head=2, n_embd=32, tie_embeddings=tied), vocab_size=100,
                               block_size=16)
    plain, fp8 = GPT(cfg), GPT(cfg)
    plain.init_weights(0)
    fp8.load_state_dict(plain.state_dict())
    fp8.set_fp8_head(True)
    idx, tgt = torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))
    losses = []
    for model in (plain, fp8):
        loss = model(idx, tgt)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] != losses[1] and losses[1] == pytest.approx(losses[0], rel=0.02)
    for (name, p), q in zip(plain.named_parameters(), fp8.parameters()):
        assert q.grad is not None and torch.isfinite(q.grad).all(), name
        assert torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0) > 0.99, name
    for model in (plain, fp8):
        model.eval()
    with torch.no_grad():
        assert plain(idx, tgt).item() == fp8(idx, tgt).item()
        assert torch.equal(plain(idx), fp8(idx))
