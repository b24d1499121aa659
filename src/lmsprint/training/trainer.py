"""The training loop: composes data, model, optimizer, schedule, precision, guard, checkpoints and metrics.

One process per GPU (torchrun) or a single process; the same loop either way. The hot loop synchronises with
the device once per optimizer step, to read the loss and gradient norm the guard needs (and not at all
when the guard is off, except on log steps).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
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
from lmsprint.data.tokenizer import load_tokenizer
from lmsprint.errors import CheckpointError, ConfigError, LmsprintError
from lmsprint.model import GPT, IGNORE_INDEX, resolve_model_config
from lmsprint.model.layers import flex_available
from lmsprint.optim import build_optimizer, describe
from lmsprint.schedules import build_schedule
from lmsprint.training import checkpoint as ckpt
from lmsprint.training.guard import Guard
from lmsprint.training.metrics import MetricsLog, peak_flops


class TrainingDiverged(LmsprintError):
    """The guard rolled back more often than allowed."""


class GPUOutOfMemory(LmsprintError):
    """The GPU ran out of memory; the message names the micro-batch that fits."""


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
    stop_signal: int | None = None
    """The signal (SIGINT, SIGTERM) that stopped the run early, if one did."""


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


def precision_unsupported(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` cannot run on ``device`` with this torch build, or None when it can.

    Probed rather than assumed: torch disables autocast with a warning for a dtype a device lacks, and
    GradScaler disables itself on a device it does not support (torch 2.13's CPU supports all four modes).
    """
    if precision not in ("bf16", "fp16", "bf16-pure"):
        return None
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if precision in ("bf16", "fp16"):
            if not torch.amp.is_autocast_available(device.type):
                return f"torch {torch.__version__} has no autocast on {device.type}"
            with torch.autocast(device.type, dtype=dtype):
                pass
            if caught:
                return f"autocast on {device.type} does not support {dtype}"
        if precision == "fp16" and not torch.amp.GradScaler(device.type).is_enabled():
            return f"torch.amp.GradScaler does not run on {device.type}"
    try:
        torch.ones(2, dtype=dtype, device=device).sum()
    except RuntimeError:
        return f"{device.type} has no {dtype} tensors"
    return None


def resolve_precision(precision: str, device: torch.device, warn: Callable[[str], None]) -> str:
    """The precision a run uses: ``auto`` resolved, and an unsupported mode replaced (with one warning)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda" and precision in ("bf16", "bf16-pure") and not torch.cuda.is_bf16_supported():
        warn(f"warning: this GPU has no bf16; using fp16 with loss scaling instead of {precision}")
        precision = "fp16"
    reason = precision_unsupported(precision, device)
    if reason is not None:
        warn(f"warning: --train.precision={precision} is not available here ({reason}); training in fp32")
        return "fp32"
    return precision


def suggest_micro_batch(bytes_per_row: float, fixed_bytes: float, total_bytes: float, batch_rows: int, *,
                        current: int | None = None, margin: float = 0.9) -> tuple[int, int]:
    """How many rows fit on a GPU, and the micro-batch to use: (rows, micro-batch; 0 when not even one fits).

    Args:
        bytes_per_row: memory one more row of the micro-batch takes (activations), measured.
        fixed_bytes: memory that does not grow with the micro-batch (weights, gradients, optimizer state).
        total_bytes: memory the process can use.
        batch_rows: rows per optimizer step on this GPU; the micro-batch must divide it.
        current: the micro-batch that ran out of memory; the suggestion is smaller.
        margin: fraction of ``total_bytes`` to plan for (the allocator's fragmentation, workspaces).
    """
    usable = total_bytes * margin - fixed_bytes
    if math.isinf(bytes_per_row) or usable <= 0:
        rows = 0 if math.isinf(fixed_bytes) or usable <= 0 else 1
    else:
        rows = int(usable // bytes_per_row) if bytes_per_row > 0 else batch_rows
    limit = min(rows, batch_rows, current - 1 if current else batch_rows)
    micro = max((m for m in range(1, limit + 1) if batch_rows % m == 0), default=0)
    return rows, micro


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def _end_last_line(path: Path) -> None:
    """End a metrics file cut short mid-line by a crash, so the next record starts on a line of its own."""
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def micro_batch_rows(t: Any, world: int) -> int:
    """Rows per forward pass on each of ``world`` processes (ConfigError when the batch does not split)."""
    micro = t.micro_batch_size or max(1, t.batch_size // world)
    if t.batch_size % (micro * world) != 0:
        raise ConfigError(f"--train.batch_size={t.batch_size} is not divisible by --train.micro_batch_size="
                          f"{micro} x {world} processes; pick sizes with batch = micro x processes x k")
    return micro


def new_run_dir(cfg: RunConfig) -> Path:
    name = cfg.train.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.train.out_dir).expanduser() / name  # ~ expanded, as in --data.source


def _graphs_compiled() -> int:
    """Graphs torch.compile has made in this process (0 without importing Dynamo when nothing was compiled)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


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
        self.run_dir = Path(str(D.broadcast_object(str(run_dir))))  # ranks may have stamped different auto names
        self.ckpt_root = self.run_dir / "checkpoints"
        t, d = cfg.train, cfg.data
        self._prepare_run_dir(resume)
        self.precision = resolve_precision(t.precision, self.device, self.log_line)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left
            torch.backends.cudnn.allow_tf32 = True
            torch.cuda.reset_peak_memory_stats(self.device)  # mem_gb is this run's peak, not an earlier run's

        # data: rank 0 prepares (once, cached), the others wait and open it
        self.data = self._open_data()
        self.train_stream = TokenStream(self.data.train)
        self.val_stream = TokenStream(self.data.val)
        world = self.dist.world
        micro = micro_batch_rows(t, world)
        self.micro_rows = micro
        self.accum = t.batch_size // (micro * world)
        self.total_steps = self._total_steps()

        # model
        self.gpt_config = resolve_model_config(cfg.model, vocab_size=self.data.tokenizer.vocab_size,
                                               block_size=d.seq_len)
        model = GPT(self.gpt_config).to(self.device)
        model.init_weights(seed=t.seed)
        # FlexAttention needs torch.compile to be fast; without it document masks go through SDPA's dense mask
        model.use_flex = self.device.type == "cuda" and t.compile and t.flex_attention and flex_available()
        if self.precision == "bf16-pure":
            model.to(torch.bfloat16)
        self.model = model  # unwrapped: what is saved, sampled and exported
        if t.compile:
            # Dynamo's state is per process: earlier runs in it (bench, studies, in-process restarts) would count
            # against its recompile limit, past which it silently runs eager. Each run starts afresh (compiled
            # kernels still come from Inductor's on-disk cache).
            torch._dynamo.reset()
            model.compile_blocks()  # per-block compile before DDP/FSDP wrapping (torchtitan's order)
        self._graphs_before = _graphs_compiled()  # the summary counts this run's graphs
        # FSDP2 + bf16: bf16 all-gathered weights, fp32 gradient reduction and no autocast (see D.mixed_precision)
        param_dtype, self.amp = D.mixed_precision(cfg.dist.strategy, self.precision, self.dist.world)
        self.wrapped = D.wrap_model(model, cfg.dist.strategy, self.dist, param_dtype=param_dtype)
        self.sharded = cfg.dist.strategy == "fsdp" and self.dist.world > 1  # DTensor parameters, DCP checkpoints

        # optimizer, schedule, loss scaling
        self.optimizer = build_optimizer(model.named_parameters(), cfg.optim, total_steps=self.total_steps,
                                         data_parallel=self.dist.world > 1)
        self.scheduler = build_schedule(self.optimizer, cfg.schedule, total_steps=self.total_steps,
                                        peak_lr=cfg.optim.lr)
        self.horizon_wd = ([g["weight_decay"] for g in self.optimizer.param_groups]
                           if cfg.optim.weight_decay_mode == "horizon" else None)
        """Horizon-aware decay of each group, sized for this run's length at lr scale 1."""
        self.scaler = D.grad_scaler(self.device, self.sharded) if self.precision == "fp16" else None

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
        # the fixed validation set lives on the device for the whole run: copied once, not at every evaluation
        eval_set = eval_batches(self.val_stream, seq_len=d.seq_len, micro_rows=micro, max_tokens=t.eval_tokens,
                                rank=self.dist.rank, world=world, masked=self.loader.masked, doc_mask=d.doc_mask,
                                pad_id=self.data.tokenizer.eot_id)
        self.eval_set = [mb.to(self.device) for mb in eval_set]

        self.guard = Guard(cfg.guard)
        self.step = 0
        self.tokens_seen = 0
        self.train_time = 0.0
        self.compile_time = 0.0
        self.lr_scale = 1.0
        self.good_step = 0
        """The newest step whose weights passed the guard: a rollback goes to a checkpoint no newer than it."""
        self.val_history: list[tuple[int, float]] = []
        # FLOPs per token = 6N + 12 L C T, T the length a step's tokens attend over (it varies: padding, curriculum)
        self.flops_6n = model.flops_per_token(0)
        self.flops_per_attended = model.flops_per_token(1) - self.flops_6n
        self.peak = peak_flops(self.device, t.peak_tflops) if self.dist.is_main else None
        self._stop_signal: int | None = None
        if resume:
            self._resume()
            if self.dist.is_main:
                self._write_config()  # overrides of the resume (e.g. more --train.steps) become the run's config

    # ------------------------------------------------------------------------------------------------------
    # setup helpers

    def log_line(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message)

    def _prepare_run_dir(self, resume: bool) -> None:
        if resume:
            if not (self.run_dir / "config.toml").exists():
                raise CheckpointError(f"no run to resume at {self.run_dir}; start it without --resume")
        elif self.run_dir.exists() and (not self.run_dir.is_dir() or any(self.run_dir.iterdir())):
            raise ConfigError(f"run directory {self.run_dir} already exists; pass --resume to continue it or choose "
                              "another --train.run_name")
        D.barrier()
        if self.dist.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                ckpt.clean_partial(self.ckpt_root)
                if not resume:  # a resumed run's config is rewritten only once its checkpoint has loaded
                    self._write_config()
                _end_last_line(self.run_dir / "metrics.jsonl")
            except OSError as e:
                raise ConfigError(f"cannot write the run directory {self.run_dir} ({e.strerror or e}); choose "
                                  "another --train.out_dir or check its permissions and free space") from None
        D.barrier()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", tensorboard=self.cfg.log.tensorboard) \
            if self.dist.is_main else None

    def _write_config(self) -> None:
        tmp = self.run_dir / "config.toml.tmp"
        tmp.write_text(to_toml(self.cfg))
        os.replace(tmp, self.run_dir / "config.toml")

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
            if tok_path.exists():  # resuming: the data must still be read with the run's tokenizer
                if load_tokenizer(tok_path).sha != data.tokenizer.sha:
                    raise CheckpointError(f"the data {d.source!r} is tokenized with another tokenizer than the run "
                                          f"at {self.run_dir} was trained with; resume with the run's data settings "
                                          f"(--data.source/--data.tokenizer, or --data.tokenizer={tok_path})")
            else:
                tmp = tok_path.with_name("tokenizer.json.tmp")
                data.tokenizer.save(tmp)
                os.replace(tmp, tok_path)
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
            "optimizer": None if self.sharded else self.optimizer.state_dict(),  # FSDP: in the DCP shards
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loader": loader_state,
            "guard": self.guard.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
            "trainer": {"step": self.step, "tokens_seen": self.tokens_seen, "train_time": self.train_time,
                        "lr_scale": self.lr_scale, "val_history": self.val_history,
                        "good_step": self.good_step},
            "config": self.cfg.to_dict(),
        }

    def save(self, loader_state: dict[str, int]) -> Path | None:
        """Checkpoint the current step (rank 0 writes; every rank waits for it).

        FSDP: first every rank writes its model and optimizer shards (torch.distributed.checkpoint) into the
        temporary directory and the whole weights are gathered to rank 0, which completes and renames it.
        """
        path = tmp = None
        full_sd = None
        if self.sharded:
            tmp = ckpt.sharded_temp_dir(self.ckpt_root, self.step) if self.dist.is_main else None
            tmp = Path(str(D.broadcast_object(str(tmp))))
            D.save_sharded(self.model, self.optimizer, tmp / "dcp")
            full_sd = D.full_model_state(self.model)  # collective: rank 0 gets the whole weights on its CPU
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, model_sd=ckpt.model_state(self.model, full_sd),
                                        state=self._state(loader_state), model_config=self.gpt_config,
                                        keep=self.cfg.train.keep_checkpoints, tmp=tmp,
                                        protect_step=self.good_step if self.cfg.guard.enabled else None)
        D.barrier()
        return path

    def _load(self, path: Path, *, rollback: bool) -> None:
        meta, weights, state = ckpt.load_checkpoint(path)
        if meta["model_config"] != asdict(self.gpt_config):
            raise CheckpointError(f"checkpoint {path} holds a different model shape than the run's config; resume "
                                  "with the settings the run was started with")
        if (path / "dcp").is_dir():  # saved by FSDP: DCP reshards to this run's world size and strategy
            D.load_sharded(self.model, self.optimizer, path / "dcp")
        elif self.sharded:  # one whole copy (one process / DDP) into an FSDP run: each rank keeps its rows
            D.load_full(self.model, self.optimizer, weights, state["optimizer"])
        else:
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
            # a checkpoint's own weights are judged by the step after it: not yet good (as in the uninterrupted run)
            self.good_step = int(tr.get("good_step", self.step - 1))
            self.guard.load_state_dict(state["guard"])
            rng = state["rng"]
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if self.device.type == "cuda" and rng["cuda"]:
                torch.cuda.set_rng_state_all(rng["cuda"])
        self._apply_horizon_wd()

    def _apply_horizon_wd(self) -> None:
        """Keep horizon-aware decay's lr x wd = 1 / (wd_horizon x total steps) after a checkpoint load or rollback:
        sized for this run's length (a resume may change --train.steps) and divided by the guard's lr scale."""
        if self.horizon_wd is not None:
            for group, wd in zip(self.optimizer.param_groups, self.horizon_wd):
                group["weight_decay"] = wd / self.lr_scale

    def _rescale_lr(self, factor: float) -> None:
        if factor != 1.0:
            for group in self.optimizer.param_groups:
                group["initial_lr"] *= factor
            self.scheduler.load_state_dict(self.scheduler.state_dict())  # re-applies the lr of the current step

    def _latest_checkpoint(self, max_step: int | None = None) -> Path | None:
        """The newest valid checkpoint (at most ``max_step``), as rank 0 finds it (one rank reads the checksums; all
        load the same one)."""
        path = ckpt.latest_valid(self.ckpt_root, warn=self.log_line, max_step=max_step) if self.dist.is_main else None
        found = D.broadcast_object(None if path is None else str(path))
        return None if found is None else Path(str(found))

    def _resume(self) -> None:
        path = self._latest_checkpoint()
        if path is None and not ckpt.list_checkpoints(self.ckpt_root):
            # stopped before its first checkpoint: nothing was kept, so the run starts again, exactly as it began
            self.log_line(f"no checkpoint in {self.ckpt_root} yet; training from step 0")
            if self.metrics:
                self.metrics.write("event", event="resume", step=0, checkpoint="")
            return
        if path is None:
            raise CheckpointError(f"no valid checkpoint in {self.ckpt_root} to resume from (every one fails its "
                                  f"checksum); delete {self.ckpt_root} to train this run again from step 0, or "
                                  "start a new run")
        self._load(path, rollback=False)
        if self.metrics:
            self.metrics.replay_from(self.step + 1)
        self.log_line(f"resumed from {path} at step {self.step}")
        if self.metrics:
            self.metrics.write("event", event="resume", step=self.step, checkpoint=str(path))

    def _rollback(self) -> None:
        reason = self.guard.reason
        self.guard.after_rollback()
        g = self.cfg.guard
        if self.guard.rollbacks > g.max_rollbacks:
            clip = self.cfg.train.clip_norm
            advice = f"lower --train.clip_norm (now {clip:g})" if clip > 0 else "enable --train.clip_norm"
            raise TrainingDiverged(f"training diverged: more than {g.max_rollbacks} rollbacks; lower --optim.lr, "
                                   f"{advice} or raise --guard.max_rollbacks")
        self.lr_scale *= g.rollback_lr_factor
        # the newest checkpoint whose weights passed the guard: one saved just before the failure may hold the
        # weights that failed (its step is judged only after it is written)
        path = self._latest_checkpoint(max_step=self.good_step)
        if path is not None:
            self._load(path, rollback=True)
        else:  # nothing saved yet: back to the initial state
            if self.sharded:  # initialise a whole copy as at the start, then keep this rank's rows
                fresh = GPT(self.gpt_config).to(self.device)
                fresh.init_weights(seed=self.cfg.train.seed)
                D.load_full(self.model, None, fresh.to(self.model.lm_head.weight.dtype).state_dict(), None)
            else:
                self.model.init_weights(seed=self.cfg.train.seed)
            if self.precision == "bf16-pure":
                self.model.to(torch.bfloat16)
            self.optimizer.state.clear()
            self.scheduler.load_state_dict({"last_epoch": 0})
            self._rescale_lr(g.rollback_lr_factor)
            self._apply_horizon_wd()
            self.loader.load_state_dict({"epoch": 0, "pos": 0, "seed": self.loader.seed})
            self.step, self.tokens_seen = 0, 0
            self.val_history = []
            # the moving average describes the trained model: judged against it, the initial loss is a "spike"
            self.guard.ema, self.guard.seen = None, 0
        self.good_step = self.step  # newer checkpoints belong to the abandoned attempt
        if g.rollback_reseed:
            self.loader.reseed(self.cfg.train.seed + 1000 * self.guard.rollbacks)
        # persist the rollback (lr scale, counters, data seed); saving replaces step_S and deletes the abandoned
        # attempt's newer checkpoints, which a resume after a crash would otherwise pick up
        self.save(self.loader.state_dict())
        if self.metrics:
            self.metrics.replay_from(self.step + 1)
        message = (f"{reason}: rollback #{self.guard.rollbacks} to step {self.step} ({path or 'initial weights'}); "
                   f"lr scale {self.lr_scale:g}{', data reshuffled' if g.rollback_reseed else ''}")
        self.log_line(message)
        if self.metrics:
            self.metrics.write("event", event="rollback", step=self.step, checkpoint=str(path or ""),
                               lr_scale=self.lr_scale, rollbacks=self.guard.rollbacks, reason=reason,
                               data_seed=self.loader.seed)

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
                with _autocast(self.amp, self.device):
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
                with _autocast(self.amp, self.device):
                    loss = self.wrapped(mb.inputs, mb.targets, pos=mb.pos, doc_ids=mb.doc_ids, reduction="sum")
                total[0] += loss.double()
                total[1] += (mb.targets != IGNORE_INDEX).sum()
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
        # Python runs a handler only between bytecodes: two signals that arrive while a step's kernels run reach
        # it as one call. Each delivery also writes its number to the wakeup pipe, which counts them.
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        received = 0

        def handler(signum: int, frame: Any) -> None:
            nonlocal received
            with contextlib.suppress(BlockingIOError):
                received += sum(b in previous for b in os.read(wake_r, 64))
            received = max(received, 1 if self._stop_signal is None else 2)
            if received >= 2:  # a second signal: stop now
                signal.signal(signum, signal.SIG_DFL)
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.dist.is_main:
                message = "stopping: checkpointing at the end of this step (signal again to stop at once)"
                try:
                    tqdm.write(message, file=sys.stderr)  # on a line of its own, the progress bar redrawn below
                except (RuntimeError, OSError, ValueError):  # the signal came mid-write to stderr (a reentrant call)
                    with contextlib.suppress(OSError, ValueError):
                        os.write(sys.stderr.fileno(), f"\n{message}\n".encode())

        try:
            for s in previous:
                signal.signal(s, handler)
            wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            os.close(wake_r)
            os.close(wake_w)
            return lambda: None

        def restore() -> None:
            signal.set_wakeup_fd(wakeup)
            for s, h in previous.items():
                signal.signal(s, h)
            os.close(wake_r)
            os.close(wake_w)

        return restore

    # ------------------------------------------------------------------------------------------------------
    # the loop

    def run(self) -> TrainResult:
        """Train to the end (or to a stop signal, or --train.stop_at_step).

        Out of GPU memory, the cost of a training row is measured and :class:`GPUOutOfMemory` raised, naming the
        --train.micro_batch_size that fits.
        """
        try:
            return self._run()
        except RuntimeError as e:  # torch.OutOfMemoryError, or cuBLAS/cuDNN failing to get a workspace
            if self.device.type != "cuda" or not (isinstance(e, torch.cuda.OutOfMemoryError) or
                                                  "out of memory" in str(e)):
                raise
        # outside the except block: the traceback, and the activations its frames hold, are released
        raise self._oom_error() from None

    def _oom_error(self) -> GPUOutOfMemory:
        d, t = self.cfg.data, self.cfg.train
        per_rank = t.batch_size // self.dist.world
        where = (f"out of GPU memory at --train.micro_batch_size={self.micro_rows} (--data.seq_len={d.seq_len}, "
                 f"{self.precision})")
        again = f", then continue with --resume {self.run_dir}" if ckpt.list_checkpoints(self.ckpt_root) else ""
        if self.dist.world > 1:  # measuring would take every rank's collectives: no estimate
            return GPUOutOfMemory(f"{where}; lower --train.micro_batch_size (a divisor of the per-GPU batch of "
                                  f"{per_rank}) or --data.seq_len{again}")
        fixed, per_row = self._measure_memory()
        free, _ = torch.cuda.mem_get_info(self.device)
        budget = free + torch.cuda.memory_reserved(self.device)  # what this process can have (others' use aside)
        rows, micro = suggest_micro_batch(per_row, fixed, budget, per_rank, current=self.micro_rows)
        gib = f"{budget / 2**30:.0f} GiB"
        if micro == 0:
            return GPUOutOfMemory(f"{where}; not even one row fits in the {gib} this GPU has free; lower "
                                  f"--data.seq_len or use a smaller model (--model.preset){again}")
        return GPUOutOfMemory(f"{where}; about {rows} rows fit in the {gib} this GPU has free: use "
                              f"--train.micro_batch_size={micro} (a divisor of --train.batch_size={per_rank}; "
                              f"gradient accumulation keeps the batch) or lower --data.seq_len{again}")

    def _measure_memory(self) -> tuple[float, float]:
        """(fixed bytes, bytes per row) of a training step: peak memory at micro-batches of 1 and 2 rows.

        Eager and without FlexAttention (compiled code needs less, so the estimate errs on the safe side); the
        weights are updated, so this runs only when the run is ending anyway. (inf, inf): one row does not fit.
        """
        seq_len, vocab = self.cfg.data.seq_len, self.data.tokenizer.vocab_size
        self.model.use_flex = False
        self.model.train()

        def peak(rows: int, update: bool = False) -> int | None:
            """Peak bytes of a forward+backward of ``rows`` rows (gradients accumulate, held as in a step) and,
            with ``update``, an optimizer step (the first allocates the optimizer state); None: out of memory."""
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            oom = False
            try:
                with torch.compiler.set_stance("force_eager"):
                    if rows:
                        x = torch.randint(vocab, (rows, seq_len), device=self.device)
                        with _autocast(self.amp, self.device):
                            loss = self.model(x, x, reduction="sum")
                        loss.float().backward()
                        del loss, x
                    if update:
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, zeroed
            except torch.cuda.OutOfMemoryError:
                oom = True
            return None if oom else torch.cuda.max_memory_allocated(self.device)

        inf = float("inf")
        self.optimizer.zero_grad(set_to_none=True)
        if peak(1, update=True) is None:  # one row and the optimizer state do not fit
            return inf, inf
        one, two = peak(1), peak(2)
        update = peak(0, update=True)
        self.optimizer.zero_grad(set_to_none=True)
        if one is None:
            return inf, inf
        if two is None:  # one row fits, two do not
            return float(one), inf
        per_row = float(max(two - one, 1))
        fixed = one - per_row
        if update is not None:  # the optimizer step's temporaries may be the peak: then no row is added to it
            fixed = max(fixed, update - per_row)
        return fixed, per_row

    def _run(self) -> TrainResult:
        t, cfg = self.cfg.train, self.cfg
        is_main = self.dist.is_main
        if is_main and self.metrics:
            self.metrics.write("config", step=self.step, config=cfg.to_dict(), model=asdict(self.gpt_config),
                               params=self.model.num_params(), world=self.dist.world, device=str(self.device),
                               precision=self.precision, total_steps=self.total_steps, accum=self.accum,
                               micro_batch=self.micro_rows, torch=torch.__version__,
                               optimizer=describe(self.optimizer))
        self.log_line(f"model {self.model.num_params() / 1e6:.2f}M params | {self.total_steps} steps of "
                      f"{t.batch_size}x{cfg.data.seq_len} tokens | {self.device} {self.precision} | run {self.run_dir}")
        loader_state = self.loader.state_dict()
        batch = self.loader.next(self.step)
        micro = [mb.to(self.device) for mb in batch.micro]
        if t.compile:
            self._warmup_compile(replace(batch, micro=micro))
        restore_signals = self._install_signals()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (cfg.log.progress and is_main))
        last_loss: float | None = None
        val_loss: float | None = self.val_history[-1][1] if self.val_history else None
        log_time, log_tokens, log_slots, log_rows, log_flops = 0.0, 0, 0, 0, 0.0
        log_norms: list[float] = []  # pre-clip norm of every step of the window whose stats reached the host
        first_step = self.step
        # loss is this rank's share (summed), the norm is global already (averaged), stop votes are counted
        stat_weights = torch.tensor([1.0, 1.0 / self.dist.world, 1.0], device=self.device)
        self._sync()
        t_mark = time.perf_counter()
        try:
            while self.step < self.total_steps:
                step = self.step
                dev_batch = replace(batch, micro=micro)
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
                stop_votes = 0.0  # ranks that caught a stop signal: all ranks stop at the same step
                if cfg.guard.enabled or log_now:
                    signalled = torch.full((), float(self._stop_signal is not None), device=self.device)
                    stats = D.all_reduce_sum(torch.stack([loss.float(), norm.float(), signalled]) * stat_weights)
                    # host sync: once per step with the guard on; every rank gets the same values and decisions
                    loss_value, norm_value, stop_votes = stats.tolist()
                    log_norms.append(norm_value)
                    if cfg.guard.enabled:
                        decision = self.guard.check(loss_value, norm_value, overflow_expected=self.scaler is not None)
                if self.scaler is not None and decision != "ok":
                    self.scaler.update()  # closes the step _clip unscaled (the next unscale_ would raise otherwise)
                if decision == "rollback":
                    self.optimizer.zero_grad(set_to_none=True)
                    self._rollback()
                    batch = self.loader.next(self.step)
                    micro = [mb.to(self.device) for mb in batch.micro]
                    bar.n = self.step
                    continue
                if decision == "ok":
                    self.good_step = step
                    if self.scaler is not None:
                        self.scaler.step(self.optimizer)  # skips the update if the unscaled gradients overflowed
                        self.scaler.update()
                        if (cfg.guard.enabled or log_now) and not math.isfinite(norm_value) and self.metrics:
                            self.metrics.write("event", event="overflow", step=step,
                                               loss_scale=self.scaler.get_scale())
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
                if self.step == first_step + 1 and self.metrics:  # launch-to-first-step is measured from this
                    self._sync()
                    self.metrics.write("event", event="first_step", step=self.step, wall=time.time())
                self.tokens_seen += batch.n_tokens
                log_tokens += batch.n_tokens
                log_slots += batch.n_slots  # all ranks: pad/bucket widths differ between ranks
                log_flops += batch.n_slots * (self.flops_6n + self.flops_per_attended * batch.attn_len)
                log_rows += sum(mb.inputs.shape[0] for mb in batch.micro) * self.dist.world
                step_seq_len = batch.seq_len  # the step just taken (batch becomes the next one below)
                batch, micro, loader_state = next_batch, next_micro, next_state
                if math.isfinite(loss_value):
                    last_loss = loss_value

                # stop_at_step ends the run early (evaluated and checkpointed) on a schedule over total_steps
                end = self.step == self.total_steps or self.step == t.stop_at_step
                if log_now:
                    self._sync()
                    now = time.perf_counter()
                    self.train_time += now - t_mark
                    log_time += now - t_mark
                    t_mark = now
                    dt = max(log_time, 1e-9)
                    record = {"step": self.step, "loss": loss_value, "lr": self._main_lr(),
                              "grad_norm": norm_value, "grad_norms": log_norms, "tokens": self.tokens_seen,
                              "time": self.train_time,
                              "tokens_per_s": log_tokens / dt, "seq_len": step_seq_len,
                              "waste": 1.0 - log_tokens / max(log_slots, 1),
                              "tokens_per_row": log_tokens / max(log_rows, 1),
                              "skipped": self.guard.bad_total}
                    if self.peak:
                        record["mfu"] = log_flops / dt / self.dist.world / self.peak  # per GPU, against its peak
                    if self.device.type == "cuda":
                        record["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    if self.scaler is not None:
                        record["loss_scale"] = self.scaler.get_scale()
                    if self.metrics:
                        self.metrics.write("train", **record)
                    bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{log_tokens / dt:,.0f}", refresh=False)
                    log_time, log_tokens, log_slots, log_rows, log_flops, log_norms = 0.0, 0, 0, 0, 0.0, []
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
                # several processes stop only on a step whose stats were all-reduced (every step with the guard on)
                stop = self._stop_signal is not None if self.dist.world == 1 else stop_votes > 0
                if stop and self._stop_signal is None:
                    self._stop_signal = signal.SIGTERM  # another rank was signalled
                if (t.ckpt_every and self.step % t.ckpt_every == 0) or end or stop:
                    self._sync()
                    log_time += time.perf_counter() - t_mark
                    self.train_time += time.perf_counter() - t_mark
                    self.save(loader_state)
                    t_mark = time.perf_counter()
                bar.update(1)
                if end:
                    if self.step < self.total_steps:
                        self.log_line(f"stopped at step {self.step} of {self.total_steps}; --resume continues it")
                        if self.metrics:
                            self.metrics.write("event", event="stopped", step=self.step)
                    break
                if stop:  # (the CLI says where it stopped and how to continue)
                    if self.metrics:
                        self.metrics.write("event", event="interrupted", step=self.step)
                    break
        finally:
            bar.close()
            restore_signals()
        if is_main and self.metrics:
            self.metrics.write("summary", step=self.step, train_loss=last_loss, val_loss=val_loss,
                               train_time=self.train_time, compile_time=self.compile_time,
                               skipped=self.guard.bad_total, rollbacks=self.guard.rollbacks,
                               spikes=self.guard.spikes, tokens=self.tokens_seen,
                               graphs=_graphs_compiled() - self._graphs_before)
            self.metrics.close()
            if cfg.log.plot:
                from lmsprint.plots import plot_run

                plot_run(self.run_dir)
        stopped = self._stop_signal is not None and self.step < self.total_steps  # (a signal on the last step: done)
        return TrainResult(self.run_dir, self.step, last_loss, val_loss, stopped,
                           self.guard.bad_total, self.guard.rollbacks, self.train_time, self.compile_time,
                           list(self.val_history), self._stop_signal if stopped else None)

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
    existed = path.exists()
    fresh = not resume and (not existed or (path.is_dir() and not any(path.iterdir())))
    created = path  # the outermost directory this run creates (runs/ too, the first time)
    while not created.parent.exists() and created.parent != created:
        created = created.parent
    trainer = None
    try:
        trainer = Trainer(cfg, path, resume=resume, callbacks=callbacks)
        result = trainer.run()
        D.barrier()  # every rank is done: no collective is in flight when the process group goes
        return result
    except BaseException as e:
        # a run that fails to start (bad corpus, a micro-batch the GPU cannot hold, Ctrl-C while preparing data)
        # leaves no run directory behind; one that trained keeps its metrics and checkpoints
        started = trainer is not None and (not isinstance(e, GPUOutOfMemory) or trainer.ckpt_root.exists())
        if fresh and not started and int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(path if existed else created, ignore_errors=True)
            if existed:
                path.mkdir(exist_ok=True)
        raise
    finally:
        # the wrapped model holds the process group: free it now rather than at interpreter exit, where gloo's
        # worker threads dying with it can abort the process ("terminate called without an active exception")
        trainer = None
        gc.collect()
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
    # the loader's state is a position in the plan these settings make, and the length schedule is a function of
    # the step and the run's total steps: changing them would skip or repeat data, or send lengths backwards
    fixed = [f"--data.{k}" for k in ("batching", "bucket_window", "seq_schedule", "seq_start", "seq_warmup",
                                     "seq_milestones", "seq_multiple", "short_mix")
             if getattr(cfg.data, k) != getattr(saved.data, k)]
    fixed += ["--train.batch_size"] if cfg.train.batch_size != saved.train.batch_size else []
    if saved.data.seq_schedule in ("linear", "stages") and (cfg.train.steps, cfg.train.epochs) != \
            (saved.train.steps, saved.train.epochs):
        fixed.append("--train.steps/--train.epochs (the sequence-length schedule spans them)")
    if fixed:
        raise ConfigError(f"resume cannot change {', '.join(fixed)}; start a new run instead")
    return cfg


__all__ = ["Callback", "GPUOutOfMemory", "MicroBatch", "TrainResult", "Trainer", "TrainingDiverged", "resume_config",
           "suggest_micro_batch", "train"]
