"""Gradient clipping, precision modes, fp16 loss scaling and the non-finite / spike guard, on tiny CPU runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from lmsprint.training import checkpoint as ckpt
from lmsprint.training.metrics import read_metrics
from lmsprint.training.precision import resolve_precision
from lmsprint.training.trainer import Callback, Trainer, TrainingDiverged


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind]


def events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in records(run_dir, "event") if r.get("event") == name]


def snapshot(trainer: Trainer) -> tuple[list[torch.Tensor], dict]:
    """Copies of the weights and of the optimizer state."""
    params = [p.detach().clone() for p in trainer.model.parameters()]
    state = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for i, s in trainer.optimizer.state_dict()["state"].items()}
    return params, state


def assert_same(a: tuple[list[torch.Tensor], dict], b: tuple[list[torch.Tensor], dict]) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])), "weights changed"
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        for k, v in a[1][i].items():
            w = b[1][i][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, f"optimizer state {i}.{k} changed"


class Hook(Callback):
    """Runs ``at_grads`` / ``at_loss`` the first time the run reaches a step (steps recur after a rollback)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.grads_seen: set[int] = set()
        self.loss_seen: set[int] = set()

    def on_grads(self, step: int, model: torch.nn.Module) -> None:
        if step not in self.grads_seen:
            self.grads_seen.add(step)
            self.at_grads(step, model)

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        first = step not in self.loss_seen
        self.loss_seen.add(step)
        return self.at_loss(step, loss, first)

    def at_grads(self, step: int, model: torch.nn.Module) -> None:
        pass

    def at_loss(self, step: int, loss: torch.Tensor, first: bool) -> torch.Tensor:
        return loss


def make_trainer(tmp_path: Path, corpus: Path, name: str = "run", **overrides: object) -> Trainer:
    return Trainer(tiny_config(corpus, **overrides), tmp_path / name)


# ----------------------------------------------------------------------------------------------------------
# clipping


@pytest.mark.parametrize("clip_norm,clip_value,precision", [
    (0.05, 0.0, "fp32"), (0.0, 1e-3, "fp32"), (0.05, 1e-3, "fp32"), (0.0, 0.0, "fp32"),
    (0.05, 0.0, "fp16"), (0.0, 1e-3, "fp16"),
])
def test_clip_matches_torch(tmp_path: Path, corpus: Path, clip_norm: float, clip_value: float,
                            precision: str) -> None:
    """fp16: the gradients are clipped (and their norm taken) after the loss scale is divided out."""
    trainer = make_trainer(tmp_path, corpus, train__clip_norm=clip_norm, train__clip_value=clip_value,
                           train__precision=precision)
    trainer._forward_backward(trainer.loader.next(0))
    scale = trainer.scaler.get_scale() if trainer.scaler is not None else 1.0
    assert (scale > 1.0) == (precision == "fp16")
    params = [p for p in trainer.model.parameters() if p.grad is not None]
    copies = []
    for p in params:
        q = p.detach().clone().requires_grad_(True)
        q.grad = p.grad.clone() / scale  # the scale is a power of two: dividing it out is exact
        copies.append(q)
    pre_norm = torch.linalg.vector_norm(torch.stack([q.grad.norm() for q in copies]))
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(copies, clip_norm)
    if clip_value > 0:
        torch.nn.utils.clip_grad_value_(copies, clip_value)

    norm = trainer._clip()

    assert pre_norm > max(clip_norm, clip_value)  # the clip is active, not a no-op
    torch.testing.assert_close(norm, pre_norm, rtol=1e-6, atol=0)  # the norm before clipping
    for p, q in zip(params, copies):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    if clip_norm == clip_value == 0:
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(params, copies))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_logged_grad_norm_is_the_pre_clip_norm(tmp_path: Path, corpus: Path, precision: str) -> None:
    """With fp16 the logged norm is that of the unscaled gradients: unscale_ runs before the clip."""
    trainer = make_trainer(tmp_path, corpus, train__steps=4, train__clip_norm=0.1, train__precision=precision)

    class Record(Callback):
        def __init__(self) -> None:
            self.norms: dict[int, float] = {}

        def on_grads(self, step: int, model: torch.nn.Module) -> None:
            scale = trainer.scaler.get_scale() if trainer.scaler is not None else 1.0
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            self.norms[step + 1] = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() / scale

    rec = Record()
    trainer.callbacks.append(rec)
    trainer.run()
    logged = {r["step"]: r["grad_norm"] for r in records(trainer.run_dir, "train")}
    assert sorted(logged) == [1, 2, 3, 4]
    finite = [s for s in logged if math.isfinite(logged[s])]
    assert len(finite) >= 3
    for s in finite:
        assert logged[s] > 0.1  # above the clip threshold: the norm before clipping
        assert logged[s] == pytest.approx(rec.norms[s], rel=1e-5)


def test_every_steps_pre_clip_norm_is_logged(tmp_path: Path, corpus: Path) -> None:
    """A metrics line every 3 steps still carries the pre-clip norm of each of its 3 steps (the guard syncs them
    to the host anyway)."""
    trainer = make_trainer(tmp_path, corpus, train__steps=6, train__log_every=3, train__clip_norm=0.1)
    norms: dict[int, float] = {}

    class Record(Callback):
        def on_grads(self, step: int, model: torch.nn.Module) -> None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norms[step] = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()

    trainer.callbacks.append(Record())
    trainer.run()
    logged = records(trainer.run_dir, "train")
    assert [r["step"] for r in logged] == [3, 6]
    for r in logged:
        expected = [norms[s] for s in range(r["step"] - 3, r["step"])]
        assert r["grad_norms"] == pytest.approx(expected, rel=1e-5)
        assert r["grad_norm"] == pytest.approx(expected[-1], rel=1e-5)
        assert min(r["grad_norms"]) > 0.1  # before clipping


# ----------------------------------------------------------------------------------------------------------
# precision


def test_precision_resolution_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    warnings: list[str] = []
    assert resolve_precision("auto", cpu, warnings.append) == "fp32"
    for mode in ("fp32", "bf16", "fp16", "bf16-pure"):  # torch >= 2.3's CPU runs all four
        assert resolve_precision(mode, cpu, warnings.append) == mode
    assert warnings == []

    class NoScaler:
        def __init__(self, device: str) -> None:
            pass

        def is_enabled(self) -> bool:
            return False

    monkeypatch.setattr(torch.amp, "GradScaler", NoScaler)
    assert resolve_precision("fp16", cpu, warnings.append) == "fp32"
    assert len(warnings) == 1 and "fp16" in warnings[0] and "fp32" in warnings[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "bf16-pure"])
def test_precision_modes_train(tmp_path: Path, corpus: Path, precision: str) -> None:
    trainer = make_trainer(tmp_path, corpus, train__steps=3, train__precision=precision)
    result = trainer.run()
    assert result.val_loss is not None and math.isfinite(result.val_loss)
    weight_dtype = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    assert all(p.dtype == weight_dtype for p in trainer.model.parameters())  # bf16/fp16: fp32 master weights
    for state in trainer.optimizer.state.values():  # optimizer state stays fp32, bf16 weights included
        floating = [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        assert floating and all(v.dtype == torch.float32 for v in floating)
    assert (trainer.scaler is not None) == (precision == "fp16")
    train_recs = records(trainer.run_dir, "train")
    assert records(trainer.run_dir, "config")[0]["precision"] == precision
    assert all("mem_gb" not in r for r in train_recs)  # peak memory is a CUDA measurement
    assert ("loss_scale" in train_recs[-1]) == (precision == "fp16")


def test_fp16_overflow_is_skipped_by_the_scaler(tmp_path: Path, corpus: Path) -> None:
    """An inf gradient under loss scaling: update skipped, scale halved, not a guard skip; scaler state resumes."""
    trainer = make_trainer(tmp_path, corpus, train__precision="fp16", train__ckpt_every=5)
    seen: dict[str, object] = {}

    class Overflow(Hook):
        def at_grads(self, step: int, model: torch.nn.Module) -> None:
            if step == 3:
                seen["before"] = snapshot(trainer)
                seen["scale"] = trainer.scaler.get_scale()
                next(model.parameters()).grad[0, 0] = float("inf")

        def at_loss(self, step: int, loss: torch.Tensor, first: bool) -> torch.Tensor:
            if step == 4 and first:
                seen["after"] = snapshot(trainer)
                seen["scale_after"] = trainer.scaler.get_scale()
            return loss

    trainer.callbacks.append(Overflow(trainer))
    result = trainer.run()
    assert_same(seen["before"], seen["after"])  # type: ignore[arg-type]
    assert seen["scale_after"] == seen["scale"] * 0.5
    assert result.step == 10 and math.isfinite(result.val_loss)
    assert result.skipped_steps == 0 and result.rollbacks == 0  # the scaler's business, not the guard's
    assert 3 in [e["step"] for e in events(trainer.run_dir, "overflow")]

    saved = ckpt.load_checkpoint(ckpt.latest_valid(trainer.ckpt_root))[2]["scaler"]
    assert saved == trainer.scaler.state_dict()
    resumed = Trainer(tiny_config(corpus, train__precision="fp16", train__steps=12), trainer.run_dir, resume=True)
    assert resumed.scaler.state_dict() == saved


# ----------------------------------------------------------------------------------------------------------
# guard


def test_guard_decisions_and_reasons() -> None:
    from lmsprint.config import GuardConfig
    from lmsprint.training.guard import Guard

    guard = Guard(GuardConfig(max_bad_steps=2, spike_factor=2.0, spike_warmup=2, ema=0.5))
    assert guard.check(10.0, 1.0) == "ok"
    assert guard.check(30.0, 1.0) == "ok"  # a spike, but before spike_warmup good steps
    assert guard.check(3.0, math.inf, overflow_expected=True) == "ok"  # fp16 overflow: the scaler's business
    assert guard.reason == "" and guard.bad_total == 0
    assert guard.check(math.nan, 1.0) == "skip" and "1 in a row" in guard.reason
    assert guard.check(10.0, 1.0) == "ok" and guard.bad_in_row == 0  # a good step breaks the row
    assert guard.check(2.0, math.nan) == "skip"
    assert guard.check(2.0, math.inf) == "rollback" and "non-finite" in guard.reason and "2 in a row" in guard.reason
    assert guard.bad_total == 3
    guard.after_rollback()
    ema = guard.ema
    assert ema is not None and guard.check(2.5 * ema, 1.0) == "rollback"
    assert guard.reason.startswith("loss spike") and f"{ema:.4g}" in guard.reason and guard.spikes == 1
    assert guard.ema == ema  # the spike does not enter the moving average
    restored = Guard(guard.cfg)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()


def test_fp16_endless_overflow_becomes_bad_steps() -> None:
    """Under loss scaling a non-finite gradient is an overflow for the scaler, until it has happened
    OVERFLOWS_IN_ROW times in a row: then it is a NaN no scale can fix, and counts as a bad step (-> rollback)."""
    from lmsprint.config import GuardConfig
    from lmsprint.training.guard import OVERFLOWS_IN_ROW, Guard

    guard = Guard(GuardConfig(max_bad_steps=2))
    for _ in range(OVERFLOWS_IN_ROW):
        assert guard.check(3.0, math.nan, overflow_expected=True) == "ok"
    assert guard.check(3.0, 1.0, overflow_expected=True) == "ok" and guard.overflows_in_row == 0  # row broken
    for _ in range(OVERFLOWS_IN_ROW):
        assert guard.check(3.0, math.inf, overflow_expected=True) == "ok"
    assert guard.bad_total == 0
    assert guard.check(3.0, math.nan, overflow_expected=True) == "skip" and "overflows in a row" in guard.reason
    assert guard.check(3.0, math.nan, overflow_expected=True) == "rollback" and guard.bad_total == 2
    guard.after_rollback()
    assert guard.check(3.0, math.inf, overflow_expected=True) == "ok"  # a fresh start for the scaler


def test_nan_gradient_is_skipped_and_counted(tmp_path: Path, corpus: Path) -> None:
    trainer = make_trainer(tmp_path, corpus)
    seen: dict[str, object] = {}

    class NaNGrad(Hook):
        def at_grads(self, step: int, model: torch.nn.Module) -> None:
            if step == 3:
                seen["before"] = snapshot(trainer)
                next(model.parameters()).grad[0, 0] = float("nan")

        def at_loss(self, step: int, loss: torch.Tensor, first: bool) -> torch.Tensor:
            if step == 4 and first:
                seen["after"] = snapshot(trainer)
            return loss

    trainer.callbacks.append(NaNGrad(trainer))
    result = trainer.run()
    assert_same(seen["before"], seen["after"])  # type: ignore[arg-type]
    assert result.skipped_steps == 1 and result.rollbacks == 0 and result.step == 10
    assert [e["step"] for e in events(trainer.run_dir, "skip")] == [3]
    by_step = {r["step"]: r for r in records(trainer.run_dir, "train")}
    assert by_step[3]["skipped"] == 0 and by_step[4]["skipped"] == 1
    assert math.isfinite(result.val_loss)


def test_loss_spike_rolls_back_to_last_checkpoint(tmp_path: Path, corpus: Path) -> None:
    trainer = make_trainer(tmp_path, corpus, train__ckpt_every=5, guard__spike_factor=3, guard__spike_warmup=2,
                           guard__rollback_lr_factor=0.5)
    seen: dict[str, object] = {}

    class Spike(Hook):
        def at_loss(self, step: int, loss: torch.Tensor, first: bool) -> torch.Tensor:
            if step == 5 and not first:  # the first step after the rollback: weights as checkpointed
                seen["weights"] = {k: v.clone() for k, v in ckpt.model_state(trainer.model).items()}
            return loss * 100 if step == 7 and first else loss

    trainer.callbacks.append(Spike(trainer))
    result = trainer.run()
    assert result.rollbacks == 1 and result.step == 10
    (event,) = events(trainer.run_dir, "rollback")
    assert event["step"] == 5 and event["checkpoint"].endswith("step_00000005") and event["lr_scale"] == 0.5
    saved = load_file(trainer.ckpt_root / "step_00000005" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in seen["weights"].items())  # type: ignore[union-attr]
    steps = [r["step"] for r in records(trainer.run_dir, "train")]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 6, 7, 8, 9, 10]  # step 8 spiked: back to 5, steps 6.. again
    lrs = [r["lr"] for r in records(trainer.run_dir, "train") if r["step"] == 6]
    assert lrs[1] == pytest.approx(0.5 * lrs[0], rel=1e-9)  # the schedule, at half its peak
    assert all(g["initial_lr"] == pytest.approx(0.5 * trainer.cfg.optim.lr) for g in trainer.optimizer.param_groups)
    assert trainer.loader.seed == trainer.cfg.train.seed + 1000  # data order reseeded
    assert trainer.guard.spikes == 1


def test_bad_steps_in_a_row_roll_back(tmp_path: Path, corpus: Path) -> None:
    trainer = make_trainer(tmp_path, corpus, train__ckpt_every=5, guard__max_bad_steps=2,
                           guard__rollback_reseed=False)

    class NaNs(Hook):
        def at_grads(self, step: int, model: torch.nn.Module) -> None:
            if step in (6, 7):
                next(model.parameters()).grad.fill_(float("nan"))

    trainer.callbacks.append(NaNs(trainer))
    result = trainer.run()
    assert result.rollbacks == 1 and result.skipped_steps == 2 and result.step == 10
    assert [e["step"] for e in events(trainer.run_dir, "skip")] == [6]
    assert [e["step"] for e in events(trainer.run_dir, "rollback")] == [5]
    assert trainer.loader.seed == trainer.cfg.train.seed  # rollback_reseed off


def test_rollback_without_checkpoint_restarts_from_initial_weights(tmp_path: Path, corpus: Path) -> None:
    """No checkpoint yet: back to step 0; the loss average is reset, or the initial loss would count as a spike."""
    trainer = make_trainer(tmp_path, corpus, train__steps=30, train__ckpt_every=0, train__eval_every=10,
                           optim__lr=1e-2, guard__spike_factor=1.2, guard__spike_warmup=2)

    class Spike(Hook):
        def at_loss(self, step: int, loss: torch.Tensor, first: bool) -> torch.Tensor:
            return loss * 100 if step == 20 and first else loss

    trainer.callbacks.append(Spike(trainer))
    result = trainer.run()
    assert result.rollbacks == 1 and result.step == 30
    (event,) = events(trainer.run_dir, "rollback")
    assert event["step"] == 0 and event["checkpoint"] == ""
    assert [s for s, _ in result.val_history] == [10, 20, 30]  # evaluations of the abandoned attempt dropped


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_divergence_advice_fits_the_clipping(tmp_path: Path, corpus: Path, clip: float) -> None:
    """Too many rollbacks: the advice names --train.clip_norm as it stands (lower it when on, enable it when off)."""
    trainer = make_trainer(tmp_path, corpus, train__steps=12, train__ckpt_every=0, train__clip_norm=clip,
                           guard__spike_factor=1.2, guard__spike_warmup=2, guard__max_rollbacks=1)

    class Spike(Hook):
        def at_loss(self, step: int, loss: torch.Tensor, first: bool) -> torch.Tensor:
            return loss * 100 if step == 6 else loss  # at every attempt

    trainer.callbacks.append(Spike(trainer))
    with pytest.raises(TrainingDiverged) as e:
        trainer.run()
    advice = "lower --train.clip_norm (now 1)" if clip else "enable --train.clip_norm"
    assert str(e.value) == (f"training diverged: more than 1 rollbacks; lower --optim.lr, {advice} or raise "
                            "--guard.max_rollbacks")


def test_fp16_guard_skip_and_rollback(tmp_path: Path, corpus: Path) -> None:
    """Under loss scaling a NaN loss is the guard's (skip), and a skip or rollback closes the scaler's step."""
    trainer = make_trainer(tmp_path, corpus, train__precision="fp16", train__ckpt_every=5, guard__spike_factor=3,
                           guard__spike_warmup=2)

    class Bad(Hook):
        def at_loss(self, step: int, loss: torch.Tensor, first: bool) -> torch.Tensor:
            if step == 3 and first:
                return loss * float("nan")
            return loss * 100 if step == 7 and first else loss

    trainer.callbacks.append(Bad(trainer))
    result = trainer.run()
    assert result.skipped_steps == 1 and result.rollbacks == 1 and result.step == 10
    assert [e["step"] for e in events(trainer.run_dir, "skip")] == [3]
    assert [e["step"] for e in events(trainer.run_dir, "rollback")] == [5]


def test_rollback_skips_a_checkpoint_whose_weights_failed(tmp_path: Path, corpus: Path) -> None:
    """Step 6 spikes on the weights checkpointed at step 6: going back there would fail again, so back to 4."""
    trainer = make_trainer(tmp_path, corpus, train__ckpt_every=2, train__keep_checkpoints=3, guard__spike_factor=3,
                           guard__spike_warmup=2, guard__max_rollbacks=2)
    bad: dict[str, torch.Tensor] = {}

    class BadWeights(Callback):
        def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
            weights = ckpt.model_state(trainer.model)
            if step == 6 and not bad:
                bad.update({k: v.clone() for k, v in weights.items()})
            spiked = step == 6 and all(torch.equal(bad[k], v) for k, v in weights.items())
            return loss * 100 if spiked else loss

    trainer.callbacks.append(BadWeights())
    result = trainer.run()
    assert result.rollbacks == 1 and result.step == 10
    (event,) = events(trainer.run_dir, "rollback")
    assert event["step"] == 4 and event["reason"].startswith("loss spike")


def test_a_resumed_checkpoint_is_judged_like_in_the_uninterrupted_run(tmp_path: Path, corpus: Path) -> None:
    """Stopped at step 6 and resumed: step 6 spiking on the checkpointed weights goes back to step 4, as in
    test_rollback_skips_a_checkpoint_whose_weights_failed, not to the failing step-6 checkpoint again and again."""
    kw = dict(train__ckpt_every=2, train__keep_checkpoints=3, guard__spike_factor=3, guard__spike_warmup=2,
              guard__max_rollbacks=2)
    make_trainer(tmp_path, corpus, train__stop_at_step=6, **kw).run()
    trainer = Trainer(tiny_config(corpus, **kw), tmp_path / "run", resume=True)
    assert trainer.state.step == 6 and trainer.state.good_step == 5
    resumed = {k: v.clone() for k, v in ckpt.model_state(trainer.model).items()}

    class BadWeights(Callback):
        def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
            weights = ckpt.model_state(trainer.model)
            return loss * 100 if step == 6 and all(torch.equal(resumed[k], v) for k, v in weights.items()) else loss

    trainer.callbacks.append(BadWeights())
    result = trainer.run()
    assert result.rollbacks == 1 and result.step == 10
    assert [e["step"] for e in events(trainer.run_dir, "rollback")] == [4]


def test_a_rollback_is_saved_at_once(tmp_path: Path, corpus: Path) -> None:
    """A crash right after a rollback resumes the rolled-back run (lower lr, counters, new data order), never the
    abandoned attempt's newer checkpoint that holds the weights that failed."""
    kw = dict(train__steps=20, train__ckpt_every=5, train__keep_checkpoints=3, guard__spike_factor=3,
              guard__spike_warmup=2, guard__rollback_lr_factor=0.5)
    trainer = make_trainer(tmp_path, corpus, **kw)

    class SpikeThenCrash(Hook):
        def at_loss(self, step: int, loss: torch.Tensor, first: bool) -> torch.Tensor:
            if step == 7 and not first:
                raise RuntimeError("simulated crash")
            return loss * 100 if step == 10 and first else loss

    trainer.callbacks.append(SpikeThenCrash(trainer))
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.run()
    assert [e["step"] for e in events(trainer.run_dir, "rollback")] == [5]
    assert [p.name for p in ckpt.list_checkpoints(trainer.ckpt_root)] == ["step_00000005"]
    resumed = Trainer(tiny_config(corpus, **kw), tmp_path / "run", resume=True)
    assert resumed.state.step == 5 and resumed.state.lr_scale == 0.5 and resumed.guard.rollbacks == 1
    assert resumed.loader.seed == trainer.loader.seed == trainer.cfg.train.seed + 1000
    assert all(g["initial_lr"] == pytest.approx(0.5 * resumed.cfg.optim.lr) for g in resumed.optimizer.param_groups)


def test_keep_one_checkpoint_still_rolls_back_to_a_judged_one(tmp_path: Path, corpus: Path) -> None:
    """With --train.keep_checkpoints=1 the step-10 checkpoint (not yet judged) must not replace the step-5 one:
    a spike at step 10 goes back to step 5, not to the initial weights."""
    trainer = make_trainer(tmp_path, corpus, train__steps=20, train__ckpt_every=5, train__keep_checkpoints=1,
                           guard__spike_factor=3, guard__spike_warmup=2)

    class Spike(Hook):
        def at_loss(self, step: int, loss: torch.Tensor, first: bool) -> torch.Tensor:
            return loss * 100 if step == 10 and first else loss

    trainer.callbacks.append(Spike(trainer))
    result = trainer.run()
    assert result.rollbacks == 1 and result.step == 20
    assert [e["step"] for e in events(trainer.run_dir, "rollback")] == [5]
    # the newest judged checkpoint is kept besides the newest one: one more on disk than keep_checkpoints
    assert [p.name for p in ckpt.list_checkpoints(trainer.ckpt_root)] == ["step_00000015", "step_00000020"]


def horizon_tau(trainer: Trainer) -> list[float]:
    """1 / (peak lr x wd) of every decayed group: horizon mode keeps it at wd_horizon x total steps."""
    return [1 / (g["initial_lr"] * g["weight_decay"]) for g in trainer.optimizer.param_groups if g["weight_decay"]]


def test_horizon_weight_decay_follows_rollbacks_and_a_longer_resume(tmp_path: Path, corpus: Path) -> None:
    kw = dict(train__steps=20, train__ckpt_every=5, guard__spike_factor=3, guard__spike_warmup=2,
              guard__rollback_lr_factor=0.5, optim__weight_decay_mode="horizon", optim__wd_horizon=0.5)
    trainer = make_trainer(tmp_path, corpus, **kw)

    class Spike(Hook):
        def at_loss(self, step: int, loss: torch.Tensor, first: bool) -> torch.Tensor:
            return loss * 100 if step == 7 and first else loss

    trainer.callbacks.append(Spike(trainer))
    assert trainer.run().rollbacks == 1
    taus = horizon_tau(trainer)
    assert len(taus) >= 2 and taus == pytest.approx([10.0] * len(taus))  # 0.5 x 20 steps, at half the lr
    longer = Trainer(tiny_config(corpus, **{**kw, "train__steps": 40}), tmp_path / "run", resume=True)
    assert longer.state.lr_scale == 0.5
    assert horizon_tau(longer) == pytest.approx([20.0] * len(taus))  # 0.5 x 40 steps
