"""The optimizers on CUDA: fused/foreach kernels against the per-tensor path and torch, Muon's bf16
Newton-Schulz, SOAP against the CPU float64 run, bf16 parameters. Skipped without a GPU."""

import copy

import pytest
import torch

from lmsprint.optim import SOAP, AdamW, AdEMAMix, Lion, Muon, MuonWithAuxAdamW

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = [(64, 48), (48, 64), (64, 48), (100,), (1,)]


def make_params(shapes, *, device="cuda", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in shapes]


def run(opt, params, steps, *, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
        opt.step()
    return [p.detach().float().cpu() for p in params]


@pytest.mark.parametrize("impl", ["for", "foreach", "fused", "auto"])
def test_adamw_cuda_matches_torch(impl):
    ours, ref = make_params(SHAPES), make_params(SHAPES)
    hp = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    out = run(AdamW(ours, impl=impl, **hp), ours, 30)
    expected = run(torch.optim.AdamW(ref, fused=True, **hp), ref, 30)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls,kw", [(Lion, dict(lr=1e-3, weight_decay=0.3)),
                                    (AdEMAMix, dict(lr=1e-2, weight_decay=0.1, alpha_warmup=10, beta3_warmup=10))])
def test_foreach_matches_for_on_cuda(cls, kw):
    outs = {}
    for impl in ("for", "foreach", "auto"):
        params = make_params(SHAPES)
        outs[impl] = run(cls(params, impl=impl, **kw), params, 20)
    for impl in ("foreach", "auto"):
        for a, b in zip(outs[impl], outs["for"]):
            torch.testing.assert_close(a, b)


# the variants whose numbers depend on the iteration's dtype (cautious decay's mask is elementwise: CPU tests)
@pytest.mark.parametrize("variants", [{}, dict(ns_coefficients="polar_express", normuon=True)],
                         ids=["plain", "polar_express+normuon"])
def test_muon_bf16_newton_schulz_on_cuda(variants):
    shapes = [s for s in SHAPES if len(s) == 2]
    outs = {}
    for impl in ("for", "foreach", "compiled"):
        params = make_params(shapes)
        opt = Muon(params, lr=0.02, weight_decay=0.1, impl=impl, **variants)  # ns_dtype None: bfloat16 on CUDA
        outs[impl] = run(opt, params, 10)
    params = make_params(shapes)
    outs["fp32"] = run(Muon(params, lr=0.02, weight_decay=0.1, impl="for", ns_dtype=torch.float32, **variants),
                       params, 10)
    init = [p.detach().cpu() for p in make_params(shapes)]
    for a, b, d, c, w in zip(outs["foreach"], outs["for"], outs["compiled"], outs["fp32"], init):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)  # bf16 batched vs one at a time
        torch.testing.assert_close(d, a, rtol=0, atol=2e-3)  # compiled iteration vs eager
        moved = (c - w).abs().max()
        assert (a - c).abs().max() < 0.1 * moved  # bf16 iteration close to the float32 one


def test_soap_cuda_matches_cpu_float64():
    shapes = [(24, 24), (16, 40), (40,)]
    gpu, cpu = make_params(shapes), make_params(shapes, device="cpu", dtype=torch.float64)
    kw = dict(lr=1e-2, precondition_frequency=3, max_precond_dim=32)
    out = run(SOAP(gpu, **kw), gpu, 10)
    ref = run(SOAP(cpu, **kw), cpu, 10)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-3)


FACTORIES = {
    "adamw-fused": lambda ps: AdamW(ps, lr=1e-2, impl="fused"),
    "adamw-foreach": lambda ps: AdamW(ps, lr=1e-2, impl="foreach"),
    "lion": lambda ps: Lion(ps, lr=1e-2),
    "soap": lambda ps: SOAP(ps, lr=1e-2),
    "ademamix": lambda ps: AdEMAMix(ps, lr=1e-2),
    "muon": lambda ps: MuonWithAuxAdamW([dict(params=[p for p in ps if p.ndim == 2], use_muon=True, lr=0.02),
                                         dict(params=[p for p in ps if p.ndim < 2], use_muon=False, lr=1e-2)]),
}


@pytest.mark.parametrize("name", FACTORIES)
def test_bf16_params_on_cuda(name):
    torch.manual_seed(0)
    target = [torch.randn(s, device="cuda") for s in [(32, 32), (32,)]]
    params = [torch.nn.Parameter(torch.zeros(s, device="cuda", dtype=torch.bfloat16)) for s in [(32, 32), (32,)]]
    opt = FACTORIES[name](params)

    def loss_fn():
        return sum(((p.float() - t) ** 2).mean() for p, t in zip(params, target))

    first = loss_fn().item()
    for _ in range(60):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.8 * first
    for p in params:
        assert p.dtype == torch.bfloat16
        assert all(v.dtype == torch.float32 for v in opt.state[p].values() if isinstance(v, torch.Tensor))
    opt2 = FACTORIES[name](params)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in params:
        for key, v in opt2.state[p].items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == torch.float32 and v.device.type == "cuda" and torch.equal(v, opt.state[p][key])
