"""Running a training job: the checks before anything is prepared, then one run from a config (locked, planned
when it has a budget, cleaned up when it fails to start). The Python form of ``lmsprint train``."""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence
from pathlib import Path

from lmsprint import distributed as D
from lmsprint.config import RunConfig, validate
from lmsprint.errors import ConfigError
from lmsprint.model import model_shape
from lmsprint.training import batches as B
from lmsprint.training.api import Callback, TrainingDiverged, TrainResult
from lmsprint.training.budget import ONE_PROCESS, Timer, clock_text
from lmsprint.training.lock import RunLock
from lmsprint.training.memory import GPUOutOfMemory
from lmsprint.training.plan import plan_run
from lmsprint.training.rundir import FreshRunDir, new_run_dir, resume_config
from lmsprint.training.trainer import Trainer


def preflight(cfg: RunConfig, world: int | None = None) -> None:
    """Every check that needs no data, before anything is prepared: the config's sections, the model's shape and,
    given the number of processes, how the batch splits over them."""
    validate(cfg)
    model_shape(cfg.model)
    if world is not None:
        B.micro_batch_rows(cfg.train, world)
        if world > 1 and cfg.train.budget is not None:
            raise ConfigError(ONE_PROCESS)


def train(cfg: RunConfig, *, run_dir: str | Path | None = None, resume: bool = False,
          callbacks: Sequence[Callback] = (), fresh_optimizer: bool = False, timer: Timer | None = None
          ) -> TrainResult:
    """Train a run from a config (the Python form of ``lmsprint train``). The run directory is locked for the
    process (rank 0) that trains it: a second process that tries is refused, naming the first.

    With ``--train.budget`` a fresh run is planned first (:func:`lmsprint.training.plan.plan_run`; the plan is
    printed) and ends within the budget, counted on ``timer`` (default: from this call).
    """
    preflight(cfg)
    timer = timer or Timer()
    path = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    fresh = FreshRunDir(path, resume=resume)
    lock = RunLock.acquire(path, create=not resume) if D.launch_rank() == 0 else None
    trainer = None
    try:
        planned = None
        if cfg.train.budget is not None and not resume:
            planned = plan_run(cfg, timer=timer, progress=cfg.log.progress)
            print(planned.describe(), flush=True)
            cfg = planned.config
        trainer = Trainer(cfg, path, resume=resume, callbacks=callbacks, timer=timer, planned=planned,
                          fresh_optimizer=fresh_optimizer)
        result = trainer.run()
        D.barrier()  # every rank is done: no collective is in flight when the process group goes
        return result
    except BaseException as e:
        # a run that fails to start leaves no run directory behind; one that trained keeps its metrics and
        # checkpoints
        if trainer is None or (isinstance(e, GPUOutOfMemory) and not trainer.ckpt_root.exists()):
            fresh.discard()
        raise
    finally:
        # the wrapped model holds the process group: free it now rather than at interpreter exit, where gloo's
        # worker threads dying with it can abort the process ("terminate called without an active exception")
        trainer = None
        gc.collect()
        D.teardown()
        if lock is not None:
            lock.release()


def print_outcome(result: TrainResult, cfg: RunConfig, *, sample_tokens: int, timer: Timer) -> None:
    """What ``lmsprint train`` prints when a run ends: where it is, its final and best losses, the plot, a sample
    of ``sample_tokens`` tokens, and a budgeted run's time (counted on ``timer`` from the launch); a run stopped by
    a signal says how to continue it."""
    if result.interrupted:
        print(f"stopped at step {result.step}; continue with: lmsprint train --resume {result.run_dir}",
              file=sys.stderr)
        return
    print(f"\nrun: {result.run_dir}")
    if result.val_loss is not None:
        print(f"final validation loss: {result.val_loss:.4f} after {result.step} steps "
              f"({result.train_time:.1f}s of training)")
    if result.best_step is not None and result.best_val_loss is not None:
        print(f"best validation loss: {result.best_val_loss:.4f} at step {result.best_step} (kept in "
              f"{result.run_dir / 'checkpoints' / 'best'}; sample and export use it)")
    if cfg.log.plot and (result.run_dir / "loss.png").exists():
        print(f"loss plot: {result.run_dir / 'loss.png'}")
    if sample_tokens > 0:
        from lmsprint.sample import sample

        text = sample(result.run_dir, max_new_tokens=sample_tokens, seed=cfg.train.seed)[0]
        print("sample:\n" + "-" * 60 + f"\n{text}\n" + "-" * 60)
    if result.budget is not None:
        planned = f", {clock_text(result.expected)} planned" if result.expected is not None else ""
        used = result.budget_before + timer.elapsed()  # a resumed run: its earlier processes' time too
        print(f"time: {clock_text(used)} of the {clock_text(result.budget)} budget{planned}")


__all__ = ["Callback", "GPUOutOfMemory", "TrainResult", "TrainingDiverged", "new_run_dir", "preflight", "print_outcome",
           "resume_config", "train"]
