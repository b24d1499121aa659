"""Running a training job: the checks before anything is prepared, then one run from a config (locked, planned
when it has a budget, cleaned up when it fails to start). The Python form of ``lmsprint train``."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path

from lmsprint import distributed as D
from lmsprint.config import RunConfig, validate
from lmsprint.errors import ConfigError
from lmsprint.model import model_shape
from lmsprint.training import batches as B
from lmsprint.training.api import Callback, TrainingDiverged, TrainResult
from lmsprint.training.budget import ONE_PROCESS, Timer
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


__all__ = ["Callback", "GPUOutOfMemory", "TrainResult", "TrainingDiverged", "new_run_dir", "preflight",
           "resume_config", "train"]
