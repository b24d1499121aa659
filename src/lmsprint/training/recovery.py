"""Recovery: resuming a run from its newest checkpoint, and rolling back to the newest good one when the guard
finds that the loss or the gradients failed. Both load through the run's
:class:`~lmsprint.training.checkpointer.Checkpointer` and restore the config's optimizer settings over the
checkpoint's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmsprint.optim.param_groups import restore_settings
from lmsprint.training import checkpoint as ckpt
from lmsprint.training.api import TrainingDiverged
from lmsprint.training.rundir import check_resume_step, commit_resume

if TYPE_CHECKING:
    from lmsprint.training.trainer import Trainer


def apply_horizon_wd(tr: Trainer) -> None:
    """Keep horizon-aware decay's lr x wd = 1 / (wd_horizon x total steps) after a checkpoint load or rollback:
    sized for this run's length (a resume may change --train.steps) and divided by the guard's lr scale."""
    if tr.horizon_wd is not None:
        for group, wd in zip(tr.optimizer.param_groups, tr.horizon_wd):
            group["weight_decay"] = wd / tr.state.lr_scale


def restore_run_settings(tr: Trainer) -> None:
    """The config's optimizer settings over those a checkpoint brought (a resume may change --optim.lr and the
    like: they apply from the current step on), peaks times the guard's lr scale, and the step's lr."""
    restore_settings(tr.optimizer, tr.settings, lr_scale=tr.state.lr_scale)
    tr.scheduler.load_state_dict(tr.scheduler.state_dict())
    apply_horizon_wd(tr)


def resume(tr: Trainer) -> None:
    """Continue from the newest valid checkpoint (or from step 0 when there is none yet)."""
    path = tr.checkpointer.resume(optimizer="fresh" if tr.fresh_optimizer else "load")
    if path is not None and tr.budget is None:  # a budgeted run's length is its time, not its steps
        check_resume_step(tr.cfg, tr.state.step, tr.total_steps)
    if path is not None:
        restore_run_settings(tr)
    if tr.dist.is_main:  # loaded: now the resume's overrides become the config (nothing written before)
        commit_resume(tr.cfg, tr.run_dir, tr.data.tokenizer, warn=tr.report.line)
    fresh = {"fresh_optimizer": True} if tr.fresh_optimizer else {}
    if path is None:
        # stopped before its first checkpoint: nothing was kept, so the run starts again, exactly as it began
        tr.report.line(f"no checkpoint in {tr.ckpt_root} yet; training from step 0")
        tr.report.event("event", event="resume", step=0, checkpoint="", **fresh)
        return
    tr.report.replay_from(tr.state.step + 1)
    tr.report.line(f"resumed from {path} at step {tr.state.step}"
                     f"{' with a fresh optimizer state' if fresh else ''}")
    tr.report.event("event", event="resume", step=tr.state.step, checkpoint=str(path), **fresh)


def rollback(tr: Trainer) -> None:
    """Back to the newest checkpoint whose weights passed the guard (or to the initial weights), with the lr
    scaled down and the data reshuffled; the guard's counters and the training time carry on."""
    st, g = tr.state, tr.cfg.guard
    reason = tr.guard.reason
    tr.guard.after_rollback()
    if tr.guard.rollbacks > g.max_rollbacks:
        clip = tr.cfg.train.clip_norm
        advice = f"lower --train.clip_norm (now {clip:g})" if clip > 0 else "enable --train.clip_norm"
        raise TrainingDiverged(f"training diverged: more than {g.max_rollbacks} rollbacks; lower --optim.lr, "
                               f"{advice} or raise --guard.max_rollbacks")
    st.lr_scale *= g.rollback_lr_factor
    # the newest checkpoint whose weights passed the guard: one saved just before the failure may hold the
    # weights that failed (its step is judged only after it is written)
    path = tr.checkpointer.latest(max_step=st.good_step)
    if path is not None:  # a checkpoint from before a --resume-fresh-optimizer: its state is another's
        saved = tr.checkpointer.load(path, parts=("scheduler", "scaler", "loader"),
                                       optimizer="fit" if tr.fresh_optimizer else "load")
    else:  # nothing saved yet: back to the start (the moving average too: the initial loss is no "spike")
        initial = ckpt.model_state(tr.build_model())
        saved = tr.checkpointer.load_initial(initial, parts=("scheduler", "loader"))
    st.rollback_to(saved["trainer"])
    tr.scheduler.rescale(st.lr_scale / float(saved["trainer"]["lr_scale"]))  # the restored peaks, rescaled
    tr.guard.load_average(saved["guard"])
    restore_run_settings(tr)  # a checkpoint from before a resume that changed them
    st.good_step = st.step  # newer checkpoints belong to the abandoned attempt
    if g.rollback_reseed:
        tr.batches.reseed(tr.cfg.train.seed + 1000 * tr.guard.rollbacks)
    # persist the rollback (lr scale, counters, data seed); saving replaces step_S and deletes the abandoned
    # attempt's newer checkpoints, which a resume after a crash would otherwise pick up
    tr.save()
    tr.report.replay_from(st.step + 1)
    where = path or "initial weights"
    tr.report.line(f"{reason}: rollback #{tr.guard.rollbacks} to step {st.step} ({where}); lr scale "
                     f"{st.lr_scale:g}{', data reshuffled' if g.rollback_reseed else ''}")
    tr.report.event("event", event="rollback", step=st.step, checkpoint=str(path or ""), lr_scale=st.lr_scale,
                      rollbacks=tr.guard.rollbacks, reason=reason, data_seed=tr.loader.seed)
