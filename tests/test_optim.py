"""Optimizer maths: each update rule against torch or a reference re-derived here from the paper's pseudocode,
every kernel path against the per-tensor one, state_dict round trips, bf16 parameters, grad None, LR schedulers.

The references below are written from the papers' algorithms on purpose: they import nothing from
``lmsprint.optim`` beyond the class under test.
"""

import copy
import io
import math

import pytest
import torch
from torch.optim.lr_scheduler import CyclicLR, LambdaLR, OneCycleLR

from lmsprint.optim import SOAP, AdamW, AdEMAMix, Lion, Muon, MuonWithAuxAdamW

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(7, 5), (3, 11), (13,), (4, 4), (1,)]


def make_params(shapes, *, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def grad_sequence(shapes, steps, *, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(steps)]


def run(opt, params, grads):
    """Feed a fixed gradient sequence (independent of the weights, so references see the same inputs)."""
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone().to(p.dtype)
        opt.step()
    return [p.detach().clone() for p in params]


# ----------------------------------------------------------------------------------------------------------
# AdamW: torch.optim.AdamW is the reference


@pytest.mark.parametrize("impl", ["for", "foreach", "fused"])
def test_adamw_matches_torch(impl):
    torch_kw = {"for": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[impl]
    grads = grad_sequence(SHAPES, 50)
    hp = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours, ref = make_params(SHAPES), make_params(SHAPES)
    # two groups with different hyperparameters, as the trainer builds them
    opt = AdamW([{"params": ours[:3]}, {"params": ours[3:], "lr": 1e-2, "weight_decay": 0.0}], impl=impl, **hp)
    ref_opt = torch.optim.AdamW([{"params": ref[:3]}, {"params": ref[3:], "lr": 1e-2, "weight_decay": 0.0}],
                                **hp, **torch_kw)
    for a, b in zip(run(opt, ours, grads), run(ref_opt, ref, grads)):
        torch.testing.assert_close(a, b)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"])
        assert opt.state[p]["step"] == 50


def test_adamw_paths_agree_and_auto():
    grads = grad_sequence(SHAPES, 20)
    results = {}
    for impl in ("for", "foreach", "fused", "auto"):
        params = make_params(SHAPES)
        results[impl] = run(AdamW(params, lr=1e-2, weight_decay=0.1, impl=impl), params, grads)
    for impl in ("foreach", "fused", "auto"):
        for a, b in zip(results[impl], results["for"]):
            torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------------
# Lion (Chen et al. 2023, Program 1)


def lion_reference(w, grads, *, lr, beta1, beta2, wd):
    m = torch.zeros_like(w)
    for g in grads:
        c = beta1 * m + (1 - beta1) * g
        w = w - lr * (torch.sign(c) + wd * w)
        m = beta2 * m + (1 - beta2) * g
    return w


@pytest.mark.parametrize("impl", ["for", "foreach"])
def test_lion_matches_paper(impl):
    shapes, hp = [(6, 4), (5,)], dict(lr=1e-2, beta1=0.9, beta2=0.99, wd=0.3)
    params = make_params(shapes, dtype=torch.float64)
    init = [p.detach().clone() for p in params]
    grads = grad_sequence(shapes, 12, dtype=torch.float64)
    opt = Lion(params, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), weight_decay=hp["wd"], impl=impl)
    out = run(opt, params, grads)
    for i, w in enumerate(init):
        torch.testing.assert_close(out[i], lion_reference(w, [g[i] for g in grads], **hp))


def test_lion_paths_agree():
    grads = grad_sequence(SHAPES, 15)
    outs = []
    for impl in ("for", "foreach", "auto"):
        params = make_params(SHAPES)
        outs.append(run(Lion(params, lr=1e-3, weight_decay=0.5, impl=impl), params, grads))
    for other in outs[1:]:
        for a, b in zip(other, outs[0]):
            torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------------
# AdEMAMix (Pagliardini et al. 2024, Algorithm 1)


def ademamix_reference(w, grads, *, lr, betas, alpha, eps, wd, t_alpha, t_beta3):
    b1, b2, b3_final = betas
    m1, m2, nu = torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        a = min(t * alpha / t_alpha, alpha) if t_alpha else alpha
        if t_beta3:
            b3 = min(math.exp(math.log(b1) * math.log(b3_final)
                              / ((1 - t / t_beta3) * math.log(b3_final) + t / t_beta3 * math.log(b1))), b3_final)
        else:
            b3 = b3_final
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b3 * m2 + (1 - b3) * g
        nu = b2 * nu + (1 - b2) * g * g
        m1_hat, nu_hat = m1 / (1 - b1**t), nu / (1 - b2**t)
        w = w - lr * ((m1_hat + a * m2) / (nu_hat.sqrt() + eps) + wd * w)
    return w


@pytest.mark.parametrize("impl", ["for", "foreach"])
@pytest.mark.parametrize("warmup", [None, 5])
def test_ademamix_matches_paper(impl, warmup):
    shapes = [(5, 3), (4,)]
    hp = dict(lr=1e-2, betas=(0.9, 0.999, 0.9999), alpha=5.0, eps=1e-8, wd=0.1)
    params = make_params(shapes, dtype=torch.float64)
    init = [p.detach().clone() for p in params]
    grads = grad_sequence(shapes, 9, dtype=torch.float64)
    opt = AdEMAMix(params, lr=hp["lr"], betas=hp["betas"], alpha=hp["alpha"], eps=hp["eps"], weight_decay=hp["wd"],
                   alpha_warmup=warmup, beta3_warmup=warmup, impl=impl)
    out = run(opt, params, grads)
    for i, w in enumerate(init):
        ref = ademamix_reference(w, [g[i] for g in grads], t_alpha=warmup, t_beta3=warmup, **hp)
        torch.testing.assert_close(out[i], ref)


def test_ademamix_paths_agree():
    grads = grad_sequence(SHAPES, 15)
    outs = []
    for impl in ("for", "foreach", "auto"):
        params = make_params(SHAPES)
        opt = AdEMAMix(params, lr=1e-2, weight_decay=0.1, alpha_warmup=10, beta3_warmup=10, impl=impl)
        outs.append(run(opt, params, grads))
    for other in outs[1:]:
        for a, b in zip(other, outs[0]):
            torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------------
# Muon (Jordan et al. 2024: the blog post's pseudocode and github.com/KellerJordan/Muon)


# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932): the coefficients modded-nanogpt uses, from
# the paper's reference code (github.com/NoahAmsel/PolarExpress, polar_express.py) with l=1e-3, 5 iterations,
# safety factor 1 + 2e-2, cushion 0.02; the input is divided by 1.02 ||G||_F
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
JORDAN = [(3.4445, -4.7750, 2.0315)] * 5


def optimal_quintic(lo, hi):
    """The odd quintic closest to 1 on [lo, hi] in max norm (Remez exchange; Algorithm 1 of the paper)."""
    if lo / hi >= 1 - 5e-6:
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    q, r = (3 * lo + 1) / 4, (lo + 3) / 4
    err, old = math.inf, None
    while old is None or abs(old - err) > 1e-15:
        old = err
        pts = torch.tensor([lo, q, r, hi], dtype=torch.float64)
        lhs = torch.stack([pts, pts**3, pts**5, torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)], 1)
        a, b, c, err = torch.linalg.solve(lhs, torch.ones(4, dtype=torch.float64)).tolist()
        disc = math.sqrt(9 * b**2 - 20 * a * c)
        q, r = math.sqrt((-3 * b - disc) / (10 * c)), math.sqrt((-3 * b + disc) / (10 * c))
    return a, b, c


def optimal_composition(lo, iters, safety, cushion):
    """The paper's greedy composition: each quintic optimal for where the previous ones left [lo, hi]; a cushioned
    one recentred around 1; all but the last shrunk by the safety factor."""
    hi, out = 1.0, []
    for i in range(iters):
        a, b, c = optimal_quintic(max(lo, cushion * hi), hi)
        if cushion * hi > lo:
            at_lo, at_hi = a * lo + b * lo**3 + c * lo**5, a * hi + b * hi**3 + c * hi**5
            a, b, c = (x * 2 / (at_lo + at_hi) for x in (a, b, c))
        if i < iters - 1:
            a, b, c = a / safety, b / safety**3, c / safety**5
        out.append((a, b, c))
        lo = a * lo + b * lo**3 + c * lo**5
        hi = 2 - lo
    return out


def newton_schulz_reference(G, steps, coefficients=None, safety=1.0):
    coefficients = coefficients or JORDAN
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / (torch.linalg.matrix_norm(X) * safety + 1e-7)
    for i in range(steps):
        a, b, c = coefficients[min(i, len(coefficients) - 1)]
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


def orthogonalise_reference(G, coefficients):
    if coefficients == "polar_express":
        return newton_schulz_reference(G, 5, POLAR_EXPRESS, safety=1.02)
    return newton_schulz_reference(G, 5)


def muon_reference(w, grads, *, lr, momentum, nesterov, wd, warmup=0, ns_steps=5, coefficients="jordan",
                   normuon=False, beta2=0.95, cautious=False):
    """Muon step by step; NorMuon as its reference code (zichongli5/NorMuon, normuon_update); cautious weight decay
    as Algorithm 1 of Chen et al. 2025: w = w - lr (u + wd I(u w >= 0) w)."""
    buf = torch.zeros_like(w)
    v = torch.zeros(w.shape[0], 1)
    for k, g in enumerate(grads):
        mu = momentum if warmup == 0 else (1 - min(k / warmup, 1)) * 0.85 + min(k / warmup, 1) * momentum
        buf = mu * buf + (1 - mu) * g
        u = (1 - mu) * g + mu * buf if nesterov else buf
        if ns_steps == 5:
            u = orthogonalise_reference(u, coefficients)
        else:
            u = newton_schulz_reference(u, ns_steps)
        if normuon:
            norm = torch.linalg.matrix_norm(u)
            v = beta2 * v + (1 - beta2) * (u * u).mean(dim=1, keepdim=True)
            u = u / (v.sqrt() + 1e-10)
            u = u * norm / (torch.linalg.matrix_norm(u) + 1e-10)
        u = u * max(1.0, w.shape[0] / w.shape[1]) ** 0.5
        if cautious:
            w = w - lr * wd * (u * w >= 0) * w - lr * u
        else:
            w = w * (1 - lr * wd) - lr * u
    return w


@pytest.mark.parametrize("impl", ["for", "foreach", "compiled"])  # compiled: the batched eager path off CUDA
@pytest.mark.parametrize("nesterov,warmup", [(True, 0), (False, 0), (True, 4)])
def test_muon_matches_reference(impl, nesterov, warmup):
    shapes = [(8, 5), (5, 8), (6, 6), (8, 5)]  # two of one shape: batched together on the foreach path
    params = make_params(shapes)
    init = [p.detach().clone() for p in params]
    grads = grad_sequence(shapes, 7)
    opt = Muon(params, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1, momentum_warmup=warmup,
               impl=impl, ns_dtype=torch.float32)
    out = run(opt, params, grads)
    for i, w in enumerate(init):
        ref = muon_reference(w, [g[i] for g in grads], lr=0.05, momentum=0.9, nesterov=nesterov, wd=0.1,
                             warmup=warmup)
        torch.testing.assert_close(out[i], ref, rtol=1e-4, atol=1e-5)


VARIANTS = {
    "polar_express": dict(ns_coefficients="polar_express"),
    "normuon": dict(normuon=True, normuon_beta2=0.9),
    "cautious_wd": dict(cautious_wd=True),
    "all three": dict(ns_coefficients="polar_express", normuon=True, cautious_wd=True),
}


@pytest.mark.parametrize("impl", ["for", "foreach", "compiled"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_muon_variants_match_reference(impl, variant):
    """Polar Express coefficients, NorMuon and cautious weight decay, alone and together, on every path, against
    the step-by-step reference (8 steps; momentum warm-up on; decay large enough that the cautious mask matters)."""
    kw = VARIANTS[variant]
    shapes = [(8, 5), (5, 8), (6, 6), (8, 5), (4, 3, 2)]  # a 3-D tensor is the matrix (4, 6)
    params = make_params(shapes)
    init = [p.detach().clone() for p in params]
    grads = grad_sequence(shapes, 8)
    opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=2.0, momentum_warmup=3, impl=impl,
               ns_dtype=torch.float32, **kw)
    out = run(opt, params, grads)
    for i, w in enumerate(init):
        ref = muon_reference(w.reshape(len(w), -1), [g[i].reshape(len(w), -1) for g in grads], lr=0.05,
                             momentum=0.9, nesterov=True, wd=2.0, warmup=3,
                             coefficients=kw.get("ns_coefficients", "jordan"), normuon=kw.get("normuon", False),
                             beta2=kw.get("normuon_beta2", 0.95), cautious=kw.get("cautious_wd", False))
        torch.testing.assert_close(out[i], ref.view(w.shape), rtol=1e-4, atol=1e-5)
        if kw.get("normuon"):
            assert opt.state[params[i]]["second_momentum_buffer"].shape == (len(w), 1)
    plain = run(Muon(make_params(shapes), lr=0.05, momentum=0.9, weight_decay=2.0, momentum_warmup=3, impl=impl,
                     ns_dtype=torch.float32), make_params(shapes), grads)
    assert not any(torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(out, plain))  # each one changes it


@pytest.mark.parametrize("impl", ["for", "foreach"])
def test_cautious_weight_decay_without_decay_is_plain_muon(impl):
    """With weight_decay=0 the mask has nothing to gate: bit for bit the run without it."""
    shapes = [(8, 5), (6, 6), (8, 5)]
    grads = grad_sequence(shapes, 5)
    runs = []
    for cautious in (False, True):
        params = make_params(shapes)
        runs.append(run(Muon(params, lr=0.05, weight_decay=0.0, cautious_wd=cautious, impl=impl,
                             ns_dtype=torch.float32), params, grads))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_cautious_weight_decay_mask():
    """The decay reaches exactly the coordinates where the update and the weight have the same sign (or a zero)."""
    from lmsprint.optim.muon import cautious_mask

    u = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 2.0])
    p = torch.tensor([2.0, -3.0, -1.0, 4.0, -5.0, 0.0])
    assert cautious_mask(u, p).tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_polar_express_coefficients_are_the_papers():
    """The five quintics are what the paper's algorithm gives for modded-nanogpt's settings (re-derived here), and
    the schedule takes the first ``steps`` of them, repeating the last beyond five (as the paper's code)."""
    from lmsprint.optim.muon import POLAR_EXPRESS_COEFFICIENTS, POLAR_EXPRESS_SAFETY, ns_coefficients

    assert [list(c) for c in POLAR_EXPRESS_COEFFICIENTS] == [list(c) for c in POLAR_EXPRESS]
    derived = optimal_composition(1e-3, 5, 1.02, 0.02)
    torch.testing.assert_close(torch.tensor(derived, dtype=torch.float64),
                               torch.tensor(POLAR_EXPRESS, dtype=torch.float64), rtol=1e-9, atol=0)
    assert POLAR_EXPRESS_SAFETY == 1.02
    assert ns_coefficients("polar_express", 3) == POLAR_EXPRESS[:3]
    assert ns_coefficients("polar_express", 7) == [*POLAR_EXPRESS, POLAR_EXPRESS[-1], POLAR_EXPRESS[-1]]
    assert ns_coefficients("jordan", 4) == JORDAN[:4]
    with pytest.raises(ValueError, match="ns_coefficients must be one of jordan, polar_express, got 'newton'"):
        ns_coefficients("newton", 5)


@pytest.mark.parametrize("shape", [(16, 16), (64, 16), (16, 64), (100, 37)])
def test_polar_express_orthogonalises_closer_than_jordan(shape):
    """float32 iteration on random matrices: the singular values end closer to 1 than with Jordan's quintic (max
    |s - 1| about 0.14 against 0.32: the composed polynomial's equioscillation error), the result is within that
    of U V^T, and it is U p(S) V^T for the composition p of the cited quintics, applied in order."""
    from lmsprint.optim.muon import zeropower_via_newtonschulz5

    G = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    jordan = zeropower_via_newtonschulz5(G, 5, dtype=torch.float32)
    polar = zeropower_via_newtonschulz5(G, 5, dtype=torch.float32, coefficients="polar_express")
    worst = {k: (torch.linalg.svdvals(X) - 1).abs().max().item() for k, X in (("jordan", jordan), ("pe", polar))}
    assert worst["pe"] < 0.16 < 0.25 < worst["jordan"]
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    assert torch.linalg.matrix_norm(polar.double() - U @ Vh, ord=2) < 0.16
    s = S / (1.02 * torch.linalg.matrix_norm(G.double()) + 1e-7)
    for a, b, c in POLAR_EXPRESS:
        s = a * s + b * s**3 + c * s**5
    torch.testing.assert_close(polar.double(), U @ torch.diag(s) @ Vh, rtol=0, atol=2e-5)
    torch.testing.assert_close(polar, newton_schulz_reference(G, 5, POLAR_EXPRESS, safety=1.02))


def test_newton_schulz_orthogonalises():
    from lmsprint.optim.muon import zeropower_via_newtonschulz5

    for shape in [(16, 16), (32, 8), (8, 32)]:
        G = torch.randn(shape)
        X = zeropower_via_newtonschulz5(G, 5, dtype=torch.float32)
        torch.testing.assert_close(X, newton_schulz_reference(G, 5))
        s = torch.linalg.svdvals(X)
        assert 0.4 < s.min() and s.max() < 1.6  # "US'V^T with S' ~ Uniform(0.5, 1.5)"
        assert zeropower_via_newtonschulz5(G, 5).dtype == torch.bfloat16  # the reference's GPU default
    batch = torch.randn(3, 6, 4)
    torch.testing.assert_close(zeropower_via_newtonschulz5(batch, 5, dtype=torch.float32)[1],
                               newton_schulz_reference(batch[1], 5))


def test_muon_match_rms_adamw_scale():
    p = make_params([(12, 3)])
    g = grad_sequence([(12, 3)], 1)
    init = p[0].detach().clone()
    opt = Muon(p, lr=0.1, momentum=0.0, nesterov=False, adjust_lr_fn="match_rms_adamw", ns_dtype=torch.float32)
    out = run(opt, p, g)[0]
    expected = init - 0.1 * 0.2 * math.sqrt(12) * newton_schulz_reference(g[0][0], 5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["for", "foreach", "fused"])
def test_muon_with_aux_adamw_routes_groups(impl):
    shapes = [(8, 5), (6, 6), (5,), (10, 4)]
    params, ref_params = make_params(shapes), make_params(shapes)
    grads = grad_sequence(shapes, 6)
    muon_hp = dict(lr=0.05, momentum=0.9, weight_decay=0.1)
    adam_hp = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    opt = MuonWithAuxAdamW([dict(params=params[:2], use_muon=True, **muon_hp),
                            dict(params=params[2:], use_muon=False, role="scalar", **adam_hp)],
                           impl=impl, ns_dtype=torch.float32)
    out = run(opt, params, grads)
    muon_ref = Muon(ref_params[:2], **muon_hp, impl="for", ns_dtype=torch.float32)
    adam_ref = torch.optim.AdamW(ref_params[2:], **adam_hp, foreach=False)
    for step_grads in grads:
        for p, g in zip(ref_params, step_grads):
            p.grad = g.clone()
        muon_ref.step()
        adam_ref.step()
    for a, b in zip(out, ref_params):
        torch.testing.assert_close(a, b.detach())
    assert opt.param_groups[1]["role"] == "scalar"
    assert set(opt.state[params[0]]) == {"step", "momentum_buffer"}
    assert set(opt.state[params[2]]) == {"step", "exp_avg", "exp_avg_sq"}


# ----------------------------------------------------------------------------------------------------------
# SOAP (Vyas et al. 2024, Algorithm 3, with the reference code's conventions: the first step only sets up the
# preconditioner, eps outside the bias correction, decay after the update, QR power-iteration refresh)


def soap_reference(W, grads, *, lr, betas, eps, wd, freq, max_dim):
    """Paper-style SOAP for one tensor: M kept in the original space, V in the rotated one."""
    b1, b2 = betas
    if W.ndim == 1:
        W = W[None, :]  # a 1-D tensor is a 1 x n matrix with both sides unpreconditioned
        grads = [g[None, :] for g in grads]
        sides = (False, False)
    else:
        sides = (W.shape[0] <= max_dim, W.shape[1] <= max_dim)
    m, n = W.shape
    L, R = torch.zeros(m, m, dtype=W.dtype), torch.zeros(n, n, dtype=W.dtype)

    def eigvecs(A):
        return torch.linalg.eigh(A)[1].flip(1)  # descending eigenvalues

    M, V = torch.zeros_like(W), torch.zeros_like(W)
    QL, QR = torch.eye(m, dtype=W.dtype), torch.eye(n, dtype=W.dtype)
    t = 0
    for k, G in enumerate(grads):
        if k == 0:
            L, R = (1 - b2) * G @ G.T, (1 - b2) * G.T @ G
            QL = eigvecs(L) if sides[0] else QL
            QR = eigvecs(R) if sides[1] else QR
            continue
        t += 1
        M = b1 * M + (1 - b1) * G
        G_rot = QL.T @ G @ QR
        V = b2 * V + (1 - b2) * G_rot**2
        N = QL @ ((QL.T @ M @ QR) / (V.sqrt() + eps)) @ QR.T
        W = W - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * N
        W = W * (1 - lr * wd)
        L, R = b2 * L + (1 - b2) * G @ G.T, b2 * R + (1 - b2) * G.T @ G
        if t % freq == 0:
            if sides[0]:
                order = torch.argsort(torch.diag(QL.T @ L @ QL), descending=True)
                V, QL = V[order, :], torch.linalg.qr(L @ QL[:, order])[0]
            if sides[1]:
                order = torch.argsort(torch.diag(QR.T @ R @ QR), descending=True)
                V, QR = V[:, order], torch.linalg.qr(R @ QR[:, order])[0]
    return W.squeeze(0) if len(grads[0]) == 1 else W


# square matrices (full-rank factors, so the first eigenbasis is unique), one side over max_precond_dim, a vector
SOAP_SHAPES = [(5, 5), (4, 12), (12, 4), (6,)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_soap_matches_paper(dtype, tol):
    hp = dict(lr=1e-2, betas=(0.95, 0.95), eps=1e-8, wd=0.01, freq=3, max_dim=8)
    params = make_params(SOAP_SHAPES, dtype=dtype)
    init = [p.detach().double().clone() for p in params]
    grads = grad_sequence(SOAP_SHAPES, 11, dtype=dtype)
    opt = SOAP(params, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["wd"],
               precondition_frequency=hp["freq"], max_precond_dim=hp["max_dim"])
    out = run(opt, params, grads)
    for i, w in enumerate(init):
        ref = soap_reference(w, [g[i].double() for g in grads], **hp)
        torch.testing.assert_close(out[i].double(), ref, rtol=tol, atol=tol)
    st = opt.state[params[1]]
    assert st["step"] == 10 and st["GG"][0] is not None and st["GG"][1] is None and st["Q"][1] is None


def test_soap_first_step_only_initialises():
    params = make_params([(4, 4), (3,)])
    init = [p.detach().clone() for p in params]
    opt = SOAP(params, weight_decay=0.5)
    run(opt, params, grad_sequence([(4, 4), (3,)], 1))
    for p, w in zip(params, init):
        assert torch.equal(p.detach(), w)
        assert opt.state[p]["step"] == 0
    Q = opt.state[params[0]]["Q"]
    torch.testing.assert_close(Q[0].T @ Q[0], torch.eye(4))


# ----------------------------------------------------------------------------------------------------------
# every optimizer: state_dict round trip, bf16, grad None, schedulers

FACTORIES = {
    "adamw": lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw-foreach": lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1, impl="foreach"),
    "lion": lambda ps: Lion(ps, lr=1e-2, weight_decay=0.3),
    "soap": lambda ps: SOAP(ps, lr=1e-2, precondition_frequency=3),
    "ademamix": lambda ps: AdEMAMix(ps, lr=1e-2, weight_decay=0.1, alpha_warmup=6, beta3_warmup=6),
    "muon": lambda ps: MuonWithAuxAdamW(
        [dict(params=[p for p in ps if p.ndim == 2], use_muon=True, lr=0.02, weight_decay=0.1, momentum_warmup=5),
         dict(params=[p for p in ps if p.ndim != 2], use_muon=False, lr=1e-2)], ns_dtype=torch.float32),
    "muon-variants": lambda ps: MuonWithAuxAdamW(
        [dict(params=[p for p in ps if p.ndim == 2], use_muon=True, lr=0.02, weight_decay=0.1, momentum_warmup=5,
              ns_coefficients="polar_express", normuon=True, normuon_beta2=0.9, cautious_wd=True),
         dict(params=[p for p in ps if p.ndim != 2], use_muon=False, lr=1e-2)], ns_dtype=torch.float32),
}


@pytest.mark.parametrize("name", FACTORIES)
def test_state_dict_round_trip(name):
    make = FACTORIES[name]
    grads = grad_sequence(SHAPES, 10)
    params = make_params(SHAPES)
    straight = run(make(params), params, grads)

    params = make_params(SHAPES)
    opt = make(params)
    run(opt, params, grads[:4])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = make(fresh)
    opt2.load_state_dict(torch.load(buf))
    resumed = run(opt2, fresh, grads[4:])
    for a, b in zip(resumed, straight):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_muon_state_saved_before_the_variants_loads_with_them_off():
    """A state dict whose Muon groups lack the variants' keys (saved by an earlier version) loads with them off and
    continues exactly like the run that saved it."""
    grads = grad_sequence(SHAPES, 8)
    params = make_params(SHAPES)
    straight = run(FACTORIES["muon"](params), params, grads)
    params = make_params(SHAPES)
    opt = FACTORIES["muon"](params)
    run(opt, params, grads[:3])
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        for key in ("ns_coefficients", "cautious_wd", "normuon", "normuon_beta2"):
            group.pop(key, None)
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = FACTORIES["muon-variants"](fresh)  # built with them on: the saved groups' settings win, as torch does
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["normuon"] is False and "normuon" not in opt2.param_groups[1]
    for a, b in zip(run(opt2, fresh, grads[3:]), straight):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", FACTORIES)
def test_bf16_params(name):
    """bf16 weights: state is float32, the update is applied, a quadratic loss goes down; state stays float32
    through a state_dict round trip."""
    make = FACTORIES[name]
    torch.manual_seed(0)
    target = [torch.randn(s) for s in [(6, 6), (6,)]]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in [(6, 6), (6,)]]
    opt = make(params)

    def loss_fn():
        return sum(((p.float() - t) ** 2).mean() for p, t in zip(params, target))

    first = loss_fn().item()
    for _ in range(60):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert loss_fn().item() < 0.8 * first
    floating = [v for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    assert floating and all(v.dtype == torch.float32 for v in floating)

    opt2 = make(params)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in params:
        for key, v in opt2.state[p].items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == torch.float32
                assert torch.equal(v, opt.state[p][key])


@pytest.mark.parametrize("name", FACTORIES)
def test_params_without_grad_untouched(name):
    params = make_params(SHAPES)
    opt = FACTORIES[name](params)
    frozen = params[0].detach().clone()
    for _ in range(5):
        for p in params[1:]:
            p.grad = torch.randn_like(p)
        params[0].grad = None
        opt.step()
    assert torch.equal(params[0].detach(), frozen)
    assert len(opt.state.get(params[0], {})) == 0


@pytest.mark.parametrize("name", FACTORIES)
def test_lr_scheduler_is_honoured(name):
    """lr is read from the group at every step: a LambdaLR that holds lr at 0 for 3 steps freezes the weights."""
    params = make_params(SHAPES)
    opt = FACTORIES[name](params)
    peaks = [g["lr"] for g in opt.param_groups]
    sched = LambdaLR(opt, lambda step: 0.0 if step < 3 else 0.5)
    init = [p.detach().clone() for p in params]
    for step in range(6):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
        if step == 2:
            assert all(torch.equal(p.detach(), w) for p, w in zip(params, init))
    assert [g["lr"] for g in opt.param_groups] == [0.5 * lr for lr in peaks]
    assert any(not torch.equal(p.detach(), w) for p, w in zip(params, init))


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("scheduler", ["onecycle", "cyclic"])
def test_momentum_cycling_schedulers_work(name, scheduler):
    """OneCycleLR and CyclicLR with their defaults (cycle_momentum=True) drive every optimizer."""
    params = make_params(SHAPES)
    opt = FACTORIES[name](params)
    if scheduler == "onecycle":
        sched = OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=6)
    else:
        sched = CyclicLR(opt, base_lr=1e-4, max_lr=1e-2, step_size_up=2)
    key = "betas" if "betas" in opt.defaults else "momentum"
    seen = set()
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
        seen.add(tuple(str(g[key]) for g in opt.param_groups if key in g))
    assert all(torch.isfinite(p).all() for p in params)
    assert len(seen) > 1 and () not in seen  # the momentum was cycled


@pytest.mark.parametrize("name", FACTORIES)
def test_deepcopy_keeps_switches(name):
    params = make_params(SHAPES)
    opt = FACTORIES[name](params)
    clone = copy.deepcopy(opt)
    assert clone.impl == opt.impl
    assert getattr(clone, "ns_dtype", None) == getattr(opt, "ns_dtype", None)


def test_closure_is_evaluated_with_grad():
    w = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(3.0)
    assert w.detach().lt(1).all()


def test_compiled_newton_schulz_matches_eager():
    """The iteration impl="compiled" runs on CUDA, here through Inductor's CPU backend: the same numbers."""
    from lmsprint.optim.muon import compiled_newtonschulz5, zeropower_via_newtonschulz5

    G = torch.randn(3, 12, 20, generator=torch.Generator().manual_seed(0))
    for X in (G, G.mT):  # wide and tall (transposed inside)
        for coefficients in ("jordan", "polar_express"):
            torch.testing.assert_close(compiled_newtonschulz5()(X, 5, dtype=torch.float32, coefficients=coefficients),
                                       zeropower_via_newtonschulz5(X, 5, dtype=torch.float32,
                                                                   coefficients=coefficients), rtol=1e-4, atol=1e-5)


def test_compiled_impl_is_muon_only():
    with pytest.raises(ValueError, match="impl"):
        AdamW(make_params([(4, 4)]), impl="compiled")
