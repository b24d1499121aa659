"""The modded-nanogpt model options: value embeddings, U-net skips, token smearing, the hashed bigram embedding
(each off by default)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

from lmsprint.config import ModelConfig  # noqa: E402
from lmsprint.errors import ConfigError, LmsprintError  # noqa: E402
from lmsprint.export import architecture  # noqa: E402
from lmsprint.model import GPT, model_shape, resolve_model_config  # noqa: E402
from lmsprint.model.layers import bigram_buckets, smear  # noqa: E402
from lmsprint.optim.param_groups import build_param_groups, check_param_groups  # noqa: E402
from lmsprint.training.metrics import read_metrics  # noqa: E402
from lmsprint.training.run import train  # noqa: E402

VOCAB = 300
LEVERS = {"value_embeds": {"value_embeds": 2}, "unet_skips": {"unet_skips": True}, "smear": {"smear": True},
          "bigram_embed": {"bigram_embed": 64},
          "all": {"value_embeds": 1, "unet_skips": True, "smear": True, "bigram_embed": 64}}
NEW_PARAMS = {"value_embeds": {"transformer.value_embed.weight", *(f"transformer.h.{i}.attn.ve_lambdas"
                                                                   for i in (0, 1, 3, 4))},
              "unet_skips": {"skip_weights"}, "smear": {"smear_gate", "smear_lambda"},
              "bigram_embed": {"transformer.bigram_embed.weight", "bigram_lambda"}}
"""The parameters each option of LEVERS adds to a 5-layer model (value_embeds=2: layers 0, 1 and 3, 4)."""


def build(n_layer: int = 5, seed: int = 0, **kw: object) -> GPT:
    mc = ModelConfig(n_layer=n_layer, n_head=2, n_embd=32, mlp="relu2", qk_norm=True, tie_embeddings=False,
                     **kw)  # type: ignore[arg-type]
    model = GPT(resolve_model_config(mc, vocab_size=VOCAB, block_size=64))
    model.init_weights(seed=seed)
    return model.eval()


def tokens(B: int = 2, T: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_off_by_default_adds_nothing() -> None:
    cfg = resolve_model_config(ModelConfig(), vocab_size=VOCAB, block_size=64)
    assert (cfg.value_embeds, cfg.unet_skips, cfg.smear, cfg.bigram_embed) == (0, False, False, 0)
    names = {n for n, _ in build().named_parameters()}
    assert not any(k in n for n in names for k in ("value_embed", "ve_lambdas", "skip_weights", "smear", "bigram"))


@pytest.mark.parametrize("lever", ["value_embeds", "unet_skips", "smear", "bigram_embed"])
def test_an_option_adds_its_parameters_and_leaves_the_others_init_as_it_was(lever: str) -> None:
    """Same seed: every parameter the model had without the option is initialised exactly as before."""
    base = dict(build(seed=3).named_parameters())
    on = dict(build(seed=3, **LEVERS[lever]).named_parameters())
    assert set(on) - set(base) == NEW_PARAMS[lever]
    for name, p in base.items():
        assert torch.equal(on[name], p), name


def test_new_scalars_start_at_their_inits() -> None:
    model = build(**LEVERS["all"])
    assert torch.equal(model.transformer.h[0].attn.ve_lambdas, torch.tensor([0.5, 0.5]))
    assert torch.equal(model.skip_weights, torch.ones(2))
    assert torch.equal(model.smear_gate, torch.zeros(12)) and torch.equal(model.smear_lambda, torch.zeros(1))
    assert torch.equal(model.bigram_lambda, torch.ones(1))
    assert torch.equal(model.transformer.bigram_embed.weight, torch.zeros(64, 32))  # zeros, as modded-nanogpt's
    table = model.transformer.value_embed.weight
    assert table.shape == (320, 32) and abs(table.std().item() - 0.02) < 0.002  # normal(0, init_std), as wte
    assert torch.equal(table, build(**LEVERS["all"]).transformer.value_embed.weight)  # seeded
    assert not torch.equal(table, build(seed=1, **LEVERS["all"]).transformer.value_embed.weight)


@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_forward_backward_gives_finite_gradients_to_every_new_parameter(lever: str) -> None:
    model = build(**LEVERS[lever]).train()
    with torch.no_grad():
        if lever in ("smear", "all"):
            model.smear_lambda.fill_(0.7)  # at its init of 0 the gate's gradient is exactly zero
        if lever in ("bigram_embed", "all"):  # at its init of zeros the bigram weight's gradient is exactly zero
            model.transformer.bigram_embed.weight.normal_(std=0.02, generator=torch.Generator().manual_seed(1))
    idx = tokens()
    loss = model(idx, idx.roll(-1, dims=1))
    assert math.isfinite(loss.item())
    loss.backward()
    new = {n: p for n, p in model.named_parameters()
           if any(k in n for k in ("value_embed", "ve_lambdas", "skip_weights", "smear", "bigram"))}
    assert new
    for name, p in new.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_parameter_roles() -> None:
    """The value- and bigram-embedding tables are embeddings (AdamW, embed_lr, decayed); the lambdas, skip weights
    and smear gate are scalars (no decay, scalar_lr, never Muon)."""
    model = build(**LEVERS["all"])
    groups = build_param_groups(model.named_parameters(), lr=0.03, weight_decay=0.1, embed_lr=0.02, scalar_lr=0.01,
                                muon=True)
    check_param_groups(model.named_parameters(), groups)
    params = dict(model.named_parameters())
    role_of = {id(p): g for g in groups for p in g["params"]}
    for name in ("transformer.value_embed.weight", "transformer.bigram_embed.weight"):
        g = role_of[id(params[name])]
        assert (g["role"], g["lr"], g["weight_decay"], g["use_muon"]) == ("embed", 0.02, 0.1, False), name
    for name in ("transformer.h.0.attn.ve_lambdas", "transformer.h.4.attn.ve_lambdas", "skip_weights", "smear_gate",
                 "smear_lambda", "bigram_lambda"):
        g = role_of[id(params[name])]
        assert (g["role"], g["lr"], g["weight_decay"], g["use_muon"]) == ("scalar", 0.01, 0.0, False), name


def test_value_and_bigram_embeddings_do_not_count_as_matmul_flops() -> None:
    off, on, bigram = build(), build(value_embeds=2), build(bigram_embed=64)
    assert on.flops_per_token(64) == off.flops_per_token(64) == bigram.flops_per_token(64)
    assert on.num_params() - off.num_params() == 320 * 2 * 32 + 4 * 2
    assert bigram.num_params() - off.num_params() == 64 * 32 + 1


@pytest.mark.parametrize(("n_layer", "k", "users"), [(5, 2, {0: 0, 1: 1, 3: 0, 4: 1}), (4, 2, {0: 0, 1: 1, 2: 0, 3: 1}),
                                                      (6, 1, {0: 0, 5: 0}), (7, 3, {0: 0, 1: 1, 2: 2, 4: 0, 5: 1,
                                                                                    6: 2})])
def test_value_embeddings_reach_the_first_and_last_k_layers(n_layer: int, k: int, users: dict[int, int]) -> None:
    """Layer i and layer n_layer-K+i get chunk i of the table's rows for the input tokens; the others none."""
    model = build(n_layer=n_layer, value_embeds=k)
    seen: dict[int, torch.Tensor | None] = {}
    for i, block in enumerate(model.transformer.h):
        block.attn.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[4]))
    idx = tokens()
    with torch.no_grad():
        model(idx)
    rows = model.transformer.value_embed.weight[idx]  # (B, T, K * C)
    assert sorted(i for i, ve in seen.items() if ve is not None) == sorted(users)
    for i, chunk in users.items():
        assert torch.equal(seen[i], rows[..., chunk * 32:(chunk + 1) * 32]), i
    assert {i for i, b in enumerate(model.transformer.h) if b.attn.ve_lambdas is not None} == set(users)


def test_value_embeddings_with_lambdas_one_and_zero_are_the_model_without() -> None:
    idx = tokens()
    model = build(value_embeds=2)
    with torch.no_grad():
        want = build()(idx)
        assert not torch.allclose(model(idx), want)
        for block in model.transformer.h:
            if block.attn.ve_lambdas is not None:
                block.attn.ve_lambdas.copy_(torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(model(idx), want, rtol=0, atol=0)


@pytest.mark.parametrize("n_layer", [2, 4, 5, 7])
def test_unet_skips_equal_the_written_out_reference(n_layer: int) -> None:
    """The outputs of the first n_layer // 2 blocks go, weighted, into the last n_layer // 2 blocks' inputs, last
    saved first; with an odd count the middle block gets none."""
    model = build(n_layer=n_layer, unet_skips=True)
    half = n_layer // 2
    with torch.no_grad():
        model.skip_weights.copy_(torch.linspace(0.3, 1.7, half))
        idx = tokens()
        x = model.transformer.wte(idx)
        saved = []
        for i, block in enumerate(model.transformer.h):
            mirror = n_layer - 1 - i  # the block whose output comes back here
            if mirror < half:
                x = x + model.skip_weights[half - 1 - mirror] * saved[mirror]
            x = block(x)
            if i < half:
                saved.append(x)
        torch.testing.assert_close(model(idx), model._logits(x)[..., :VOCAB], rtol=0, atol=0)
        model.skip_weights.zero_()
        off = build(n_layer=n_layer)
        torch.testing.assert_close(model(idx), off(idx), rtol=0, atol=0)


def test_smear_at_init_is_the_identity() -> None:
    idx = tokens()
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    with torch.no_grad():
        for kw in ({}, {"doc_ids": doc_ids}):
            torch.testing.assert_close(build(smear=True)(idx, **kw), build()(idx, **kw), rtol=0, atol=0)


def test_smear_is_the_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    x, gate, lam = torch.randn(2, 6, 16, generator=gen), torch.randn(12, generator=gen), torch.tensor([0.8])
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    want = x.clone()
    for b in range(2):
        for t in range(1, 6):
            same = bool(doc_ids[b, t] == doc_ids[b, t - 1])
            want[b, t] += lam * torch.sigmoid(x[b, t, :12] @ gate) * x[b, t - 1] * same
    torch.testing.assert_close(smear(x, gate, lam, doc_ids), want)
    assert torch.equal(smear(x, gate, lam)[1], smear(x, gate, lam, doc_ids)[1])  # one document: the same
    assert not torch.allclose(smear(x, gate, lam)[0, 3], want[0, 3])  # without ids it crosses the boundary


@torch.no_grad()
def assert_document_b_unchanged(model: GPT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row of two documents, A (9 tokens) then B (15), and the row with A's tokens changed: with document
    masking, B's logits are the same in both, A's are not. Returns (row, changed row, doc_ids)."""
    idx = tokens(B=1)
    doc_ids = torch.tensor([[0] * 9 + [1] * 15])
    pos = torch.cat((torch.arange(9), torch.arange(15)))[None]
    changed = idx.clone()
    changed[0, :9] = (changed[0, :9] + 7) % VOCAB
    a, b = model(idx, pos=pos, doc_ids=doc_ids), model(changed, pos=pos, doc_ids=doc_ids)
    torch.testing.assert_close(b[:, 9:], a[:, 9:], rtol=0, atol=1e-6)
    assert not torch.allclose(b[:, :9], a[:, :9])
    return idx, changed, doc_ids


def test_smear_does_not_cross_a_document_boundary() -> None:
    """With document masking, changing document A's tokens leaves document B's logits in the same row as they
    were; without doc_ids the first token of B sees A's last token through the smear (as attention would)."""
    model = build(smear=True)
    with torch.no_grad():
        model.smear_lambda.fill_(1.0)
        model.smear_gate.normal_(generator=torch.Generator().manual_seed(1))
        idx, changed, _ = assert_document_b_unchanged(model)
        x = model.transformer.wte(idx)
        x2 = model.transformer.wte(changed)
        assert not torch.allclose(smear(x2, model.smear_gate, model.smear_lambda)[0, 9],
                                  smear(x, model.smear_gate, model.smear_lambda)[0, 9])


def reference_buckets(row: list[int], rows: int, docs: list[int] | None = None) -> list[int]:
    """The bigram buckets of one row, written out: modded-nanogpt's (36313 * cur ^ 27191 * prev) % (rows - 1), the
    reserved last row where there is no previous token (the row's first, a document's first)."""
    out = [rows - 1]
    for t in range(1, len(row)):
        new_doc = docs is not None and docs[t] != docs[t - 1]
        out.append(rows - 1 if new_doc else (36313 * row[t] ^ 27191 * row[t - 1]) % (rows - 1))
    return out


def test_bigram_buckets_are_the_written_out_hash() -> None:
    """Python's unbounded ints as the reference, ids up to 2**31 - 1 included (int64 does not overflow), with and
    without document ids; a one-token row gets the reserved row."""
    idx = torch.tensor([[5, 9, 5, 9, 2**31 - 1, 0, 7, 7], [0, 1, 2, 3, 4, 50256, 50255, 1]])
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0]])
    for rows in (2, 3, 64, 251520):
        got = bigram_buckets(idx, rows)
        assert got.dtype == torch.int64
        assert got.tolist() == [reference_buckets(r, rows) for r in idx.tolist()]
        assert bigram_buckets(idx, rows, docs).tolist() == [reference_buckets(r, rows, d)
                                                            for r, d in zip(idx.tolist(), docs.tolist())]
    assert bigram_buckets(idx[:, :1], 64).tolist() == [[63], [63]]


def test_bigram_buckets_equal_the_records_int32_hash_on_gpt2_ids() -> None:
    """modded-nanogpt computes the hash in int32 on the flattened batch (position 0 reserved); for ids of GPT-2's
    vocabulary no product overflows, so its buckets and these are the same."""
    x = torch.randint(0, 50257, (4096,), generator=torch.Generator().manual_seed(0))
    rows = 5 * 50304
    x32 = x.to(torch.int32)
    record = torch.cat((torch.tensor([rows - 1], dtype=torch.int32),
                        torch.bitwise_xor(36313 * x32[1:], 27191 * x32[:-1]) % (rows - 1)))
    assert torch.equal(bigram_buckets(x[None], rows)[0], record.long())


def test_identical_bigrams_map_to_identical_buckets() -> None:
    """Wherever a (previous, current) pair occurs (any row, any position), it gets the same bucket; pairs of a small
    vocabulary repeat often, so this is checked thousands of times."""
    idx = torch.randint(0, 16, (8, 512), generator=torch.Generator().manual_seed(0))
    buckets = bigram_buckets(idx, 97)
    seen: dict[tuple[int, int], int] = {}
    for row, hashed in zip(idx.tolist(), buckets.tolist()):
        assert hashed[0] == 96
        for t in range(1, len(row)):
            assert seen.setdefault((row[t - 1], row[t]), hashed[t]) == hashed[t]
            assert hashed[t] < 96
    assert len(seen) == 256  # every pair occurred


def _assert_spread_like_a_random_hash(stream: torch.Tensor, rows: int) -> None:
    """The buckets of a token stream: as many in use as a uniformly random assignment of its distinct bigrams
    would fill (within 3%), and no bucket holds many more distinct bigrams than such an assignment would give."""
    buckets = bigram_buckets(stream[None], rows)[0, 1:]
    pairs = stream[:-1] * (2**32) + stream[1:]  # one int64 per (previous, current) pair
    distinct, first = torch.unique(pairs, return_inverse=True)
    bucket_of_pair = torch.zeros(len(distinct), dtype=torch.long).scatter_(0, first, buckets)
    per_bucket = torch.bincount(bucket_of_pair, minlength=rows - 1)
    n, d = rows - 1, len(distinct)
    expected_used = n * (1 - (1 - 1 / n) ** d)
    used = int((per_bucket > 0).sum())
    assert used >= 0.97 * expected_used, (used, expected_used, d)
    # a Poisson(d / n) load: its maximum over n buckets stays below mean + 8 sqrt(mean) + 8
    mean = d / n
    assert int(per_bucket.max()) <= mean + 8 * math.sqrt(mean) + 8, (int(per_bucket.max()), mean)


def test_bigram_buckets_spread_a_zipfian_token_stream() -> None:
    """200,000 tokens drawn from a Zipf law over a 32K vocabulary (as text's token frequencies fall) into
    5 x 32768 rows, the table size bench/trust.py measures on `fast`."""
    weights = 1.0 / torch.arange(1, 32769, dtype=torch.float64)
    stream = torch.multinomial(weights, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    _assert_spread_like_a_random_hash(stream, 5 * 32768)
    _assert_spread_like_a_random_hash(stream, 4099)  # a small table: many bigrams per bucket, still even


def test_bigram_buckets_spread_real_text(shared_data: Path) -> None:
    """The enwiki2015 validation text, tokenized with the 32K BPE tokenizer `fast` uses, into 5 x 32768 rows."""
    import json
    import lzma

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(shared_data / "enwiki2015" / "tokenizer-bpe32k.json"))
    with lzma.open(shared_data / "enwiki2015" / "val-00000.jsonl.xz", "rt") as f:
        docs = [json.loads(next(f))["text"] for _ in range(40)]
    stream = torch.tensor([i for enc in tok.encode_batch(docs) for i in enc.ids])
    assert len(stream) > 100_000
    _assert_spread_like_a_random_hash(stream, 5 * 32768)


def test_bigram_embedding_at_init_is_the_identity() -> None:
    """The table starts at zeros (as modded-nanogpt's): with and without document ids, the model with it computes
    exactly what the model without it does."""
    idx = tokens()
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    with torch.no_grad():
        for kw in ({}, {"doc_ids": doc_ids}):
            torch.testing.assert_close(build(bigram_embed=64)(idx, **kw), build()(idx, **kw), rtol=0, atol=0)


def test_bigram_embedding_is_added_to_the_token_embedding() -> None:
    """The first block's input is wte(idx) + lam * table[bucket], the buckets as written out above; generation
    (which recomputes over its context) runs from a one-token prompt."""
    model = build(bigram_embed=64)
    seen: list[torch.Tensor] = []
    model.transformer.h[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    idx = tokens()
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 19])
    with torch.no_grad():
        model.bigram_lambda.fill_(0.7)
        table = model.transformer.bigram_embed.weight
        table.normal_(generator=torch.Generator().manual_seed(1))
        for kw in ({}, {"doc_ids": doc_ids}):
            model(idx, **kw)
            d = kw.get("doc_ids")
            rows = torch.tensor([reference_buckets(r, 64, None if d is None else d[b].tolist())
                                 for b, r in enumerate(idx.tolist())])
            torch.testing.assert_close(seen[-1], model.transformer.wte(idx) + 0.7 * table[rows])
        assert model.generate(idx[:, :1], 4, temperature=0).shape == (2, 5)


def test_bigram_embedding_does_not_cross_a_document_boundary() -> None:
    """With document masking, changing document A's tokens leaves document B's logits in the same row as they
    were; without doc_ids the first token of B is hashed with A's last token (the rows are one stream)."""
    model = build(bigram_embed=64)
    with torch.no_grad():
        model.transformer.bigram_embed.weight.normal_(generator=torch.Generator().manual_seed(1))
    idx, changed, doc_ids = assert_document_b_unchanged(model)
    assert bigram_buckets(changed, 64, doc_ids)[0, 9] == bigram_buckets(idx, 64, doc_ids)[0, 9] == 63
    assert bigram_buckets(changed, 64)[0, 9] != bigram_buckets(idx, 64)[0, 9]


def test_compiled_blocks_equal_eager_with_two_block_graphs() -> None:
    """Blocks with and without a value embedding compile to two graphs (eager backend: Dynamo's graphs, no
    compiler), and the compiled model computes what the eager one does."""
    import torch._dynamo

    from lmsprint.training.metrics import graphs_compiled

    torch._dynamo.reset()
    eager, compiled = build(**LEVERS["all"]), build(**LEVERS["all"])
    compiled.compile_blocks(backend="eager")
    before = graphs_compiled()
    idx = tokens()
    for model in (eager, compiled):
        model(idx, idx).backward()
    block_graphs = graphs_compiled() - before - 2  # less the loss head's and the smear's
    assert block_graphs == 2
    torch.testing.assert_close(compiled(idx), eager(idx), rtol=0, atol=0)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    torch._dynamo.reset()


@pytest.mark.parametrize(("kw", "message"), [
    ({"n_layer": 3, "value_embeds": 2}, "--model.value_embeds=2 needs 4 layers (the first and the last 2 use them), "
                                        "the model has 3; lower it to --model.value_embeds=1 or add layers"),
    ({"n_layer": 1, "unet_skips": True}, "--model.unet_skips needs at least 2 layers, the model has 1"),
    ({"value_embeds": -1}, "--model.value_embeds must be >= 0 (0 = off), got -1"),
    ({"bigram_embed": -5}, "--model.bigram_embed must be 0 (off) or >= 2 (hash buckets plus the reserved row), got -5"),
    ({"bigram_embed": 1}, "--model.bigram_embed must be 0 (off) or >= 2 (hash buckets plus the reserved row), got 1"),
])
def test_impossible_options_are_one_line_config_errors(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        model_shape(ModelConfig(n_head=2, n_embd=32, **kw))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("kw", "flag"), [({"value_embeds": 1}, "--model.value_embeds=1"),
                                          ({"unet_skips": True}, "--model.unet_skips=true"),
                                          ({"smear": True}, "--model.smear=true"),
                                          ({"bigram_embed": 64}, "--model.bigram_embed=64")])
def test_export_refuses_each_option_by_name(kw: dict, flag: str) -> None:
    cfg = resolve_model_config(ModelConfig(n_layer=2, n_head=2, n_embd=32, **kw), vocab_size=VOCAB, block_size=64)
    with pytest.raises(LmsprintError) as info:
        architecture(cfg)
    assert str(info.value).startswith(f"{flag} cannot be exported yet") and "\n" not in str(info.value)


def test_training_with_every_option_learns_and_resumes_exactly(tmp_path: Path, corpus: Path) -> None:
    """A tiny CPU run with all the options (and document masking, so the smear and the bigram hash see doc_ids)
    lowers the loss; stopped at its step-8 checkpoint and resumed, it logs the same losses and ends with the same
    weights."""
    opts = dict(model__n_layer=3, model__value_embeds=1, model__unet_skips=True, model__smear=True,
                model__bigram_embed=64, data__doc_mask=True, optim__name="muon", optim__lr=0.02, train__steps=12,
                train__ckpt_every=4)
    straight = train(tiny_config(corpus, **opts), run_dir=tmp_path / "straight")
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")
              if r["kind"] == "train"}
    assert losses[12] < losses[1] - 0.5, losses
    run = tmp_path / "resumed"
    assert train(tiny_config(corpus, train__stop_at_step=8, **opts), run_dir=run).step == 8
    resumed = train(tiny_config(corpus, **opts), run_dir=run, resume=True)
    got = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}
    assert got == losses
    assert resumed.val_loss == straight.val_loss
    from lmsprint.training import checkpoint as ckpt

    final = [ckpt.load_checkpoint(ckpt.latest_valid(d / "checkpoints"))[1] for d in (tmp_path / "straight", run)]
    assert final[0].keys() == final[1].keys()
    assert {"transformer.value_embed.weight", "transformer.bigram_embed.weight"} <= final[0].keys()
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), name


def test_training_with_the_bigram_embedding_alone_learns_and_resumes_exactly(tmp_path: Path, corpus: Path) -> None:
    """The trainer's packed rows without document ids (each row one stream): the loss falls, the zero-initialised
    table is trained, and a run stopped at step 6 and resumed logs the same losses and ends with the same weights."""
    from lmsprint.training import checkpoint as ckpt

    opts = dict(model__bigram_embed=101, train__steps=12, train__ckpt_every=3, optim__lr=0.01)
    straight = train(tiny_config(corpus, **opts), run_dir=tmp_path / "straight")
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")
              if r["kind"] == "train"}
    assert losses[12] < losses[1] - 0.5, losses
    run = tmp_path / "resumed"
    train(tiny_config(corpus, train__stop_at_step=6, **opts), run_dir=run)
    resumed = train(tiny_config(corpus, **opts), run_dir=run, resume=True)
    assert {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"} == losses
    assert resumed.val_loss == straight.val_loss
    final = [ckpt.load_checkpoint(ckpt.latest_valid(d / "checkpoints"))[1] for d in (tmp_path / "straight", run)]
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), name
    table = final[0]["transformer.bigram_embed.weight"]
    assert table.shape == (101, 32) and table.abs().sum() > 0 and final[0]["bigram_lambda"].item() != 1.0


def test_cli_export_of_a_model_with_an_option_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture
                                                                  ) -> None:
    from lmsprint.cli import main
    from lmsprint.data.tokenizer import byte_tokenizer
    from lmsprint.training import checkpoint as ckpt

    cfg = resolve_model_config(ModelConfig(n_layer=2, n_head=2, n_embd=32, smear=True), vocab_size=257, block_size=16)
    model = GPT(cfg)
    model.init_weights(seed=0)
    run = tmp_path / "run"
    ckpt.save_checkpoint(run / "checkpoints", 1, model_sd=ckpt.model_state(model), state={}, model_config=cfg, keep=1)
    byte_tokenizer().save(run / "tokenizer.json")
    with pytest.raises(SystemExit) as info:
        main(["export", str(run), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --model.smear=true cannot be exported yet") and "Traceback" not in err
    assert not (tmp_path / "hf").exists()


def test_a_checkpoint_from_before_these_options_resumes(tmp_path: Path, corpus: Path) -> None:
    """meta.json written before the options existed lacks their fields: it is the model with them off."""
    import json

    from lmsprint.training import checkpoint as ckpt

    straight = train(tiny_config(corpus, train__steps=6, train__ckpt_every=3), run_dir=tmp_path / "straight")
    run = tmp_path / "run"
    train(tiny_config(corpus, train__steps=6, train__ckpt_every=3, train__stop_at_step=3), run_dir=run)
    path = ckpt.latest_valid(run / "checkpoints")
    meta = json.loads((path / "meta.json").read_text())
    for key in ("value_embeds", "unet_skips", "smear", "bigram_embed"):
        del meta["model_config"][key]
    meta["meta_sha256"] = ckpt._meta_digest(meta)
    (path / "meta.json").write_text(json.dumps(meta))
    resumed = train(tiny_config(corpus, train__steps=6, train__ckpt_every=3), run_dir=run, resume=True)
    assert resumed.step == 6 and resumed.val_loss == straight.val_loss


def test_a_checkpoint_with_an_unknown_model_field_is_refused(tmp_path: Path, corpus: Path) -> None:
    """A model_config key this version does not know (a newer lmsprint's option): the checkpoint error, not a
    TypeError from building the config."""
    import json

    from lmsprint.errors import CheckpointError
    from lmsprint.training import checkpoint as ckpt

    run = tmp_path / "run"
    train(tiny_config(corpus, train__steps=6, train__ckpt_every=3, train__stop_at_step=3), run_dir=run)
    path = ckpt.latest_valid(run / "checkpoints")
    meta = json.loads((path / "meta.json").read_text())
    meta["model_config"]["made_up_option"] = True
    meta["meta_sha256"] = ckpt._meta_digest(meta)
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        train(tiny_config(corpus, train__steps=6, train__ckpt_every=3), run_dir=run, resume=True)


def test_the_budget_planner_picks_only_sizes_deep_enough_for_the_value_embeddings(corpus: Path) -> None:
    from types import SimpleNamespace

    from lmsprint.model.presets import ladder
    from lmsprint.training.plan import Candidates

    cfg = tiny_config(corpus, train__budget="1m", model__preset="auto", model__n_layer="none", model__n_head="none",
                      model__n_embd="none", model__value_embeds=2)
    data = SimpleNamespace(val=[], tokenizer=SimpleNamespace(vocab_size=257))
    shapes = Candidates(cfg, data, torch.device("cpu"), announce=print).shapes
    assert min(s.n_layer for s in ladder()) < 4  # the ladder has sizes too shallow for 2 value embeddings
    assert shapes == [s for s in ladder() if s.n_layer >= 4]
