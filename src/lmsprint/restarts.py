"""Random restarts: train N seeds for a short probe, keep the best, continue them to the full budget.

Runs differ only in ``--train.seed`` (initial weights and data order). Every run is started with the FULL
``--train.steps`` and ended early with ``--train.stop_at_step``, so its learning-rate schedule, weight decay
horizon and guard are those of the full run from step 0, and continuing it (``--resume`` of its directory) is
exactly an uninterrupted run of that seed. Probes are ranked by the validation loss at the probe step; the best
``keep`` continue to the full budget. With ``halving`` (successive halving) the survivors are halved at
doubling budgets until ``keep`` are left, which then run to the end.

On several GPUs each run is a ``python -m lmsprint train`` subprocess pinned to one GPU with
``CUDA_VISIBLE_DEVICES``, as many at once as there are GPUs; otherwise the runs train one after another in this
process. Layout::

    OUT/seed-<s>/        ordinary run directories (sample, resume and export accept them)
    OUT/logs/seed-<s>.log  each subprocess's output (GPU mode)
    OUT/restarts.md      the summary table          OUT/restarts.png  every run's validation curve
    OUT/restarts.json    the same, for programs
"""

from __future__ import annotations

import copy
import json
import math
import os
import queue
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lmsprint.config import RunConfig, to_toml
from lmsprint.errors import ConfigError, LmsprintError
from lmsprint.training.metrics import latest_per_step, read_metrics


@dataclass
class RestartRun:
    """One seed of a restarts sweep."""

    seed: int
    run_dir: Path
    val: dict[int, float] = field(default_factory=dict)
    """Validation loss at each budget (step) the run was trained to."""
    curve: list[tuple[int, float]] = field(default_factory=list)
    """Every evaluation of the run: (step, validation loss)."""
    continued: bool = False
    """Trained to the full budget."""
    error: str | None = None
    """Why the run ended early (a failed or diverged run ranks last), or None."""

    @property
    def reached(self) -> int:
        """The largest budget the run reached."""
        return max(self.val, default=0)


@dataclass
class RestartsResult:
    """What :func:`restarts` did: every run, the budgets of the rungs, the winner and the summary table."""

    out_dir: Path
    runs: list[RestartRun]
    budgets: list[int]
    """Steps each rung trained its runs to; the last is the full budget."""
    winner: RestartRun | None
    """The continued run with the lowest final validation loss (None if every run failed)."""
    table: str

    @property
    def winner_dir(self) -> Path | None:
        return self.winner.run_dir if self.winner else None


# ----------------------------------------------------------------------------------------------------------
# running one run to a budget


def _run_name(seed: int) -> str:
    return f"seed-{seed}"


def _in_process(cfg: RunConfig, run: RestartRun, stop: int | None, first: bool) -> None:
    from lmsprint.training.run import resume_config, train

    if first:
        cfg = copy.deepcopy(cfg)
        cfg.train.seed, cfg.train.stop_at_step = run.seed, stop
        cfg.train.out_dir, cfg.train.run_name = str(run.run_dir.parent), run.run_dir.name
        result = train(cfg, run_dir=run.run_dir)
    else:
        result = train(resume_config(run.run_dir, [f"--train.stop_at_step={stop or 'none'}"]), run_dir=run.run_dir,
                       resume=True)
    if result.interrupted:  # Ctrl-C checkpointed the run: end the sweep, not just this run
        raise KeyboardInterrupt


def train_command(base_toml: Path, run: RestartRun, stop: int | None, first: bool) -> list[str]:
    """The ``python -m lmsprint train`` command line that trains ``run`` to ``stop`` (None: to the end)."""
    cmd = [sys.executable, "-m", "lmsprint", "train"]
    if first:
        cmd += ["--config", str(base_toml), f"--train.seed={run.seed}", f"--train.out_dir={run.run_dir.parent}",
                f"--train.run_name={run.run_dir.name}"]
    else:
        cmd += ["--resume", str(run.run_dir)]
    return cmd + [f"--train.stop_at_step={stop or 'none'}", "--sample=0", "--log.progress=false"]


def _visible_device(gpu: int) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that shows a subprocess GPU ``gpu`` as this process numbers it.

    GPU ids count the devices this process sees: under ``CUDA_VISIBLE_DEVICES=2,3`` (a scheduler's share of
    the machine) id 1 is physical GPU 3, not GPU 1 of someone else.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(gpu)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return ids[gpu] if 0 <= gpu < len(ids) else str(gpu)


def _subprocess(base_toml: Path, run: RestartRun, stop: int | None, first: bool, gpu: int) -> None:
    log = run.run_dir.parent / "logs" / f"{run.run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": _visible_device(gpu)}
    with open(log, "a") as f:
        rc = subprocess.run(train_command(base_toml, run, stop, first), env=env, stdout=f, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL).returncode
    if rc in (130, 143):  # interrupted by SIGINT (reaches the whole process group) or SIGTERM
        raise KeyboardInterrupt
    if rc != 0:
        raise LmsprintError(f"exit code {rc}; see {log}")


def _read_curve(run: RestartRun) -> list[tuple[int, float]]:
    records = [r for r in read_metrics(run.run_dir / "metrics.jsonl")
               if r["kind"] == "val" or (r["kind"] == "event" and r.get("event") == "rollback" and "step" in r)]
    return [(int(r["step"]), float(r["loss"])) for r in latest_per_step(records)]


def _train_rung(cfg: RunConfig, runs: list[RestartRun], budget: int, total: int, first: bool, gpus: list[int],
                base_toml: Path, log: Callable[[str], None]) -> None:
    """Train every run of ``runs`` to ``budget`` steps: in parallel over ``gpus``, or here one by one."""
    stop = None if budget >= total else budget

    def one(run: RestartRun, gpu: int | None) -> None:
        try:
            if gpu is None:
                _in_process(cfg, run, stop, first)
            else:
                _subprocess(base_toml, run, stop, first, gpu)
        except LmsprintError as e:  # a failed or diverged run ranks last; the others go on
            run.error = str(e)
        run.curve = _read_curve(run)
        steps = dict(run.curve)
        if run.error is None and budget in steps and not math.isfinite(steps[budget]):
            run.error = f"non-finite validation loss ({steps[budget]}) at step {budget}"
        if run.error is None and budget in steps:
            run.val[budget] = steps[budget]
        elif run.error is None:
            run.error = f"no validation loss at step {budget}"
        log(f"restarts: seed {run.seed} at step {budget}: "
            + (f"val {run.val[budget]:.4f}" if budget in run.val else f"failed ({run.error})"))

    if not gpus:
        for run in runs:
            one(run, None)
        return
    free: queue.Queue[int] = queue.Queue()
    for g in gpus:
        free.put(g)

    def on_free_gpu(run: RestartRun) -> None:
        gpu = free.get()
        try:
            one(run, gpu)
        finally:
            free.put(gpu)

    pool = ThreadPoolExecutor(max_workers=len(gpus))
    try:
        for future in [pool.submit(on_free_gpu, run) for run in runs]:
            future.result()
    finally:  # on Ctrl-C or an error: start no further runs
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------------
# the sweep


def _resolve_gpus(cfg: RunConfig, gpus: int | Sequence[int] | None) -> list[int]:
    if gpus is None:  # auto: one subprocess per GPU when there are several, else in this process
        import torch

        n = torch.cuda.device_count() if cfg.train.device != "cpu" and torch.cuda.is_available() else 0
        return list(range(n)) if n >= 2 else []
    ids = list(range(gpus)) if isinstance(gpus, int) else [int(g) for g in gpus]
    if ids and cfg.train.device != "cpu":  # a GPU that is not there would silently train on the CPU
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        missing = [g for g in ids if not 0 <= g < n]
        if missing:
            raise ConfigError(f"--gpus {','.join(map(str, missing))}: {n} CUDA GPUs are visible here (ids 0.."
                              f"{n - 1}); use visible ids, --gpus none, or --train.device=cpu")
    return ids


def _probe_budget(total: int, probe_steps: int | None, probe_fraction: float | None) -> int:
    if probe_steps is not None and probe_fraction is not None:
        raise ConfigError("give the probe budget once: --probe-steps or --probe-fraction, not both")
    if probe_steps is None:
        fraction = 0.1 if probe_fraction is None else probe_fraction
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"--probe-fraction must be in (0, 1), got {fraction}")
        probe_steps = max(1, round(fraction * total))
    if not 0 < probe_steps < total:
        raise ConfigError(f"--probe-steps must be between 1 and --train.steps - 1 = {total - 1}, got {probe_steps}")
    return probe_steps


def _rank_key(run: RestartRun) -> tuple[int, float]:
    """Sort key: deeper rungs first, then the loss at the deepest rung; failed runs last."""
    if run.error is not None or not run.val:
        return (1, math.inf)
    return (-run.reached, run.val[run.reached])


def restarts(cfg: RunConfig, *, n: int, keep: int = 1, probe_steps: int | None = None,
             probe_fraction: float | None = None, halving: bool = False, out_dir: str | Path,
             gpus: int | Sequence[int] | None = None, log: Callable[[str], None] = print) -> RestartsResult:
    """Train ``n`` seeds to a probe budget, rank them by validation loss and continue the best ``keep``.

    Args:
        cfg: the run config; ``train.steps`` is the full budget and ``train.seed`` the first seed (the others
            follow it: seed, seed + 1, ...).
        n: number of runs (seeds).
        keep: runs continued to the full budget.
        probe_steps: steps of the probe (a step of the full schedule, not a schedule of its own).
        probe_fraction: the probe as a fraction of ``train.steps`` (default 0.1 when neither is given).
        halving: successive halving: keep the better half at each rung and double its budget, until ``keep``
            runs are left, which then train to the end.
        out_dir: directory of the run directories and the summary (``restarts.md``, ``.png``, ``.json``).
        gpus: GPU ids (or a count) to run subprocesses on, one run per GPU at a time; ``None``: every visible
            GPU when there are two or more, else train one run after another in this process; ``[]``: this
            process.
        log: where progress lines go.

    Returns:
        Every run, the rung budgets, the winner (an ordinary run directory) and the Markdown table.

    Raises:
        ConfigError: inconsistent arguments, or ``out_dir`` already holds runs of these seeds.
    """
    from lmsprint.training.run import preflight

    preflight(cfg)
    if cfg.train.epochs is not None:
        raise ConfigError("restarts needs a step budget: set --train.steps instead of --train.epochs")
    if n < 1 or not 1 <= keep <= n:
        raise ConfigError(f"need --n >= 1 and 1 <= --keep <= --n, got n={n}, keep={keep}")
    total = cfg.train.steps
    probe = _probe_budget(total, probe_steps, probe_fraction)
    out = Path(out_dir)
    runs = [RestartRun(cfg.train.seed + i, out / _run_name(cfg.train.seed + i)) for i in range(n)]
    taken = [r.run_dir.name for r in runs if r.run_dir.exists() and any(r.run_dir.iterdir())]
    if taken:
        raise ConfigError(f"{out} already holds {', '.join(taken)}; choose another --out")
    gpu_ids = _resolve_gpus(cfg, gpus)
    base_toml = out / "base.toml"
    try:
        out.mkdir(parents=True, exist_ok=True)
        base_toml.write_text(to_toml(cfg))
    except OSError as e:
        raise ConfigError(f"cannot write the restarts directory {out} ({e.strerror or e}); choose another --out "
                          "or check its permissions") from None
    if gpu_ids:  # prepare the data once here: parallel first runs would race to fill the same cache entry
        from lmsprint.data.prepare import prepared_data

        prepared_data(cfg.data, progress=cfg.log.progress)
    log(f"restarts: {n} seeds from {cfg.train.seed}, probe {probe} of {total} steps, keep {keep}"
        f"{', successive halving' if halving else ''}, "
        + (f"GPUs {','.join(map(str, gpu_ids))} in parallel" if gpu_ids else "one after another in this process"))

    alive, budget, budgets, first = list(runs), probe, [], True
    while True:
        budgets.append(budget)
        _train_rung(cfg, alive, budget, total, first, gpu_ids, base_toml, log)
        first = False
        ok = sorted((r for r in alive if budget in r.val), key=lambda r: r.val[budget])
        if budget >= total or not ok:
            break
        budget = min(total, 2 * budget) if halving else total
        # halve the survivors at each doubled budget; only the best keep train to the full budget
        alive = ok[:max(keep, math.ceil(len(alive) / 2)) if budget < total else keep]
        if len(alive) <= keep:
            budget = total
    for r in runs:
        r.continued = total in r.val
    finished = [r for r in runs if r.continued]
    winner = min(finished, key=lambda r: r.val[total]) if finished else None

    table = summary_table(runs, budgets, winner)
    text = (f"# Random restarts\n\n{n} seeds ({cfg.train.seed}..{cfg.train.seed + n - 1}), probe {probe} of "
            f"{total} steps, {keep} continued{', successive halving' if halving else ''}. Validation loss at "
            f"each budget; runs ranked by the loss at the deepest budget they reached.\n\n{table}\n\n"
            f"Winner: {winner.run_dir if winner else 'none (every run failed)'}\n")
    (out / "restarts.md").write_text(text)
    (out / "restarts.json").write_text(json.dumps({
        "full_steps": total, "probe_steps": probe, "keep": keep, "halving": halving, "budgets": budgets,
        "winner": winner.seed if winner else None, "winner_dir": str(winner.run_dir) if winner else None,
        "runs": [{"seed": r.seed, "run_dir": str(r.run_dir), "val": {str(k): v for k, v in r.val.items()},
                  "curve": r.curve, "continued": r.continued, "error": r.error} for r in runs],
    }, indent=2))
    from lmsprint.plots import plot_restarts

    plot_restarts([(f"seed {r.seed}", r.curve, r.continued, r is winner) for r in runs], out / "restarts.png",
                  budgets=budgets)
    return RestartsResult(out, runs, budgets, winner, table)


def summary_table(runs: Sequence[RestartRun], budgets: Sequence[int], winner: RestartRun | None) -> str:
    """Markdown table: one row per seed (best first), the validation loss at each budget, and its fate."""
    head = ["rank", "seed", *(f"val @ {b}" for b in budgets), "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(sorted(runs, key=_rank_key), 1):
        cells = [f"{r.val[b]:.4f}" if b in r.val else "-" for b in budgets]
        status = ("**winner**" if r is winner else "continued" if r.continued
                  else f"failed: {r.error}" if r.error else f"stopped at {r.reached}")
        lines.append("| " + " | ".join([str(i), str(r.seed), *cells, status]) + " |")
    return "\n".join(lines)


__all__ = ["RestartRun", "RestartsResult", "restarts", "summary_table", "train_command"]
