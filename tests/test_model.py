import math

import pytest
import torch

from lmsprint.config import ModelConfig
from lmsprint.errors import ConfigError
from lmsprint.model import GPT, IGNORE_INDEX, PRESETS, resolve_model_config
from lmsprint.model.layers import document_mask, flex_available


def build(vocab: int = 300, block: int = 64, **kw: object) -> GPT:
    mc = ModelConfig(n_layer=2, n_head=2, n_embd=32, **kw)  # type: ignore[arg-type]
    model = GPT(resolve_model_config(mc, vocab_size=vocab, block_size=block))
    model.init_weights(seed=0)
    return model.eval()


ARCHS = [
    {},
    {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"},
    {"mlp": "relu2", "qk_norm": True, "tie_embeddings": False, "logit_softcap": 15.0},
]


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shapes_and_padded_vocab(arch: dict) -> None:
    model = build(**arch)
    assert model.transformer.wte.weight.shape[0] == 320  # 300 padded to a multiple of 64
    idx = torch.randint(0, 300, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, 300)
    loss = model(idx, idx)
    assert loss.ndim == 0 and math.isfinite(loss.item())


@pytest.mark.parametrize("arch", ARCHS)
def test_causality(arch: dict) -> None:
    """Changing a future token never changes earlier logits."""
    model = build(**arch)
    idx = torch.randint(0, 300, (2, 24))
    base = model(idx)
    for t in (5, 12, 23):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 300
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-5)
        assert not torch.allclose(out[:, t], base[:, t])


def test_initial_loss_is_near_uniform() -> None:
    model = build()
    idx, tgt = torch.randint(0, 300, (4, 32)), torch.randint(0, 300, (4, 32))
    assert abs(model(idx, tgt).item() - math.log(320)) < 0.3


def test_ignored_targets_do_not_count() -> None:
    model = build()
    idx = torch.randint(0, 300, (2, 16))
    tgt = idx.clone()
    tgt[:, 8:] = IGNORE_INDEX
    full = model(idx[:, :8], idx[:, :8], reduction="sum")
    part = model(idx, tgt, reduction="sum")  # causal: the first 8 positions see the same context
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)


def test_document_mask_isolates_documents_and_restarts_positions() -> None:
    """With doc ids and restarted positions, a document's logits are those of the document alone."""
    model = build()
    a, b = torch.randint(0, 300, (1, 10)), torch.randint(0, 300, (1, 14))
    row = torch.cat([a, b], dim=1)
    doc = torch.tensor([[0] * 10 + [1] * 14])
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
    packed = model(row, doc_ids=doc, pos=pos)
    torch.testing.assert_close(packed[:, :10], model(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 10:], model(b), atol=1e-5, rtol=1e-5)
    # changing document a never changes document b's logits
    other = row.clone()
    other[:, :10] = torch.randint(0, 300, (1, 10))
    torch.testing.assert_close(model(other, doc_ids=doc, pos=pos)[:, 10:], packed[:, 10:], atol=1e-6, rtol=0)


@pytest.mark.skipif(not flex_available(), reason="FlexAttention not in this torch")
def test_flex_mask_equals_dense_mask() -> None:
    model = build(block=128)
    idx = torch.randint(0, 300, (2, 128))
    doc = torch.cat([torch.zeros(2, 50), torch.ones(2, 78)], dim=1).long()
    pos = torch.cat([torch.arange(50), torch.arange(78)]).expand(2, -1)
    with torch.no_grad():
        dense = model(idx, doc_ids=doc, pos=pos)
    model.use_flex = True
    try:
        with torch.no_grad():  # eager FlexAttention on CPU has no backward; compiled and CUDA paths do
            flex = model(idx, doc_ids=doc, pos=pos)
    except Exception as e:  # eager FlexAttention on CPU is not in every build
        pytest.skip(f"FlexAttention does not run eagerly on this CPU build: {e}")
    torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-4)


def test_dense_document_mask_shape() -> None:
    doc = torch.tensor([[0, 0, 1, 1]])
    mask = document_mask(doc, use_flex=False)
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


def test_init_is_seeded_and_scaled() -> None:
    m1, m2 = build(), build()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    proj = m1.transformer.h[0].attn.c_proj.weight
    assert abs(proj.std().item() - 0.02 / math.sqrt(4)) < 0.004
    assert torch.all(build(zero_init_proj=True).transformer.h[0].mlp.c_proj.weight == 0)


def test_tied_embeddings_share_storage() -> None:
    model = build()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert build(tie_embeddings=False).lm_head.weight is not build(tie_embeddings=False).transformer.wte.weight


def test_presets_and_flops() -> None:
    assert set(PRESETS) >= {"tiny", "small", "gpt2-124m", "gpt2-350m"}
    cfg = resolve_model_config(ModelConfig(preset="gpt2-124m", pos_emb="learned", mlp="gelu"), vocab_size=50257,
                               block_size=1024)
    model = GPT(cfg)
    # GPT-2 small: 124M parameters with the 50304-padded vocabulary and learned positions
    assert 123e6 < model.num_params() < 126e6
    n = model.num_params(matmul_only=True)
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024
    tiny = GPT(resolve_model_config(ModelConfig(), vocab_size=4096, block_size=256))
    assert 1e6 < tiny.num_params() < 3e6


def test_bad_shapes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="n_embd=30 is not divisible"):
        resolve_model_config(ModelConfig(n_embd=30, n_head=4), vocab_size=10, block_size=8)
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_model_config(ModelConfig(preset="huge"), vocab_size=10, block_size=8)


def test_sequence_longer_than_positions() -> None:
    with pytest.raises(ValueError, match="longer than the model's 64 positions"):
        build()(torch.zeros(1, 65, dtype=torch.long))


def test_generate_appends_tokens() -> None:
    model = build()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 8)
    greedy = model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0)
    assert torch.equal(greedy, model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0))


@pytest.mark.skipif(not flex_available(), reason="FlexAttention not in this torch")
@pytest.mark.parametrize("cuts", [[0, 128], [0, 64, 200, 256], [0, 1, 2, 130, 131, 255], [0, 30, 90, 128, 250]])
def test_block_statistics_mask_equals_reference_mask(cuts: list[int]) -> None:
    """The BlockMask built from block statistics marks exactly the blocks create_block_mask marks, and gives
    the same attention output as the dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from lmsprint.model.layers import flex_document_mask

    T = 256
    ids = torch.zeros(T, dtype=torch.long)
    for c in cuts[1:]:
        ids[c:] += 1
    doc = torch.stack([ids, torch.arange(T) // 100])  # two rows with different layouts

    def mask_mod(b, h, q, kv):  # noqa: ANN001, ANN202
        return (q >= kv) & (doc[b, q] == doc[b, kv])

    ref = create_block_mask(mask_mod, 2, None, T, T, device="cpu")
    ours = flex_document_mask(doc)
    assert torch.equal(ours.to_dense(), ref.to_dense())
    q, k, v = (torch.randn(2, 2, T, 16) for _ in range(3))
    dense = document_mask(doc, use_flex=False)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=ours), expected, atol=1e-5, rtol=1e-5)


def test_rotary_tables_stay_fp32_when_the_model_is_cast_to_bf16() -> None:
    """--train.precision=bf16-pure casts the model: rounding cos/sin to bf16 would shift every rotation."""
    model = GPT(resolve_model_config(ModelConfig(n_layer=1, n_head=2, n_embd=32), vocab_size=64, block_size=512))
    rotary = next(m for m in model.modules() if type(m).__name__ == "Rotary")
    cos, sin = rotary.cos.clone(), rotary.sin.clone()
    model.to(torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert rotary.cos.dtype == rotary.sin.dtype == torch.float32
    assert torch.equal(rotary.cos, cos) and torch.equal(rotary.sin, sin)
    x = torch.randint(0, 64, (2, 16))
    assert torch.isfinite(model(x, x)).all()


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_sdpa_backends_give_the_same_model(backend: str) -> None:
    """A model whose attention runs on a named SDPA backend computes what torch's own pick computes: logits,
    loss and gradients, with and without document masks (the backends this CPU has: math, flash)."""
    from lmsprint.model.layers import sdpa_backend_runs

    assert sdpa_backend_runs(backend, device=torch.device("cpu"), dtype=torch.float32, n_head=2, head_dim=16) is None
    idx = torch.randint(0, 300, (2, 24))
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    ref, named = build(mlp="relu2", qk_norm=True), build(mlp="relu2", qk_norm=True)
    named.set_sdpa_backend(backend)
    assert {b.attn.sdpa_backend for b in named.transformer.h} == {backend}
    for doc_ids in (None, docs):
        torch.testing.assert_close(named(idx, doc_ids=doc_ids), ref(idx, doc_ids=doc_ids), rtol=1e-4, atol=1e-5)
    for m in (ref, named):
        m.zero_grad()
        m(idx, idx).backward()
    for (name, a), b in zip(ref.named_parameters(), named.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sdpa_backend_that_cannot_run_here_is_reported() -> None:
    """cuDNN and memory-efficient attention do not run on a CPU: the probe says why instead of raising."""
    from lmsprint.model.layers import sdpa_backend_runs

    for backend in ("cudnn", "efficient"):
        why = sdpa_backend_runs(backend, device=torch.device("cpu"), dtype=torch.float32, n_head=2, head_dim=16)
        assert why and "\n" not in why
    assert sdpa_backend_runs("auto", device=torch.device("cpu"), dtype=torch.float32, n_head=2, head_dim=16) is None
