"""GPU-only checks of the fast path (run on the H200 by the device scripts; skipped elsewhere)."""

import pytest
import torch
import torch.nn.functional as F

from lmsprint.model.layers import document_mask, flex_available, flex_document_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not flex_available(), reason="no FlexAttention")]


def _inputs(dtype: torch.dtype, B: int = 2, H: int = 4, T: int = 512, D: int = 64) -> tuple:
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    doc = torch.zeros(B, T, dtype=torch.long, device="cuda")
    for b, cuts in enumerate(([100, 300, 301, 450], [64, 128, 256, 384])):
        for c in cuts:
            doc[b, c:] += 1
    return q, k, v, doc


def _reference(q, k, v, doc):  # noqa: ANN001, ANN202
    mask = document_mask(doc, use_flex=False)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    return out.detach(), grads


@pytest.mark.parametrize("mode", [
    "eager",
    pytest.param("compiled-inside", marks=pytest.mark.xfail(
        reason="torch 2.11 on the H200: a BlockMask built inside the compiled region gives wrong attention; "
        "lmsprint builds it outside (seen 2026-11-29)", strict=False)),
    "compiled-outside",
])
def test_flex_document_mask_matches_dense_sdpa(mode: str) -> None:
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v, doc = _inputs(torch.float32)
    ref, ref_grads = _reference(q, k, v, doc)
    if mode == "eager":
        out = flex_attention(q, k, v, block_mask=flex_document_mask(doc))
    elif mode == "compiled-inside":
        fn = torch.compile(lambda q, k, v, d: flex_attention(q, k, v, block_mask=flex_document_mask(d)))
        out = fn(q, k, v, doc)
    else:
        fn = torch.compile(lambda q, k, v, m: flex_attention(q, k, v, block_mask=m))
        out = fn(q, k, v, flex_document_mask(doc))
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=5e-2, rtol=5e-2)


def test_compiled_model_flex_equals_dense() -> None:
    """The whole compiled model with FlexAttention gives the loss and gradients of the eager dense-mask model."""
    from lmsprint.config import ModelConfig
    from lmsprint.model import GPT, resolve_model_config

    mc = ModelConfig(n_layer=2, n_head=4, n_embd=128, mlp="relu2", qk_norm=True, tie_embeddings=False,
                     logit_softcap=15.0)
    torch.manual_seed(0)
    ref = GPT(resolve_model_config(mc, vocab_size=1000, block_size=512)).cuda()
    ref.init_weights(0)
    fast = GPT(resolve_model_config(mc, vocab_size=1000, block_size=512)).cuda()
    fast.load_state_dict(ref.state_dict())
    fast.use_flex = True
    fast.compile_blocks()
    _, _, _, doc = _inputs(torch.float32)
    idx = torch.randint(0, 1000, (2, 512), device="cuda")
    tgt = torch.randint(0, 1000, (2, 512), device="cuda")
    from lmsprint.data.loader import segments

    seg, pos = segments(doc.cpu().numpy(), tuple(doc.shape), None)
    doc, pos = torch.from_numpy(seg).cuda(), torch.from_numpy(pos).cuda()
    for model in (ref, fast):
        loss = model(idx, tgt, pos=pos, doc_ids=doc)
        loss.backward()
    assert abs(ref(idx, tgt, pos=pos, doc_ids=doc).item() - fast(idx, tgt, pos=pos, doc_ids=doc).item()) < 1e-3
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-3, rtol=1e-2, msg=name)


@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient"])
def test_compiled_model_on_each_sdpa_backend(backend: str) -> None:
    """The compiled bf16 model with its attention forced onto one SDPA backend gives the loss and gradients of
    torch's own pick (where the backend runs here; written 2026-12-05, not yet run on the H200)."""
    from lmsprint.config import ModelConfig
    from lmsprint.model import GPT, resolve_model_config
    from lmsprint.model.layers import sdpa_backend_runs

    why = sdpa_backend_runs(backend, device=torch.device("cuda"), dtype=torch.bfloat16, n_head=4, head_dim=64)
    if why is not None:
        pytest.skip(f"{backend} does not run here: {why}")
    mc = ModelConfig(n_layer=2, n_head=4, n_embd=256, mlp="relu2", qk_norm=True, tie_embeddings=False,
                     logit_softcap=15.0)
    models = []
    for name in ("auto", backend):
        torch.manual_seed(0)
        m = GPT(resolve_model_config(mc, vocab_size=1000, block_size=512)).cuda()
        m.init_weights(0)
        m.set_sdpa_backend(name)
        m.compile_blocks()
        models.append(m)
    idx = torch.randint(0, 1000, (2, 512), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = [m(idx, idx) for m in models]
    for loss in losses:
        loss.backward()
    assert abs(losses[0].item() - losses[1].item()) < 2e-2
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=2e-2, rtol=5e-2, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_model_with_value_embeds_unet_and_smear_equals_eager(autocast: bool) -> None:
    """The modded-nanogpt options (value embeddings, U-net skips, smearing) compiled, with FlexAttention document
    masks, give the loss and gradients of the eager dense-mask model, in fp32 and under bf16 autocast (written
    for issue 14, not yet run on the H200)."""
    from lmsprint.config import ModelConfig
    from lmsprint.data.loader import segments
    from lmsprint.model import GPT, resolve_model_config

    mc = ModelConfig(n_layer=4, n_head=4, n_embd=128, mlp="relu2", qk_norm=True, tie_embeddings=False,
                     logit_softcap=15.0, value_embeds=1, unet_skips=True, smear=True)
    ref = GPT(resolve_model_config(mc, vocab_size=1000, block_size=512)).cuda()
    ref.init_weights(0)
    with torch.no_grad():
        ref.smear_lambda.fill_(0.5)  # smearing on (0 at init), so its compiled path is exercised
    fast = GPT(resolve_model_config(mc, vocab_size=1000, block_size=512)).cuda()
    fast.load_state_dict(ref.state_dict())
    fast.use_flex = True
    fast.compile_blocks()
    _, _, _, doc = _inputs(torch.float32)
    seg, pos = segments(doc.cpu().numpy(), tuple(doc.shape), None)
    doc, pos = torch.from_numpy(seg).cuda(), torch.from_numpy(pos).cuda()
    idx = torch.randint(0, 1000, (2, 512), device="cuda")
    tgt = torch.randint(0, 1000, (2, 512), device="cuda")
    losses = []
    for model in (ref, fast):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(idx, tgt, pos=pos, doc_ids=doc)
        loss.backward()
        losses.append(loss.item())
    tol = (2e-2, 2e-2, 5e-2) if autocast else (1e-3, 1e-3, 1e-2)
    assert abs(losses[0] - losses[1]) < tol[0]
    for (name, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=tol[1], rtol=tol[2], msg=name)
