"""The fused head and loss (model/fused_ce.py, ``--train.fused_ce``) on a CPU: loss and gradients against
``F.cross_entropy`` of the soft-capped logits, the memory claim (no (rows, vocab) tensor saved or made), under
torch.compile, in the model, and in a training run. The speed, and the numerics at fast's shape, are
tests/test_gpu.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from lmsprint.config import ModelConfig
from lmsprint.model import GPT, IGNORE_INDEX, resolve_model_config
from lmsprint.model.fused_ce import linear_softcap_cross_entropy
from lmsprint.training.metrics import read_metrics
from lmsprint.training.run import train

SHAPES = [(37, 16, 50, 8), (64, 8, 33, 64), (100, 24, 96, 1), (5, 4, 7, 1000)]
"""(rows, width, vocab, chunk rows): chunks that do not divide the rows, one row per chunk, one chunk for all."""


def reference(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, softcap: float, reduction: str = "mean"
              ) -> torch.Tensor:
    """What the unfused head computes: logits in the matmul's dtype, then fp32 (at least), soft-cap, loss."""
    logits = F.linear(x, w)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def case(n: int, c: int, v: int, dtype: torch.dtype = torch.float32, seed: int = 0, ignored: int = 5
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (n, c) and w (v, c) needing gradients, targets with every ``ignored``-th row ignored; logits of a few units,
    so that a soft-cap of 15 bends them."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g, dtype=dtype) * 2).requires_grad_()
    w = torch.randn(v, c, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::ignored] = IGNORE_INDEX
    return x, w, targets


def loss_and_grads(fn, x: torch.Tensor, w: torch.Tensor, grad: float = 0.37) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """fn()'s loss and its gradients with respect to x and w, for an incoming gradient ``grad`` (not 1: backward
    scales by it)."""
    loss = fn()
    gx, gw = torch.autograd.grad(loss, (x, w), grad_outputs=torch.tensor(grad, dtype=loss.dtype))
    return loss.detach(), gx, gw


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("softcap", [0.0, 15.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{c}@{v}/{k}" for n, c, v, k in SHAPES])
def test_loss_and_gradients_equal_cross_entropy(shape: tuple[int, int, int, int], dtype: torch.dtype,
                                                softcap: float, reduction: str) -> None:
    n, c, v, chunk = shape
    x, w, targets = case(n, c, v, dtype)
    fused = loss_and_grads(lambda: linear_softcap_cross_entropy(x, w, targets, softcap=softcap, reduction=reduction,
                                                                chunk_rows=chunk), x, w)
    ref = loss_and_grads(lambda: reference(x, w, targets, softcap, reduction), x, w)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for name, a, b in zip(("loss", "grad_x", "grad_w"), fused, ref, strict=True):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **tol, msg=name)


def test_batched_inputs_and_no_gradient_mode() -> None:
    """(B, T, C) inputs with (B, T) targets are rows; without gradients (no_grad, or inputs that need none) the
    loss is the same."""
    x, w, targets = case(24, 16, 40)
    fused = linear_softcap_cross_entropy(x.view(4, 6, 16), w, targets.view(4, 6), softcap=15.0, chunk_rows=5)
    torch.testing.assert_close(fused, reference(x, w, targets, 15.0))
    with torch.no_grad():
        assert linear_softcap_cross_entropy(x, w, targets, softcap=15.0, chunk_rows=5).item() == fused.item()
    detached = linear_softcap_cross_entropy(x.detach(), w.detach(), targets, softcap=15.0, chunk_rows=5)
    assert detached.grad_fn is None and detached.item() == fused.item()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_an_all_ignored_batch_gives_what_cross_entropy_gives(reduction: str) -> None:
    """Every target ignored: mean is nan (0 / 0) and sum is 0, and the gradients are zeros, as F.cross_entropy's."""
    x, w, targets = case(10, 8, 20, ignored=1)
    fused = loss_and_grads(lambda: linear_softcap_cross_entropy(x, w, targets, softcap=15.0, reduction=reduction,
                                                                chunk_rows=3), x, w)
    ref = loss_and_grads(lambda: reference(x, w, targets, 15.0, reduction), x, w)
    for a, b in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert fused[0].isnan().item() == (reduction == "mean")
    assert not fused[1].any() and not fused[2].any()


def test_an_ignored_row_contributes_nothing() -> None:
    """An ignored row's input gradient is zero, and changing its input changes neither the loss nor any gradient."""
    x, w, targets = case(12, 8, 20, ignored=4)
    base = loss_and_grads(lambda: linear_softcap_cross_entropy(x, w, targets, chunk_rows=5), x, w)
    x2 = x.detach().clone()
    x2[4] = 100.0
    x2.requires_grad_()
    moved = loss_and_grads(lambda: linear_softcap_cross_entropy(x2, w, targets, chunk_rows=5), x2, w)
    assert moved[0].item() == base[0].item() and torch.equal(moved[2], base[2])
    assert not base[1][::4].any() and torch.equal(moved[1], base[1])


def test_bad_arguments_are_refused() -> None:
    x, w, targets = case(4, 4, 8)
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_softcap_cross_entropy(x, w, targets, reduction="none")
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        linear_softcap_cross_entropy(x, w, targets, chunk_rows=0)
    with pytest.raises(ValueError, match="softcap must be >= 0"):
        linear_softcap_cross_entropy(x, w, targets, softcap=-1.0)
    with pytest.raises(ValueError, match="x has 4 rows but targets has 3"):
        linear_softcap_cross_entropy(x, w, targets[:3])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_under_bf16_autocast_it_is_the_unfused_bf16_head() -> None:
    """Under bf16 autocast the matmuls run in bf16, as F.linear's do: the loss is the unfused bf16 head's (the same
    bf16 logits, the rest in fp32), and so is grad_x, up to summation order, for an incoming gradient of 1 (another
    one is applied after the bf16 rounding, not before: a difference of bf16 rounding); grad_w, summed over chunks
    in fp32, differs by the rounding of each chunk's bf16 product. Both are bf16-close to fp32."""
    x, w, targets = case(300, 64, 512, seed=1, ignored=7)
    with torch.no_grad():
        w.mul_(0.3)

    def run(fn, amp: bool) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return loss_and_grads(fn, x, w, grad=1.0)

    fused = run(lambda: linear_softcap_cross_entropy(x, w, targets, softcap=15.0, chunk_rows=64), True)
    bf16 = run(lambda: reference(x, w, targets, 15.0), True)
    fp32 = run(lambda: reference(x, w, targets, 15.0), False)
    assert [t.dtype for t in fused] == [torch.float32] * 3  # the fp32 inputs' gradients in fp32
    assert _rel(bf16[0], fp32[0]) > 1e-7  # the bf16 path is not the fp32 one
    assert _rel(fused[0], bf16[0]) < 1e-6
    assert _rel(fused[1], bf16[1]) < 1e-4 and _rel(fused[2], bf16[2]) < 1e-2
    for a, b in zip(fused, fp32, strict=True):
        assert _rel(a, b) < 1e-2


def test_no_rows_by_vocab_tensor_is_saved_for_backward() -> None:
    """Saved for backward: grad_x (N, C) and grad_w (V, C) only; the unfused head saves (N, V) tensors (the check
    can fail)."""
    n, c, v = 64, 8, 96
    x, w, targets = case(n, c, v)

    def saved_shapes(fn) -> list[tuple[int, ...]]:  # noqa: ANN001
        shapes: list[tuple[int, ...]] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return shapes

    fused = saved_shapes(lambda: linear_softcap_cross_entropy(x, w, targets, softcap=15.0, chunk_rows=16))
    assert sorted(fused) == [(n, c), (v, c)]
    assert (n, v) in saved_shapes(lambda: reference(x, w, targets, 15.0))


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_no_rows_by_vocab_tensor_is_ever_made(autocast: bool) -> None:
    """Forward and backward: no operator returns a tensor larger than (chunk, V); the unfused head makes (N, V)."""
    n, c, v, chunk = 64, 8, 96, 16
    x, w, targets = case(n, c, v)
    for fn, largest in ((lambda: linear_softcap_cross_entropy(x, w, targets, softcap=15.0, chunk_rows=chunk),
                         chunk * v), (lambda: reference(x, w, targets, 15.0), n * v)):
        mode = LargestTensor()
        with mode, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            fn().backward()
        assert mode.largest == largest


@pytest.mark.slow
def test_compiled_equals_eager() -> None:
    """torch.compile(fullgraph=True) with Inductor: the chunk loop traced (no graph break) into a graph whose loss
    and gradients are eager's; under bf16 autocast too."""
    x, w, targets = case(150, 16, 96, ignored=7)

    def fused() -> torch.Tensor:
        return linear_softcap_cross_entropy(x, w, targets, softcap=15.0, chunk_rows=64)

    compiled = torch.compile(linear_softcap_cross_entropy, fullgraph=True)
    for amp in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            eager = loss_and_grads(fused, x, w)
            comp = loss_and_grads(lambda: compiled(x, w, targets, softcap=15.0, chunk_rows=64), x, w)
        tol = 1e-2 if amp else 1e-5
        for a, b in zip(comp, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _model(tied: bool, softcap: float) -> GPT:
    cfg = resolve_model_config(ModelConfig(n_layer=1, n_head=2, n_embd=32, tie_embeddings=tied,
                                           logit_softcap=softcap), vocab_size=100, block_size=16)
    assert cfg.padded_vocab > cfg.vocab_size  # the padded columns take part, as in the unfused head
    model = GPT(cfg)
    model.init_weights(0)
    return model


@pytest.mark.parametrize("softcap", [0.0, 15.0])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_model_fused_head_equals_the_regular_head_when_training(tied: bool, softcap: float) -> None:
    """set_fused_ce(True): the training loss and every parameter's gradient (the tied embedding's, which gets both
    the head's and the lookup's) are the regular head's; evaluation and logits go through the regular head."""
    plain, fused = _model(tied, softcap), _model(tied, softcap)
    fused.set_fused_ce(True)
    idx, tgt = torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))
    tgt[1, 5:] = IGNORE_INDEX
    for reduction in ("mean", "sum"):
        losses = [model(idx, tgt, reduction=reduction) for model in (plain, fused)]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for model, loss in zip((plain, fused), losses, strict=True):
        model.zero_grad()
        loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    for model in (plain, fused):
        model.eval()
    with torch.no_grad():
        assert plain(idx, tgt).item() == fused(idx, tgt).item()
        assert torch.equal(plain(idx), fused(idx))


def test_model_compiled_head_with_the_fused_loss() -> None:
    """GPT.compile_blocks (AOTAutograd, as Inductor gets it; fullgraph: the fused head compiles without a graph
    break) gives the eager fused head's loss and gradients."""
    eager, compiled = _model(False, 15.0), _model(False, 15.0)
    for model in (eager, compiled):
        model.set_fused_ce(True)
    compiled.compile_blocks(backend="aot_eager", fullgraph=True)
    idx, tgt = torch.randint(0, 100, (3, 16)), torch.randint(0, 100, (3, 16))
    losses = [model(idx, tgt) for model in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_training_with_fused_ce_follows_the_regular_head(tmp_path: Path, corpus: Path) -> None:
    """A tiny CPU run with --train.fused_ce=true (soft-capped, tied, padded vocabulary) has the losses of
    --train.fused_ce=false, step for step, to fp32 rounding."""
    runs = {}
    for fused in (False, True):
        cfg = tiny_config(corpus, train__steps=6, train__fused_ce=fused, model__logit_softcap=15.0,
                          model__tie_embeddings=True)
        result = train(cfg, run_dir=tmp_path / f"fused-{fused}")
        runs[fused] = ([r["loss"] for r in read_metrics(tmp_path / f"fused-{fused}" / "metrics.jsonl")
                        if r["kind"] == "train"], result.val_loss)
    (off, off_val), (on, on_val) = runs[False], runs[True]
    assert len(on) == 6 and on == pytest.approx(off, abs=1e-4)
    assert on_val == pytest.approx(off_val, abs=1e-4)
