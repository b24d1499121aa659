"""Parameter-group policy, build_optimizer's config translation, argument validation and describe()."""

import json
import math

import pytest
import torch
from torch import nn

from lmsprint.config import OptimConfig
from lmsprint.errors import ConfigError
from lmsprint.optim import (
    OPTIMIZERS,
    SOAP,
    AdamW,
    AdEMAMix,
    Lion,
    Muon,
    MuonWithAuxAdamW,
    build_optimizer,
    build_param_groups,
    check_param_groups,
    describe,
    horizon_weight_decay,
    param_role,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(d, 3 * d)
        self.attn.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(d, 4 * d)
        self.mlp.c_proj = nn.Linear(4 * d, d)


class TinyGPT(nn.Module):
    """GPT-2 parameter names without the forward pass (the real model lives in lmsprint.model)."""

    def __init__(self, vocab=16, d=8, n_layer=2, tie=True):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(8, d),
            h=nn.ModuleList([Block(d) for _ in range(n_layer)]), ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.transformer.wte.weight


def roles_by_name(model, groups):
    where = {id(p): g["role"] for g in groups for p in g["params"]}
    return {n: where[id(p)] for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------------------
# policy


def test_every_param_in_exactly_one_group_tied_once():
    model = TinyGPT(tie=True)
    groups = build_param_groups(model.named_parameters(remove_duplicate=False), lr=1e-3, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    check_param_groups(model.named_parameters(), groups)
    assert sum(1 for g in groups for p in g["params"] if p is model.lm_head.weight) == 1
    roles = roles_by_name(model, groups)
    assert roles["transformer.wte.weight"] == "embed"  # the tied matrix, under its first name
    assert roles["transformer.wpe.weight"] == "embed"
    assert roles["transformer.h.0.attn.c_attn.weight"] == "matrix"
    assert roles["transformer.h.1.mlp.c_proj.weight"] == "matrix"
    assert roles["transformer.h.0.attn.c_attn.bias"] == "scalar"
    assert roles["transformer.h.0.ln_1.weight"] == "scalar"
    assert roles["transformer.ln_f.bias"] == "scalar"


def test_untied_head_decay_and_lrs():
    model = TinyGPT(tie=False)
    groups = build_param_groups(model.named_parameters(), lr=1e-3, weight_decay=0.1, embed_lr=0.3, head_lr=0.02,
                                scalar_lr=0.05)
    by_role = {g["role"]: g for g in groups}
    assert [g["role"] for g in groups] == ["matrix", "embed", "head", "scalar"]
    assert by_role["head"]["params"] == [model.lm_head.weight]
    assert {r: g["lr"] for r, g in by_role.items()} == {"matrix": 1e-3, "embed": 0.3, "head": 0.02, "scalar": 0.05}
    for g in groups:  # nanoGPT: every tensor with ndim >= 2 decayed, 1-D tensors not
        assert all(p.ndim >= 2 for p in g["params"]) == (g["weight_decay"] == 0.1)
        assert all(p.ndim < 2 for p in g["params"]) == (g["weight_decay"] == 0.0)
    defaults = build_param_groups(model.named_parameters(), lr=1e-3)
    assert all(g["lr"] == 1e-3 for g in defaults)


def test_per_group_weight_decay():
    """Embedding and head decay can differ from the matrices' (0 exempts the embeddings); gains stay at 0; the
    optimizer applies each group's own decay."""
    model = TinyGPT(tie=False)
    cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1, embed_weight_decay=0.0, head_weight_decay=0.5)
    opt = build_optimizer(model.named_parameters(), cfg, total_steps=10)
    assert {g["role"]: g["weight_decay"] for g in opt.param_groups} == {"matrix": 0.1, "embed": 0.0, "head": 0.5,
                                                                         "scalar": 0.0}
    embed, head = model.transformer.wte.weight.detach().clone(), model.lm_head.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradients: the step is decay alone
    opt.step()
    assert torch.equal(model.transformer.wte.weight, embed)
    torch.testing.assert_close(model.lm_head.weight, head * (1 - 1e-2 * 0.5))
    with pytest.raises(ConfigError, match="apply to --optim.weight_decay_mode=fixed"):
        build_optimizer(model.named_parameters(), OptimConfig(weight_decay_mode="horizon", embed_weight_decay=0.0),
                        total_steps=10)
    with pytest.raises(ConfigError, match="--optim.head_weight_decay must be >= 0"):
        build_optimizer(model.named_parameters(), OptimConfig(head_weight_decay=-1.0), total_steps=10)


def test_frozen_params_excluded():
    model = TinyGPT(tie=False)
    model.transformer.wpe.weight.requires_grad_(False)
    groups = build_param_groups(model.named_parameters(), lr=1e-3)
    assert all(p is not model.transformer.wpe.weight for g in groups for p in g["params"])
    check_param_groups(model.named_parameters(), groups)


def test_check_param_groups_fires():
    model = TinyGPT(tie=False)
    groups = build_param_groups(model.named_parameters(), lr=1e-3)
    missing = [dict(g, params=g["params"][1:]) if g["role"] == "matrix" else g for g in groups]
    with pytest.raises(AssertionError, match="missing .*transformer.h.0.attn.c_attn.weight"):
        check_param_groups(model.named_parameters(), missing)
    doubled = groups + [{"params": [model.lm_head.weight], "role": "head"}]
    with pytest.raises(AssertionError, match="in several groups .*lm_head.weight"):
        check_param_groups(model.named_parameters(), doubled)
    with pytest.raises(AssertionError, match="1 not trainable"):
        check_param_groups(model.named_parameters(), groups + [{"params": [torch.zeros(2)], "role": "x"}])


def test_muon_split_only_hidden_matrices():
    model = TinyGPT(tie=False)
    groups = build_param_groups(model.named_parameters(), lr=0.02, muon=True)
    muon = [p for g in groups if g["use_muon"] for p in g["params"]]
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and ".h." in n]
    assert {id(p) for p in muon} == {id(p) for p in hidden}
    assert all(g["role"] == "matrix" for g in groups if g["use_muon"])
    assert all(not g["use_muon"] for g in groups if g["role"] != "matrix")


def test_param_role_naming_contract():
    mat, vec = torch.zeros(2, 2), torch.zeros(2)
    assert param_role("model.embed_tokens.weight", mat) == "embed"
    assert param_role("transformer.pos_embedding", mat) == "embed"  # a bare parameter: its own name
    assert param_role("lm_head.weight", mat) == "head"
    assert param_role("lm_head.bias", vec) == "scalar"
    assert param_role("transformer.h.3.mlp.c_fc.weight", mat) == "matrix"
    assert param_role("transformer.h.3.attn.scale", torch.zeros(())) == "scalar"


def test_horizon_weight_decay():
    wd = horizon_weight_decay(2e-3, horizon=0.1, total_steps=5000)
    assert wd == pytest.approx(1.0)  # tau_iter = 1 / (lr * wd) = 0.1 * 5000 steps
    assert 1 / (2e-3 * wd) == pytest.approx(0.1 * 5000)
    with pytest.raises(ValueError):
        horizon_weight_decay(0.0, horizon=0.1, total_steps=10)
    model = TinyGPT(tie=False)
    cfg = OptimConfig(lr=1e-3, embed_lr=4e-3, weight_decay=0.1, weight_decay_mode="horizon", wd_horizon=0.2)
    opt = build_optimizer(model.named_parameters(), cfg, total_steps=1000)
    for g in opt.param_groups:
        if g["role"] == "scalar":
            assert g["weight_decay"] == 0.0
        else:
            assert 1 / (g["lr"] * g["weight_decay"]) == pytest.approx(0.2 * 1000)


# ----------------------------------------------------------------------------------------------------------
# build_optimizer


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_build_each_optimizer(name):
    model = TinyGPT(tie=True)
    opt = build_optimizer(model.named_parameters(), OptimConfig(name=name, lr=2e-3), total_steps=100)
    assert type(opt) is OPTIMIZERS[name]
    assert all("role" in g and g["initial_lr"] == g["lr"] for g in opt.param_groups)
    info = describe(opt)
    json.dumps(info)
    assert info["name"] == name and len(info["groups"]) == len(opt.param_groups)
    assert sum(g["num_params"] for g in info["groups"]) == sum(p.numel() for p in model.parameters())


def test_build_translates_config():
    model = TinyGPT(tie=False)
    named = list(model.named_parameters())
    default_betas = {"adamw": (0.9, 0.999), "lion": (0.9, 0.99), "soap": (0.95, 0.95),
                     "ademamix": (0.9, 0.999, 0.9999)}
    for name, betas in default_betas.items():
        opt = build_optimizer(named, OptimConfig(name=name), total_steps=100)
        assert tuple(opt.param_groups[0]["betas"]) == betas
    opt = build_optimizer(named, OptimConfig(name="adamw", betas=[0.8, 0.9]), total_steps=100)
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)

    soap = build_optimizer(named, OptimConfig(name="soap", precondition_frequency=7, max_precond_dim=64),
                           total_steps=100)
    assert soap.param_groups[0]["precondition_frequency"] == 7 and soap.param_groups[0]["max_precond_dim"] == 64

    ademamix = build_optimizer(named, OptimConfig(name="ademamix", alpha=8.0, beta3_warmup=0), total_steps=300)
    g = ademamix.param_groups[0]
    assert g["alpha"] == 8.0 and g["alpha_warmup"] == 300 and g["beta3_warmup"] == 0  # unset = the whole run

    muon = build_optimizer(named, OptimConfig(name="muon", lr=0.02, embed_lr=0.3, momentum=0.9, ns_steps=4,
                                              momentum_warmup=50, nesterov=False), total_steps=100)
    muon_groups = [g for g in muon.param_groups if g["use_muon"]]
    adam_groups = [g for g in muon.param_groups if not g["use_muon"]]
    assert len(muon_groups) == 1 and muon_groups[0]["lr"] == 0.02
    assert (muon_groups[0]["momentum"], muon_groups[0]["ns_steps"], muon_groups[0]["momentum_warmup"],
            muon_groups[0]["nesterov"]) == (0.9, 4, 50, False)
    assert all(g["betas"] == (0.9, 0.95) for g in adam_groups)
    assert {g["role"]: g["lr"] for g in adam_groups} == {"embed": 0.3, "head": 0.02, "scalar": 0.02}
    variants = ("ns_coefficients", "cautious_wd", "normuon", "normuon_beta2")
    assert [muon_groups[0][k] for k in variants] == ["jordan", False, False, 0.95]  # off unless asked for
    muon = build_optimizer(named, OptimConfig(name="muon", lr=0.02, ns_coefficients="polar_express", cautious_wd=True,
                                              normuon=True, normuon_beta2=0.9), total_steps=100)
    muon_groups = [g for g in muon.param_groups if g["use_muon"]]
    assert [muon_groups[0][k] for k in variants] == ["polar_express", True, True, 0.9]
    assert all(k not in g for g in muon.param_groups if not g["use_muon"] for k in variants)  # Muon's only
    assert {k: muon.state_dict()["param_groups"][0][k] for k in variants} == {k: muon_groups[0][k] for k in variants}


def test_ns_coefficient_names_are_the_config_choices():
    from typing import get_args

    from lmsprint.config.values import hints
    from lmsprint.optim.muon import NS_COEFFICIENT_NAMES

    assert get_args(hints(OptimConfig)["ns_coefficients"]) == NS_COEFFICIENT_NAMES == ("jordan", "polar_express")


@pytest.mark.parametrize("overrides,message", [
    (dict(name="sgd"), "unknown optimizer 'sgd'; choose from adamw, lion, soap, ademamix, muon"),
    (dict(lr=-1), "--optim.lr must be a positive number, got -1"),
    (dict(embed_lr=0.0), "--optim.embed_lr must be a positive number, got 0.0"),
    (dict(weight_decay=-0.1), "--optim.weight_decay must be >= 0, got -0.1"),
    (dict(eps=0.0), "--optim.eps must be a positive number"),
    (dict(betas=[0.9, 0.99, 0.999]), "--optim.betas needs 2 values for adamw"),
    (dict(name="ademamix", betas=[0.9, 0.99]), r"--optim.betas needs 3 values for ademamix \(beta1, beta2, beta3\)"),
    (dict(betas=[0.9, 1.0]), r"--optim.betas must each be in \[0, 1\)"),
    (dict(name="lion", impl="fused"), "--optim.impl=fused is not available for lion"),
    (dict(name="soap", impl="foreach"), "--optim.impl=foreach is not available for soap"),
    (dict(name="soap", precondition_frequency=0), "--optim.precondition_frequency must be >= 1, got 0"),
    (dict(name="muon", momentum=1.0), r"--optim.momentum must be in \[0, 1\), got 1.0"),
    (dict(name="muon", ns_steps=0), "--optim.ns_steps must be >= 1"),
    (dict(name="muon", normuon_beta2=1.0), r"--optim.normuon_beta2 must be in \[0, 1\), got 1.0"),
    (dict(name="muon", ns_coefficients="newton"), "--optim.ns_coefficients: 'newton' is not one of jordan, "
     "polar_express"),
    (dict(name="ademamix", alpha=-1.0), "--optim.alpha must be a number >= 0"),
    (dict(weight_decay_mode="horizon", wd_horizon=0.0), "--optim.wd_horizon must be a positive number"),
    (dict(weight_decay_mode="horizon", wd_horizon=math.inf), "--optim.wd_horizon must be a finite number, got inf"),
    (dict(eps=math.inf), "--optim.eps must be a finite number, got inf"),
    (dict(name="ademamix", alpha=math.inf), "--optim.alpha must be a finite number, got inf"),
])
def test_build_rejects_bad_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_optimizer(TinyGPT().named_parameters(), OptimConfig(**overrides), total_steps=100)


def test_build_rejects_decay_that_would_zero_or_flip_the_weights():
    """Each step scales the weights by 1 - lr*wd: a horizon under one step (a short run) must not flip them."""
    named = list(TinyGPT().named_parameters())
    horizon = OptimConfig(lr=3e-3, weight_decay_mode="horizon", wd_horizon=0.1)
    with pytest.raises(ConfigError, match=r"--optim.wd_horizon=0.1 x 5 steps is under one step: it would scale the "
                       r"matrix weights by 1 - lr\*wd = -1 every step"):
        build_optimizer(named, horizon, total_steps=5)
    opt = build_optimizer(named, horizon, total_steps=20)  # tau_iter = 2 steps: strong, but still a decay
    assert max(g["lr"] * g["weight_decay"] for g in opt.param_groups) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match=r"weight decay 2 of the matrix group at lr 0.5: .* lr\*wd must stay below 1"):
        build_optimizer(named, OptimConfig(lr=0.5, weight_decay=2.0), total_steps=100)


# ----------------------------------------------------------------------------------------------------------
# constructor validation


def p2():
    return [nn.Parameter(torch.zeros(3, 3))]


@pytest.mark.parametrize("make,message", [
    (lambda: AdamW(p2(), lr=-1e-3), "lr must be a number >= 0, got -0.001"),
    (lambda: AdamW(p2(), betas=(1.0, 0.99)), r"beta1 must be in \[0, 1\), got 1.0"),
    (lambda: AdamW(p2(), eps=-1.0), "eps must be >= 0, got -1.0"),
    (lambda: AdamW(p2(), impl="triton"), "impl must be one of auto, for, foreach, fused, got 'triton'"),
    (lambda: AdamW([{"params": p2(), "weight_decay": -1}]), "weight_decay must be >= 0, got -1"),
    (lambda: AdamW(p2(), weight_decay=math.inf), "weight_decay must be finite, got inf"),
    (lambda: Lion(p2(), weight_decay=math.inf), "weight_decay must be finite, got inf"),
    (lambda: AdEMAMix(p2(), alpha=math.inf), "alpha must be finite, got inf"),
    (lambda: Muon(p2(), weight_decay=math.inf), "weight_decay must be finite, got inf"),
    (lambda: Lion(p2(), betas=(0.9, 0.99, 0.9)), "betas must have 2 values"),
    (lambda: Lion(p2(), impl="fused"), "impl must be one of auto, for, foreach"),
    (lambda: AdEMAMix(p2(), betas=(0.9, 0.999)), "betas must have 3 values"),
    (lambda: AdEMAMix(p2(), alpha_warmup=-5), "alpha_warmup must be None or an int >= 0"),
    (lambda: SOAP(p2(), precondition_frequency=0), "precondition_frequency must be an int >= 1, got 0"),
    (lambda: SOAP(p2(), shampoo_beta=1.5), r"shampoo_beta must be in \[0, 1\)"),
    (lambda: Muon(p2(), momentum=1.5), r"momentum must be in \[0, 1\), got 1.5"),
    (lambda: Muon([nn.Parameter(torch.zeros(3))]), r"Muon optimises matrices only, got a parameter of shape \(3,\)"),
    (lambda: Muon(p2(), adjust_lr_fn="spectral"), "adjust_lr_fn must be 'original' or 'match_rms_adamw'"),
    (lambda: Muon(p2(), ns_coefficients="newton"), "ns_coefficients must be one of jordan, polar_express, got "
     "'newton'"),
    (lambda: Muon(p2(), normuon=1), "normuon must be True or False, got 1"),
    (lambda: Muon(p2(), normuon_beta2=-0.1), r"normuon_beta2 must be in \[0, 1\), got -0.1"),
    (lambda: MuonWithAuxAdamW([{"params": p2(), "use_muon": True, "cautious_wd": "yes"}]),
     "cautious_wd must be True or False, got 'yes'"),
    (lambda: MuonWithAuxAdamW([{"params": p2()}]), "needs use_muon=True or False"),
    (lambda: MuonWithAuxAdamW([{"params": [nn.Parameter(torch.zeros(3))], "use_muon": True}]), "matrices only"),
])
def test_constructor_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_muon_aux_defaults_and_config_registry():
    opt = MuonWithAuxAdamW([{"params": p2(), "use_muon": True}, {"params": [nn.Parameter(torch.zeros(3))],
                                                                  "use_muon": False}])
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[0]["momentum"] == 0.95
    assert opt.param_groups[1]["betas"] == (0.9, 0.95) and opt.param_groups[1]["eps"] == 1e-10
    assert list(OPTIMIZERS) == ["adamw", "lion", "soap", "ademamix", "muon"]
