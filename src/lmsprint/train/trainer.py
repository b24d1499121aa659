"""The training loop: composes data, model, optimizer, schedule, precision, guard, checkpoints and metrics.

One process per GPU (torchrun) or a single process; the same loop either way. The hot loop synchronises with
the device once per optimizer step, to read the loss and gradient norm the guard needs (and not at all
when the guard is off, except on log steps).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmsprint import distributed as D
from lmsprint.config import RunConfig, build_config, load_toml, to_toml, validate
from lmsprint.data.batching import TokenStream, epoch_plan
from lmsprint.data.curriculum import SeqLenSchedule
from lmsprint.data.loader import Loader, MicroBatch, StepBatch, eval_batches
from lmsprint.data.prepare import PreparedData, prepared_data
from lmsprint.errors import CheckpointError, ConfigError, LmsprintError
from lmsprint.model import GPT, resolve_model_config
from lmsprint.model.layers import flex_available
from lmsprint.optim import build_optimizer
from lmsprint.schedules import build_schedule
from lmsprint.train import checkpoint as ckpt
from lmsprint.train.guard import Guard
from lmsprint.train.metrics import MetricsLog, peak_flops


class TrainingDiverged(LmsprintError):
    """The guard rolled back more often than allowed."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float | None
    val_loss: float | None
    interrupted: bool = False
    skipped_steps: int = 0
    rollbacks: int = 0
    train_time: float = 0.0
    compile_time: float = 0.0
    val_history: list[tuple[int, float]] = field(default_factory=list)


class Callback:
    """Hooks for tests and experiments; the defaults do nothing."""

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Called with each micro-step's loss before backward; may return a different loss."""
        return loss

    def on_grads(self, step: int, model: torch.nn.Module) -> None:
        """Called after the backward passes of a step, before clipping and the update."""

    def on_eval(self, step: int, val_loss: float) -> bool:
        """Called after each evaluation; return True to end the run there (it is checkpointed)."""
        return False


def resolve_precision(precision: str, device: torch.device, warn: Callable[[str], None]) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda" and precision in ("bf16", "bf16-pure") and not torch.cuda.is_bf16_supported():
        warn(f"warning: this GPU has no bf16; using fp16 with loss scaling instead of {precision}")
        return "fp16"
    return precision


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def new_run_dir(cfg: RunConfig) -> Path:
    name = cfg.train.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.train.out_dir) / name


class Trainer:
    """Set up everything a run needs; :meth:`run` trains it.

    Args:
        cfg: the validated run config.
        run_dir: the run directory (created; must not exist unless ``resume``).
        resume: continue from the newest valid checkpoint in ``run_dir``.
        callbacks: test/experiment hooks.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, *, resume: bool = False,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.dist = D.setup(cfg.train.device)
        self.device = self.dist.device
        self.run_dir = run_dir
        self.ckpt_root = run_dir / "checkpoints"
        t, d = cfg.train, cfg.data
        self._prepare_run_dir(resume)
        self.precision = resolve_precision(t.precision, self.device, self.log_line)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left
            torch.backends.cudnn.allow_tf32 = True

        # data: rank 0 prepares (once, cached), the others wait and open it
        self.data = self._open_data()
        self.train_stream = TokenStream(self.data.train)
        self.val_stream = TokenStream(self.data.val)
        world = self.dist.world
        micro = t.micro_batch_size or max(1, t.batch_size // world)
        if t.batch_size % (micro * world) != 0:
            raise ConfigError(f"--train.batch_size={t.batch_size} is not divisible by --train.micro_batch_size="
                              f"{micro} x {world} processes; pick sizes with batch = micro x processes x k")
        self.micro_rows = micro
        self.accum = t.batch_size // (micro * world)
        self.total_steps = self._total_steps()

        # model
        self.gpt_config = resolve_model_config(cfg.model, vocab_size=self.data.tokenizer.vocab_size,
                                               block_size=d.seq_len)
        model = GPT(self.gpt_config).to(self.device)
        model.init_weights(seed=t.seed)
        # FlexAttention needs torch.compile to be fast; without it document masks go through SDPA's dense mask
        model.use_flex = self.device.type == "cuda" and t.compile and flex_available()
        if self.precision == "bf16-pure":
            model.to(torch.bfloat16)
        self.model = model  # unwrapped: what is saved, sampled and exported
        if t.compile:
            model.compile_blocks()
        self.wrapped = D.wrap_model(model, cfg.dist.strategy, self.dist,
                                    param_dtype=torch.bfloat16 if self.precision == "bf16" else None)

        # optimizer, schedule, loss scaling
        self.optimizer = build_optimizer(model.named_parameters(), cfg.optim, total_steps=self.total_steps)
        self.scheduler = build_schedule(self.optimizer, cfg.schedule, total_steps=self.total_steps,
                                        peak_lr=cfg.optim.lr)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

        # batches
        curriculum = None
        if d.seq_schedule != "none" or d.short_mix > 0:
            curriculum = SeqLenSchedule(d.seq_schedule, d.seq_len, d.seq_start, self.total_steps,
                                        warmup=d.seq_warmup, milestones=tuple(d.seq_milestones),
                                        multiple=d.seq_multiple, tokens_per_step=t.batch_size * d.seq_len,
                                        short_mix=d.short_mix)
        self.loader = Loader(self.train_stream, strategy=d.batching, seq_len=d.seq_len, batch_rows=t.batch_size,
                             micro_rows=micro, rank=self.dist.rank, world=world, seed=t.seed, doc_mask=d.doc_mask,
                             curriculum=curriculum, pad_multiple=d.pad_multiple, bucket_window=d.bucket_window,
                             pad_id=self.data.tokenizer.eot_id)
        self.eval_set = eval_batches(self.val_stream, seq_len=d.seq_len, micro_rows=micro, max_tokens=t.eval_tokens,
                                     rank=self.dist.rank, world=world, masked=self.loader.masked,
                                     doc_mask=d.doc_mask, pad_id=self.data.tokenizer.eot_id)

        self.guard = Guard(cfg.guard)
        self.step = 0
        self.tokens_seen = 0
        self.train_time = 0.0
        self.compile_time = 0.0
        self.lr_scale = 1.0
        self.val_history: list[tuple[int, float]] = []
        self.flops_per_token = model.flops_per_token(d.seq_len)
        self.peak = peak_flops(self.device, t.peak_tflops) if self.dist.is_main else None
        self._stop_signal: int | None = None
        if resume:
            self._resume()

    # ------------------------------------------------------------------------------------------------------
    # setup helpers

    def log_line(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message)

    def _prepare_run_dir(self, resume: bool) -> None:
        if resume:
            if not (self.run_dir / "config.toml").exists():
                raise CheckpointError(f"no run to resume at {self.run_dir}; start it without --resume")
        elif self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise ConfigError(f"run directory {self.run_dir} already exists; pass --resume to continue it or choose "
                              "another --train.run_name")
        D.barrier()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(self.ckpt_root)
            tmp = self.run_dir / "config.toml.tmp"
            tmp.write_text(to_toml(self.cfg))
            os.replace(tmp, self.run_dir / "config.toml")
        D.barrier()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", tensorboard=self.cfg.log.tensorboard) \
            if self.dist.is_main else None

    def _open_data(self) -> PreparedData:
        d = self.cfg.data

        def open_it() -> PreparedData:
            return prepared_data(d.source, tokenizer=d.tokenizer, vocab_size=d.vocab_size, val_source=d.val_source,
                                 val_fraction=d.val_fraction, text_docs=d.text_docs, cache_dir=d.cache_dir,
                                 workers=d.workers, progress=self.cfg.log.progress and self.dist.is_main)

        if self.dist.is_main:
            data = open_it()
        D.barrier()
        if not self.dist.is_main:
            data = open_it()
        if self.dist.is_main:
            tok_path = self.run_dir / "tokenizer.json"
            data.tokenizer.save(tok_path)
        return data

    def _total_steps(self) -> int:
        t, d = self.cfg.train, self.cfg.data
        if t.epochs is None:
            return t.steps
        rows = epoch_plan(self.train_stream, d.batching, d.seq_len, seed=t.seed, epoch=0, batch_rows=t.batch_size,
                          bucket_window=d.bucket_window).n_rows
        return max(1, math.ceil(t.epochs * rows / t.batch_size))

    # ------------------------------------------------------------------------------------------------------
    # state

    def _state(self, loader_state: dict[str, int]) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loader": loader_state,
            "guard": self.guard.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
            "trainer": {"step": self.step, "tokens_seen": self.tokens_seen, "train_time": self.train_time,
                        "lr_scale": self.lr_scale, "val_history": self.val_history},
            "config": self.cfg.to_dict(),
        }

    def save(self, loader_state: dict[str, int]) -> Path | None:
        """Checkpoint the current step (rank 0 writes; every rank waits for it)."""
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, model_sd=ckpt.model_state(self.model),
                                        state=self._state(loader_state), model_config=self.gpt_config,
                                        keep=self.cfg.train.keep_checkpoints)
        D.barrier()
        return path

    def _load(self, path: Path, *, rollback: bool) -> None:
        meta, weights, state = ckpt.load_checkpoint(path)
        if meta["model_config"] != asdict(self.gpt_config):
            raise CheckpointError(f"checkpoint {path} holds a different model shape than the run's config; resume "
                                  "with the settings the run was started with")
        ckpt.load_model_state(self.model, {k: v.to(self.device) for k, v in weights.items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        tr = state["trainer"]
        self.step, self.tokens_seen = int(tr["step"]), int(tr["tokens_seen"])
        self.val_history = [tuple(v) for v in tr["val_history"]]  # type: ignore[misc]
        if rollback:
            # keep the guard's counters and the lr scale; rescale the restored peaks to the current scale
            self._rescale_lr(self.lr_scale / float(tr["lr_scale"]))
            self.guard.ema, self.guard.seen = state["guard"]["ema"], state["guard"]["seen"]
        else:
            self.train_time = float(tr["train_time"])
            self.lr_scale = float(tr["lr_scale"])
            self.guard.load_state_dict(state["guard"])
            rng = state["rng"]
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if self.device.type == "cuda" and rng["cuda"]:
                torch.cuda.set_rng_state_all(rng["cuda"])

    def _rescale_lr(self, factor: float) -> None:
        if factor != 1.0:
            for group in self.optimizer.param_groups:
                group["initial_lr"] *= factor
            self.scheduler.load_state_dict(self.scheduler.state_dict())  # re-applies the lr of the current step

    def _resume(self) -> None:
        path = ckpt.latest_valid(self.ckpt_root, warn=self.log_line)
        if path is None:
            raise CheckpointError(f"no valid checkpoint in {self.ckpt_root} to resume from; start the run again "
                                  "without --resume (in a new directory)")
        self._load(path, rollback=False)
        self.log_line(f"resumed from {path} at step {self.step}")
        if self.metrics:
            self.metrics.write("event", event="resume", step=self.step, checkpoint=str(path))

    def _rollback(self) -> None:
        self.guard.after_rollback()
        g = self.cfg.guard
        if self.guard.rollbacks > g.max_rollbacks:
            raise TrainingDiverged(f"training diverged: more than {g.max_rollbacks} rollbacks; lower --optim.lr, "
                                   "enable --train.clip_norm or raise --guard.max_rollbacks")
        self.lr_scale *= g.rollback_lr_factor
        path = ckpt.latest_valid(self.ckpt_root, warn=self.log_line)
        if path is not None:
            self._load(path, rollback=True)
        else:  # nothing saved yet: back to the initial state
            self.model.init_weights(seed=self.cfg.train.seed)
            if self.precision == "bf16-pure":
                self.model.to(torch.bfloat16)
            self.optimizer.state.clear()
            self.scheduler.load_state_dict({"last_epoch": 0})
            self._rescale_lr(g.rollback_lr_factor)
            self.loader.load_state_dict({"epoch": 0, "pos": 0, "seed": self.loader.seed})
            self.step, self.tokens_seen = 0, 0
        if g.rollback_reseed:
            self.loader.reseed(self.cfg.train.seed + 1000 * self.guard.rollbacks)
        message = (f"rollback #{self.guard.rollbacks} to step {self.step} ({path or 'initial weights'}); lr scale "
                   f"{self.lr_scale:g}{', data reshuffled' if g.rollback_reseed else ''}")
        self.log_line(message)
        if self.metrics:
            self.metrics.write("event", event="rollback", step=self.step, checkpoint=str(path or ""),
                               lr_scale=self.lr_scale, rollbacks=self.guard.rollbacks)

    # ------------------------------------------------------------------------------------------------------
    # steps

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _forward_backward(self, batch: StepBatch) -> torch.Tensor:
        """Backward passes of every micro-batch; returns this rank's share of the step's mean loss."""
        scale = self.dist.world / max(batch.n_targets, 1)  # DDP averages gradients over ranks
        total = torch.zeros((), device=self.device)
        n = len(batch.micro)
        for i, mb in enumerate(batch.micro):
            with D.no_grad_sync(self.wrapped, self.cfg.dist.strategy, enabled=i < n - 1):
                with _autocast(self.precision, self.device):
                    loss_sum = self.wrapped(mb.inputs, mb.targets, pos=mb.pos, doc_ids=mb.doc_ids, reduction="sum")
                loss = loss_sum.float() * scale
                for cb in self.callbacks:
                    loss = cb.on_loss(self.step, loss)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                total += loss.detach()
        return total / self.dist.world

    def _clip(self) -> torch.Tensor:
        """Clip (by norm and/or by value) and return the global gradient norm before clipping."""
        t = self.cfg.train
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, t.clip_norm if t.clip_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        if t.clip_value > 0:
            torch.nn.utils.clip_grad_value_(params, t.clip_value)
        return norm

    def evaluate(self) -> float:
        """Mean loss over the fixed validation tokens (all ranks)."""
        self.wrapped.eval()
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        with torch.no_grad():
            for mb in self.eval_set:
                mb = mb.to(self.device)
                with _autocast(self.precision, self.device):
                    loss = self.wrapped(mb.inputs, mb.targets, pos=mb.pos, doc_ids=mb.doc_ids, reduction="sum")
                total[0] += loss.double()
                total[1] += (mb.targets != -100).sum()
        D.all_reduce_sum(total)
        self.wrapped.train()
        return float(total[0] / total[1].clamp(min=1))

    def _warmup_compile(self, batch: StepBatch) -> None:
        """Compile the training and evaluation graphs before the clock starts (gradients thrown away)."""
        t0 = time.perf_counter()
        self._forward_backward(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.evaluate()
        self._sync()
        self.compile_time = time.perf_counter() - t0
        self.log_line(f"compiled in {self.compile_time:.1f}s")
        if self.metrics:
            self.metrics.write("event", event="compiled", seconds=self.compile_time)

    def _install_signals(self) -> Callable[[], None]:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:  # second signal: stop now
                signal.signal(signum, signal.SIG_DFL)
                raise KeyboardInterrupt
            self._stop_signal = signum
            self.log_line("stopping: checkpointing at the end of this step (signal again to stop at once)")

        try:
            for s in previous:
                signal.signal(s, handler)
        except ValueError:  # not the main thread
            return lambda: None

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h)

        return restore

    # ------------------------------------------------------------------------------------------------------
    # the loop

    def run(self) -> TrainResult:
        t, cfg = self.cfg.train, self.cfg
        is_main = self.dist.is_main
        if is_main and self.metrics:
            self.metrics.write("config", step=self.step, config=cfg.to_dict(), model=asdict(self.gpt_config),
                               params=self.model.num_params(), world=self.dist.world, device=str(self.device),
                               precision=self.precision, total_steps=self.total_steps, accum=self.accum,
                               micro_batch=self.micro_rows, torch=torch.__version__,
                               optimizer=type(self.optimizer).__name__)
        self.log_line(f"model {self.model.num_params() / 1e6:.2f}M params | {self.total_steps} steps of "
                      f"{t.batch_size}x{cfg.data.seq_len} tokens | {self.device} {self.precision} | run {self.run_dir}")
        loader_state = self.loader.state_dict()
        batch = self.loader.next(self.step)
        micro = [mb.to(self.device) for mb in batch.micro]
        if t.compile:
            self._warmup_compile(StepBatch(micro, batch.n_targets, batch.n_tokens, batch.seq_len, batch.sequences))
        restore_signals = self._install_signals()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (cfg.log.progress and is_main))
        last_loss: float | None = None
        val_loss: float | None = self.val_history[-1][1] if self.val_history else None
        log_time, log_tokens, log_slots = 0.0, 0, 0
        self._sync()
        t_mark = time.perf_counter()
        try:
            while self.step < self.total_steps:
                step = self.step
                dev_batch = StepBatch(micro, batch.n_targets, batch.n_tokens, batch.seq_len, batch.sequences)
                loss = self._forward_backward(dev_batch)
                for cb in self.callbacks:
                    cb.on_grads(step, self.model)
                norm = self._clip()
                # the next batch is built while the device works on this one
                next_state = self.loader.state_dict()
                next_batch = self.loader.next(step + 1)
                next_micro = [mb.to(self.device) for mb in next_batch.micro]
                log_now = (step + 1) % t.log_every == 0 or step + 1 == self.total_steps
                decision = "ok"
                loss_value = norm_value = float("nan")
                if cfg.guard.enabled or log_now:
                    stats = D.all_reduce_sum(torch.stack([loss.float(), norm.float()]) *
                                             torch.tensor([1.0, 1.0 / self.dist.world], device=self.device))
                    loss_value, norm_value = stats.tolist()  # host sync: once per step with the guard on
                    if cfg.guard.enabled:
                        decision = self.guard.check(loss_value, norm_value, overflow_expected=self.scaler is not None)
                if decision == "rollback":
                    self.optimizer.zero_grad(set_to_none=True)
                    self._rollback()
                    batch = self.loader.next(self.step)
                    micro = [mb.to(self.device) for mb in batch.micro]
                    bar.n = self.step
                    continue
                if decision == "ok":
                    if self.scaler is not None:
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        self.optimizer.step()
                else:
                    self.log_line(f"step {step}: non-finite loss/grad norm ({loss_value:.4g}/{norm_value:.4g}); "
                                  "update skipped")
                    if self.metrics:
                        self.metrics.write("event", event="skip", step=step, loss=loss_value, grad_norm=norm_value)
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                self.tokens_seen += batch.n_tokens
                log_tokens += batch.n_tokens
                log_slots += sum(mb.inputs.numel() for mb in batch.micro) * self.dist.world
                batch, micro, loader_state = next_batch, next_micro, next_state
                if math.isfinite(loss_value):
                    last_loss = loss_value

                end = self.step == self.total_steps
                if log_now:
                    self._sync()
                    now = time.perf_counter()
                    self.train_time += now - t_mark
                    log_time += now - t_mark
                    t_mark = now
                    dt = max(log_time, 1e-9)
                    record = {"step": self.step, "loss": loss_value, "lr": self._main_lr(),
                              "grad_norm": norm_value, "tokens": self.tokens_seen, "time": self.train_time,
                              "tokens_per_s": log_tokens / dt, "seq_len": batch.seq_len,
                              "waste": 1.0 - log_tokens / max(log_slots, 1),
                              "tokens_per_row": log_tokens / max(log_slots, 1) * self.cfg.data.seq_len,
                              "skipped": self.guard.bad_total}
                    if self.peak:
                        record["mfu"] = log_slots / dt * self.flops_per_token / self.peak
                    if self.device.type == "cuda":
                        record["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    if self.scaler is not None:
                        record["loss_scale"] = self.scaler.get_scale()
                    if self.metrics:
                        self.metrics.write("train", **record)
                    bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{log_tokens / dt:,.0f}", refresh=False)
                    log_time, log_tokens, log_slots = 0.0, 0, 0
                if (t.eval_every and self.step % t.eval_every == 0) or end:
                    self._sync()
                    log_time += time.perf_counter() - t_mark
                    self.train_time += time.perf_counter() - t_mark
                    val_loss = self.evaluate()
                    self.val_history.append((self.step, val_loss))
                    if self.metrics:
                        self.metrics.write("val", step=self.step, loss=val_loss, tokens=self.tokens_seen,
                                           time=self.train_time)
                    bar.set_postfix(loss=f"{last_loss or float('nan'):.3f}", val=f"{val_loss:.3f}", refresh=False)
                    if any(cb.on_eval(self.step, val_loss) for cb in self.callbacks):
                        end = True
                    t_mark = time.perf_counter()
                stop = self._stop_signal is not None
                if (t.ckpt_every and self.step % t.ckpt_every == 0) or end or stop:
                    self._sync()
                    log_time += time.perf_counter() - t_mark
                    self.train_time += time.perf_counter() - t_mark
                    self.save(loader_state)
                    t_mark = time.perf_counter()
                bar.update(1)
                if end:
                    break
                if stop:
                    self.log_line(f"stopped by signal at step {self.step}; resume with --resume")
                    if self.metrics:
                        self.metrics.write("event", event="interrupted", step=self.step)
                    break
        finally:
            bar.close()
            restore_signals()
        if is_main and self.metrics:
            from torch._dynamo.utils import counters

            self.metrics.write("summary", step=self.step, train_loss=last_loss, val_loss=val_loss,
                               train_time=self.train_time, compile_time=self.compile_time,
                               skipped=self.guard.bad_total, rollbacks=self.guard.rollbacks,
                               spikes=self.guard.spikes, tokens=self.tokens_seen,
                               graphs=int(counters["stats"]["unique_graphs"]))
            self.metrics.close()
            if cfg.log.plot:
                from lmsprint.plots import plot_run

                plot_run(self.run_dir)
        return TrainResult(self.run_dir, self.step, last_loss, val_loss, self._stop_signal is not None,
                           self.guard.bad_total, self.guard.rollbacks, self.train_time, self.compile_time,
                           list(self.val_history))

    def _main_lr(self) -> float:
        for group in self.optimizer.param_groups:
            if group.get("role") == "matrix":
                return float(group["lr"])
        return float(self.optimizer.param_groups[0]["lr"])


def train(cfg: RunConfig, *, run_dir: str | Path | None = None, resume: bool = False,
          callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train a run from a config (the Python form of ``lmsprint train``)."""
    validate(cfg)
    path = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    trainer = Trainer(cfg, path, resume=resume, callbacks=callbacks)
    try:
        return trainer.run()
    finally:
        D.teardown()


def resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The saved config of a run, with command-line overrides on top (e.g. more --train.steps)."""
    path = run_dir / "config.toml"
    if not path.exists():
        raise CheckpointError(f"no run to resume at {run_dir} (no config.toml); check the path")
    cfg = build_config(str(path), overrides)
    saved = RunConfig.from_dict(load_toml(str(path)), where=str(path))
    if cfg.model != saved.model or cfg.data.seq_len != saved.data.seq_len:
        raise ConfigError("resume cannot change the model shape (--model.*, --data.seq_len); start a new run instead")
    return cfg


__all__ = ["Callback", "MicroBatch", "TrainResult", "Trainer", "TrainingDiverged", "resume_config", "train"]
