"""The training loop: composes data, model, optimizer, schedule, precision, guard, checkpoints and metrics.

One process per GPU (torchrun) or a single process; the same loop either way. The hot loop synchronises with
the device once per optimizer step, to read the loss and gradient norm the guard needs (and not at all
when the guard is off, except on log steps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lmsprint import distributed as D
from lmsprint.config import RunConfig
from lmsprint.data.batching import TokenStream
from lmsprint.data.loader import StepBatch
from lmsprint.model import GPT, build_model, resolve_model_config
from lmsprint.model.fp8 import fp8_linear_runs
from lmsprint.model.layers import flex_available, sdpa_backend_runs
from lmsprint.optim import build_optimizer, describe
from lmsprint.optim.param_groups import group_settings
from lmsprint.schedules import LRSchedule, build_schedule
from lmsprint.training import batches as B
from lmsprint.training import checkpoint as ckpt
from lmsprint.training import recovery
from lmsprint.training.api import Callback, TrainingDiverged, TrainResult
from lmsprint.training.best import BestCheckpoint
from lmsprint.training.budget import FixedLength, Timer, clock_text, run_budget
from lmsprint.training.checkpointer import Checkpointer
from lmsprint.training.guard import Guard
from lmsprint.training.memory import GPUOutOfMemory, is_out_of_memory, out_of_memory_error
from lmsprint.training.metrics import MetricsWindow, Stopwatch, graphs_compiled, peak_flops
from lmsprint.training.plan import PlannedRun, epochs_warning
from lmsprint.training.precision import compute_dtype, resolve_precision
from lmsprint.training.report import Report, main_lr
from lmsprint.training.rundir import (
    open_data,
    prepare_run_dir,
    tokenizer_bytes,
)
from lmsprint.training.signals import StopSignal
from lmsprint.training.state import RNGState, TrainState
from lmsprint.training.step import clip_gradients, evaluate_loss, forward_backward
from lmsprint.training.throughput import forget_if_stale


class Trainer:
    """Set up everything a run needs; :meth:`run` trains it.

    Args:
        cfg: the validated run config.
        run_dir: the run directory (created; must not exist unless ``resume``).
        resume: continue from the newest valid checkpoint in ``run_dir``.
        callbacks: test/experiment hooks.
        timer: the wall clock of a ``--train.budget`` run (default: started now).
        planned: the plan of a fresh budgeted run (its measured costs seed the deadline's estimates).
        fresh_optimizer: with ``resume``, continue without the checkpoint's optimizer state (the optimizer as the
            config builds it: how a run changes its optimizer).
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, *, resume: bool = False,
                 callbacks: Sequence[Callback] = (), timer: Timer | None = None,
                 planned: PlannedRun | None = None, fresh_optimizer: bool = False) -> None:
        self.cfg, self.callbacks, t = cfg, list(callbacks), cfg.train
        self.dist = D.setup(t.device)
        self.device, world, is_main = self.dist.device, self.dist.world, self.dist.is_main
        self.run_dir = Path(str(D.broadcast_object(str(run_dir))))  # ranks may have stamped different auto names
        self.ckpt_root = self.run_dir / "checkpoints"
        prepare_run_dir(cfg, self.run_dir, resume=resume, is_main=is_main)
        self.report = Report(self.run_dir, cfg.log, is_main=is_main)
        self.precision = resolve_precision(t.precision, self.device, self.report.line)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left
            torch.backends.cudnn.allow_tf32 = True
            torch.cuda.reset_peak_memory_stats(self.device)  # mem_gb is this run's peak, not an earlier run's

        self.data = open_data(cfg, self.run_dir, is_main=is_main, resume=resume)  # rank 0 prepares, then the others
        self.micro_rows = B.micro_batch_rows(t, world)
        self.accum = t.batch_size // (self.micro_rows * world)
        train_stream = TokenStream(self.data.train)
        self.corpus_tokens = train_stream.n_tokens
        B.check_streams(cfg, train_stream, TokenStream(self.data.val))
        self.total_steps = B.total_steps(cfg, train_stream)

        self.gpt_config = resolve_model_config(cfg.model, vocab_size=self.data.tokenizer.vocab_size,
                                               block_size=cfg.data.seq_len)
        self.model = model = self.build_model()  # unwrapped: what is saved, sampled and exported
        # FlexAttention needs torch.compile to be fast; without it document masks go through SDPA's dense mask
        model.use_flex = self.device.type == "cuda" and t.compile and t.flex_attention and flex_available()
        model.set_sdpa_backend(self.sdpa_backend(t.sdpa_backend))
        model.set_fp8_head(t.fp8_head and self.fp8_head_runs())
        model.set_fused_ce(t.fused_ce)
        if t.compile:
            # Dynamo's state is per process: earlier runs in it (bench, studies, in-process restarts) would count
            # against its recompile limit, past which it silently runs eager. Each run starts afresh (compiled
            # kernels still come from Inductor's on-disk cache).
            torch._dynamo.reset()
            model.compile_blocks()  # per-block compile before DDP/FSDP wrapping (torchtitan's order)
        self._graphs_before = graphs_compiled()  # the summary counts this run's graphs
        # FSDP2 + bf16: bf16 all-gathered weights, fp32 gradient reduction and no autocast (see D.mixed_precision)
        param_dtype, self.amp = D.mixed_precision(cfg.dist.strategy, self.precision, world)
        self.wrapped = D.wrap_model(model, cfg.dist.strategy, self.dist, param_dtype=param_dtype)
        self.sharded = cfg.dist.strategy == "fsdp" and world > 1  # DTensor parameters, DCP checkpoints

        self.optimizer = build_optimizer(model.named_parameters(), cfg.optim, total_steps=self.total_steps,
                                         data_parallel=world > 1)
        self.planned = planned
        self.budget = (run_budget(cfg, total_steps=self.total_steps, corpus_tokens=self.corpus_tokens,
                                  device=self.device, timer=timer or Timer(), cost=planned.cost if planned else None)
                       if t.budget is not None else None)
        """The deadline of a --train.budget run: its lr schedule, with the cool-down started on time."""
        self.length = self.budget if self.budget is not None else FixedLength(self.total_steps)
        """Where the run ends (the budget's end as far as it is known), and what is timed for it."""
        self.scheduler = (LRSchedule(self.optimizer, self.budget) if self.budget is not None else
                          build_schedule(self.optimizer, cfg.schedule, total_steps=self.total_steps,
                                         peak_lr=cfg.optim.lr))
        self.settings = group_settings(self.optimizer)
        """Each group's settings as the config makes them: a resume or rollback restores them over a checkpoint's."""
        self.horizon_wd = ([g["weight_decay"] for g in self.optimizer.param_groups]
                           if cfg.optim.weight_decay_mode == "horizon" else None)
        """Horizon-aware decay of each group, sized for this run's length at lr scale 1."""
        self.scaler = D.grad_scaler(self.device, self.sharded) if self.precision == "fp16" else None

        eot, rank = self.data.tokenizer.eot_id, self.dist.rank
        self.loader = B.build_loader(cfg, train_stream, total_steps=self.total_steps, micro_rows=self.micro_rows,
                                     rank=rank, world=world, pad_id=eot)
        self.batches = B.Prefetcher(self.loader, self.device)
        self.eval_set = B.eval_set(cfg, TokenStream(self.data.val), self.loader, micro_rows=self.micro_rows,
                                   rank=rank, world=world, pad_id=eot, device=self.device)

        self.guard = Guard(cfg.guard)
        self.clock = Stopwatch(self._sync)
        self.state = TrainState(self.clock)
        self.compile_time = 0.0
        self.val_loss: float | None = None
        """The newest evaluation's loss."""
        self.stop = StopSignal(announce=is_main)
        flops_6n = model.flops_per_token(0)  # FLOPs per token = 6N + 12 L C T, T the length attended over
        self.window = MetricsWindow(self.clock, world=world, flops_6n=flops_6n,
                                    flops_per_attended=model.flops_per_token(1) - flops_6n,
                                    peak=peak_flops(self.device, t.peak_tflops) if is_main else None)
        # loss is this rank's share (summed), the norm is global already (averaged), stop votes are counted
        self.stat_weights = torch.tensor([1.0, 1.0 / world, 1.0], device=self.device)
        states = {"scheduler": self.scheduler, "scaler": self.scaler, "loader": self.batches, "guard": self.guard,
                  "rng": RNGState(self.device), "trainer": self.state}
        if self.budget is not None:  # loaded before the scheduler, whose lr it gives
            states = {"budget": self.budget, **states}
        files = {ckpt.TOKENIZER: tokenizer_bytes(self.data.tokenizer)}  # the run's tokenizer: the copy that counts
        self.checkpointer = Checkpointer(self.ckpt_root, model=model, optimizer=self.optimizer, states=states,
                                         info={"config": cfg.to_dict()}, model_config=self.gpt_config,
                                         keep=t.keep_checkpoints, sharded=self.sharded, is_main=is_main,
                                         warn=self.report.line, optimizer_name=cfg.optim.name,
                                         files=files)
        self.fresh_optimizer = fresh_optimizer
        self.best = BestCheckpoint(self.ckpt_root, model=model, model_config=self.gpt_config, sharded=self.sharded,
                                   is_main=is_main, files=files)
        if resume:
            self._resume()

    def sdpa_backend(self, backend: str) -> str:
        """``backend`` where it runs this model's attention here, else ``auto`` (said once, in one line)."""
        g = self.gpt_config
        why = sdpa_backend_runs(backend, device=self.device, dtype=compute_dtype(self.precision), n_head=g.n_head,
                                head_dim=g.head_dim)
        if why is None:
            return backend
        self.report.line(f"warning: --train.sdpa_backend={backend} cannot run here ({why}); using auto")
        return "auto"

    def fp8_head_runs(self) -> bool:
        """Whether the FP8 head (``--train.fp8_head``) runs here; if not, says so once, in one line."""
        why = fp8_linear_runs(self.device, self.gpt_config.n_embd, self.gpt_config.padded_vocab)
        if why is not None:
            self.report.line(f"warning: --train.fp8_head=true cannot run here ({why}); using the regular matmul")
        return why is None

    def build_model(self) -> GPT:
        """The run's model with its initial weights (the same ones at the start and at a rollback to it)."""
        dtype = torch.bfloat16 if self.precision == "bf16-pure" else None  # bf16 weights, fp32 optimizer state
        return build_model(self.gpt_config, device=self.device, seed=self.cfg.train.seed, dtype=dtype)

    # ------------------------------------------------------------------------------------------------------
    # checkpoints: save, resume, roll back

    def save(self) -> Path | None:
        """Checkpoint the current step (every rank takes part; rank 0 writes)."""
        protect = self.state.good_step if self.cfg.guard.enabled else None
        return self.checkpointer.save(self.state.step, protect_step=protect)

    def _resume(self) -> None:
        recovery.resume(self)

    def _rollback(self) -> None:
        recovery.rollback(self)

    # ------------------------------------------------------------------------------------------------------
    # steps

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _forward_backward(self, batch: StepBatch) -> torch.Tensor:
        """Backward passes of every micro-batch; returns this rank's share of the step's mean loss."""
        return forward_backward(self.wrapped, batch, strategy=self.cfg.dist.strategy, amp=self.amp,
                                device=self.device, scaler=self.scaler, on_loss=self._on_loss)

    def _on_loss(self, loss: torch.Tensor) -> torch.Tensor:
        for cb in self.callbacks:
            loss = cb.on_loss(self.state.step, loss)
        return loss

    def _clip(self) -> torch.Tensor:
        t = self.cfg.train
        return clip_gradients(self.model, self.optimizer, self.scaler, clip_norm=t.clip_norm, clip_value=t.clip_value)

    def _host_stats(self, loss: torch.Tensor, norm: torch.Tensor, log_now: bool) -> tuple[float, float, float]:
        """(loss, pre-clip norm, ranks signalled to stop), all-reduced and on the host when the guard or the log
        needs them (NaN and 0 otherwise): every rank gets the same values, so all make the same decisions."""
        if not (self.cfg.guard.enabled or log_now):
            return float("nan"), float("nan"), 0.0
        signalled = torch.full((), float(self.stop.signum is not None), device=self.device)
        stats = D.all_reduce_sum(torch.stack([loss.float(), norm.float(), signalled]) * self.stat_weights)
        loss_value, norm_value, votes = stats.tolist()  # host sync: once per step with the guard on
        self.window.norms.append(norm_value)
        return loss_value, norm_value, votes

    def _judge(self, loss_value: float, norm_value: float) -> str:
        """The guard's decision: ok, skip or rollback (always ok with the guard off)."""
        decision = "ok"
        if self.cfg.guard.enabled:
            decision = self.guard.check(loss_value, norm_value, overflow_expected=self.scaler is not None)
        if self.scaler is not None and decision != "ok":
            self.scaler.update()  # closes the step _clip unscaled (the next unscale_ would raise otherwise)
        if decision == "rollback":
            self.optimizer.zero_grad(set_to_none=True)
        return decision

    def _update(self, step: int, batch: StepBatch, decision: str, loss_value: float, norm_value: float,
                log_now: bool) -> None:
        """Apply (or skip) the update and advance the schedule and the counters by one step."""
        if decision == "ok":
            self.state.good_step = step
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # skips the update if the unscaled gradients overflowed
                self.scaler.update()
                if (self.cfg.guard.enabled or log_now) and not math.isfinite(norm_value):
                    self.report.event("event", event="overflow", step=step, loss_scale=self.scaler.get_scale())
            else:
                self.optimizer.step()
        else:
            self.report.line(f"step {step}: non-finite loss/grad norm ({loss_value:.4g}/{norm_value:.4g}); "
                             "update skipped")
            self.report.event("event", event="skip", step=step, loss=loss_value, grad_norm=norm_value)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        self.state.tokens_seen += batch.n_tokens
        self.window.add(batch)

    def evaluate(self) -> float:
        """Mean loss over the fixed validation tokens (all ranks)."""
        return evaluate_loss(self.wrapped, self.eval_set, amp=self.amp, device=self.device)

    def _warmup_compile(self, batch: StepBatch) -> None:
        """Compile the training and evaluation graphs before the clock starts (gradients thrown away)."""
        t0 = time.perf_counter()
        self._forward_backward(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.evaluate()
        self._sync()
        self.compile_time = time.perf_counter() - t0
        self.report.line(f"compiled in {self.compile_time:.1f}s")
        self.report.event("event", event="compiled", seconds=self.compile_time)

    # ------------------------------------------------------------------------------------------------------
    # what the loop reports

    def _log_start(self) -> None:
        t, cfg = self.cfg.train, self.cfg
        self.report.event("config", step=self.state.step, config=cfg.to_dict(), model=asdict(self.gpt_config),
                          params=self.model.num_params(), world=self.dist.world, device=str(self.device),
                          precision=self.precision, total_steps=self.total_steps, accum=self.accum,
                          micro_batch=self.micro_rows, torch=torch.__version__, optimizer=describe(self.optimizer))
        if self.planned is not None:
            self.report.event("plan", **self.planned.record())
        self.report.line(f"model {self.model.num_params() / 1e6:.2f}M params | {self.total_steps} steps of "
                         f"{t.batch_size}x{cfg.data.seq_len} tokens | {self.device} {self.precision} | run "
                         f"{self.run_dir}")
        warning = epochs_warning(tokens=self.total_steps * t.batch_size * cfg.data.seq_len,
                                 corpus_tokens=self.corpus_tokens, max_epochs=t.max_epochs)
        if warning and self.budget is None:
            self.report.line(warning)

    def _log_train(self, loss_value: float, norm_value: float, seq_len: int) -> None:
        self.clock.lap()
        w = self.window.stats()
        record = {"step": self.state.step, "loss": loss_value, "lr": main_lr(self.optimizer), "grad_norm": norm_value,
                  "grad_norms": w.pop("grad_norms"), "tokens": self.state.tokens_seen, "time": self.clock.total,
                  "tokens_per_s": w.pop("tokens_per_s"), "seq_len": seq_len, "waste": w.pop("waste"),
                  "tokens_per_row": w.pop("tokens_per_row"), "skipped": self.guard.bad_total, **w}
        if self.device.type == "cuda":
            record["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.scaler is not None:
            record["loss_scale"] = self.scaler.get_scale()
        self.report.train(record)

    def _eval_and_log(self, last_loss: float | None) -> bool:
        """Evaluate (off the clock) and log it; True when a callback ends the run here."""
        st = self.state
        with self.clock.paused(), self.length.paused("eval"):
            self.val_loss = val_loss = self.evaluate()
            self.best.update(st.step, val_loss)
            st.val_history.append((st.step, val_loss))
            self.report.val(step=st.step, loss=val_loss, tokens=st.tokens_seen, time=self.clock.total,
                            last_loss=last_loss)
            return any(cb.on_eval(st.step, val_loss) for cb in self.callbacks)

    def _finish(self, last_loss: float | None) -> TrainResult:
        st, guard, val_loss, best = self.state, self.guard, self.val_loss, self.best
        timing = self.budget.timing() if self.budget is not None else {}
        if self.budget is not None and self.planned is not None and self.dist.is_main:
            stale = forget_if_stale(self.planned.cost, rows=self.cfg.train.batch_size,
                                    measured=self.budget.step_seconds(), device=self.device)
            if stale is not None:
                self.report.line(stale)
        self.report.summary(step=st.step, train_loss=last_loss, val_loss=val_loss, train_time=st.train_time,
                            compile_time=self.compile_time, skipped=guard.bad_total, rollbacks=guard.rollbacks,
                            spikes=guard.spikes, tokens=st.tokens_seen, graphs=graphs_compiled() - self._graphs_before,
                            best_step=best.step, best_val_loss=best.loss if best.step is not None else None, **timing)
        stopped = self.stop.signum is not None and st.step < self.length.end  # (a signal on the last step: done)
        return TrainResult(run_dir=self.run_dir, step=st.step, train_loss=last_loss, val_loss=val_loss,
                           interrupted=stopped, skipped_steps=guard.bad_total, rollbacks=guard.rollbacks,
                           train_time=st.train_time, compile_time=self.compile_time,
                           val_history=list(st.val_history), stop_signal=self.stop.signum if stopped else None,
                           best_step=best.step, best_val_loss=best.loss if best.step is not None else None,
                           budget=self.budget.seconds if self.budget is not None else None,
                           budget_before=self.budget.used_before if self.budget is not None else 0.0,
                           expected=self.planned.plan.expected if self.planned is not None else None)

    # ------------------------------------------------------------------------------------------------------
    # the loop

    def run(self) -> TrainResult:
        """Train to the end (or to a stop signal, or --train.stop_at_step).

        Out of GPU memory, the cost of a training row is measured and :class:`GPUOutOfMemory` raised, naming the
        --train.micro_batch_size that fits.
        """
        try:
            return self._run()
        except RuntimeError as e:
            if not is_out_of_memory(e, self.device):
                raise
        # outside the except block: the traceback, and the activations its frames hold, are released
        has_ckpt = bool(ckpt.list_checkpoints(self.ckpt_root))
        raise out_of_memory_error(self.model, self.optimizer, batch_size=self.cfg.train.batch_size,
                                  micro_rows=self.micro_rows, seq_len=self.cfg.data.seq_len, precision=self.precision,
                                  amp=self.amp, world=self.dist.world, device=self.device,
                                  resume_dir=self.run_dir if has_ckpt else None) from None

    def _run(self) -> TrainResult:
        t, st = self.cfg.train, self.state
        self._log_start()
        first = self.batches.prefetch(st.step)
        if t.compile:
            self._warmup_compile(first)
        last_loss: float | None = None
        first_step = st.step
        self.val_loss = st.val_history[-1][1] if st.val_history else None
        # SIGINT/SIGTERM: stop at the end of the step, checkpointed
        with self.stop, self.report.progress(self.length.expected_end, st.step) as bar:
            self.clock.start()
            self.window.reset()
            self.length.start()
            while st.step < self.length.end:
                step = st.step
                batch = self.batches.take(step)
                loss = self._forward_backward(batch)
                for cb in self.callbacks:
                    cb.on_grads(step, self.model)
                norm = self._clip()
                self.batches.prefetch(step + 1)  # the next batch is built while the device works on this one
                log_now = (step + 1) % t.log_every == 0 or step + 1 == self.length.end
                loss_value, norm_value, stop_votes = self._host_stats(loss, norm, log_now)
                decision = self._judge(loss_value, norm_value)
                if decision == "rollback":
                    self._rollback()
                    bar.n = st.step
                    continue
                self._update(step, batch, decision, loss_value, norm_value, log_now)
                if self.length.step_done(st.step):
                    self._cooldown_changed(bar)
                if st.step == first_step + 1 and self.report.metrics:  # launch-to-first-step is measured from this
                    self._sync()
                    self.report.event("event", event="first_step", step=st.step, wall=time.time())
                if math.isfinite(loss_value):
                    last_loss = loss_value
                # stop_at_step ends the run early (evaluated and checkpointed) on a schedule over total_steps
                end = st.step == self.length.end or st.step == t.stop_at_step
                if log_now:
                    self._log_train(loss_value, norm_value, batch.seq_len)
                if (t.eval_every and st.step % t.eval_every == 0) or end:
                    end = self._eval_and_log(last_loss) or end
                # several processes stop only on a step whose stats were all-reduced (each step with the guard on)
                stop = self.stop.agreed(stop_votes, self.dist.world)
                if (t.ckpt_every and st.step % t.ckpt_every == 0) or end or stop:
                    with self.clock.paused(), self.length.paused("save"):
                        self.save()
                bar.update(1)
                if end or stop:
                    self.report.stopped(st.step, self.length.expected_end, by_signal=not end)
                    break
        return self._finish(last_loss)

    def _cooldown_changed(self, bar: Any) -> None:
        """The budget started (or re-fitted) the cool-down after this step: set this step's lr again and say so."""
        b, st = self.budget, self.state
        assert b is not None and b.cooldown is not None
        self.scheduler.load_state_dict(self.scheduler.state_dict())  # the lr of the step about to run
        bar.total = b.end
        left = b.seconds - b.used()
        self.report.line(f"cool-down: steps {st.step}-{b.end} ({clock_text(left)} of the budget left)")
        self.report.event("event", event="cooldown", step=st.step, end=b.end, left=b.cooldown.left, seconds_left=left)


__all__ = ["Callback", "GPUOutOfMemory", "TrainResult", "Trainer", "TrainingDiverged"]
