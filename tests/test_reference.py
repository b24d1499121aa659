"""The external reference (nanoGPT's own train.py on enwiki2015) and the baseline recipe that reproduces it."""

import math

import pytest
import torch

from lmsprint import bench as B
from lmsprint.config import build_config
from lmsprint.model import resolve_model_config
from lmsprint.model.gpt import GPT
from lmsprint.optim import build_optimizer
from lmsprint.reference import NANOGPT, Reference, check_curve
from lmsprint.schedules import resolve_schedule


def nanogpt_lr(it: int) -> float:
    """nanoGPT train.py's get_lr with its defaults (warmup_iters=100, lr_decay_iters=1000 here), re-derived."""
    lr, warmup, decay, min_lr = 6e-4, 100, 1000, 6e-5
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def test_baseline_schedule_is_nanogpts() -> None:
    cfg = build_config("baseline", ["--train.device=cpu"])
    sched = resolve_schedule(cfg.schedule, total_steps=cfg.train.steps, peak_lr=cfg.optim.lr)
    for it in range(cfg.train.steps):
        assert cfg.optim.lr * sched(it) == pytest.approx(nanogpt_lr(it), rel=1e-12)


def test_baseline_recipe_is_nanogpts() -> None:
    """Shape, architecture, batch, optimizer, clipping and precision as nanoGPT's train.py at GPT-2 small."""
    cfg = build_config("baseline", ["--train.device=cpu"])
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    assert (m.pos_emb, m.norm, m.mlp, m.tie_embeddings, m.qk_norm, m.logit_softcap, m.zero_init_proj) == \
        ("learned", "layernorm", "gelu", True, False, 0.0, False)
    assert m.init_std == 0.02 and d.seq_len == 1024 and d.batching == "random" and not d.doc_mask
    assert t.steps == 1000 and t.batch_size * d.seq_len == 65536 and t.clip_norm == 1.0
    assert t.precision == "bf16" and t.compile
    assert (o.name, o.lr, tuple(o.betas), o.eps, o.weight_decay) == ("adamw", 6e-4, (0.9, 0.95), 1e-8, 0.1)


def test_baseline_decays_every_matrix_and_embedding_and_no_gain() -> None:
    """nanoGPT: weight decay on every parameter with dim >= 2 (the tied embedding and the positions included),
    none on the LayerNorm gains; init N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 n_layer))."""
    cfg = build_config("baseline", ["--train.device=cpu", "--model.n_layer=2", "--model.n_embd=64",
                                    "--model.n_head=2", "--data.vocab_size=512"])
    model = GPT(resolve_model_config(cfg.model, vocab_size=512, block_size=cfg.data.seq_len))
    model.init_weights(seed=0)
    opt = build_optimizer(model.named_parameters(), cfg.optim, total_steps=cfg.train.steps)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decay) == (p.ndim >= 2), name
    big = torch.cat([p.flatten() for n, p in model.named_parameters() if p.ndim >= 2 and "c_proj" not in n])
    assert big.std().item() == pytest.approx(0.02, rel=0.05)
    proj = torch.cat([p.flatten() for n, p in model.named_parameters() if "c_proj" in n])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.05)


def test_reference_time_to_target() -> None:
    assert NANOGPT.final_loss == 4.588 and NANOGPT.train_time == 120.6
    assert NANOGPT.time_to(4.588) == pytest.approx(120.6)  # its own final loss, 4.5882 rounded: at its end
    assert NANOGPT.time_to(4.6997) == pytest.approx(96.5)
    assert NANOGPT.time_to((4.6997 + 4.6534) / 2) == pytest.approx((96.5 + 108.6) / 2)
    assert NANOGPT.time_to(4.5) is None
    ref = Reference("r", 1.0, {10: (1.0, 2.0), 20: (2.0, 1.0)})
    assert ref.time_to(3.0) == 1.0  # reached at the first evaluation: no earlier point to interpolate from


def test_check_curve_bounds() -> None:
    ref = {s: loss for s, (_, loss) in NANOGPT.curve.items()}
    close = check_curve([{s: v + 0.03 for s, v in ref.items()}, {s: v - 0.01 for s, v in ref.items()}])
    assert close.passed and close.mean_diff == pytest.approx(0.01) and close.max_diff == pytest.approx(0.03)
    assert close.final_diff == pytest.approx(0.01) and "follows" in close.table()
    assert not check_curve([{s: v + 0.06 for s, v in ref.items()}]).passed  # mean off by more than 0.05
    one_off = {**ref, 500: ref[500] + 0.09}  # one point off by more than 0.08
    assert not check_curve([one_off]).passed
    early = {**ref, 100: ref[100] + 1.0, 200: ref[200] + 1.0}  # before step 300: not judged
    assert check_curve([early]).passed
    with pytest.raises(ValueError, match="lack"):
        check_curve([{100: 6.5}])


def test_bench_table_speedups_against_baseline_and_reference() -> None:
    def run(name: str, seed: int, losses: list[tuple[float, float]], total: float) -> B.BenchRun:
        val = [{"step": i, "tokens": i * 10, "time": t, "loss": v} for i, (t, v) in enumerate(losses, 1)]
        r = B.BenchRun(name, seed, "", losses[-1][1], total, 0.0, len(losses), len(losses) * 10, 1.0, None, 1,
                       val=val)
        r.measure(4.588)
        return r

    ref = Reference("nano", 4.588, {1: (60.0, 5.0), 2: (120.0, 4.588)})
    base = [run("baseline", s, [(50.0, 5.0), (100.0, 4.5)], 100.0) for s in (0, 1)]
    fast = [run("fast", s, [(10.0, 5.0), (20.0, 4.5)], 20.0) for s in (0, 1)]
    rows = B.summarize(base + fast, 4.588)
    md = B.table(rows, 4.588, baseline="baseline", ref=ref)
    # baseline crosses 4.588 at 50 + 50 * 0.412 / 0.5 = 91.2 s, fast at 18.24 s; the reference at 120 s
    assert "| fast | 2 | 18.2 | 5.00x | 6.58x |" in md and "120.0 s to the target" in md
    # a baseline that misses the target is credited with its whole training time: a lower bound
    late = [run("baseline", s, [(50.0, 5.0), (100.0, 4.7)], 100.0) for s in (0, 1)]
    md = B.table(B.summarize(late + fast, 4.588), 4.588, baseline="baseline", ref=ref)
    assert "| fast | 2 | 18.2 | ≥ 5.48x | 6.58x |" in md
