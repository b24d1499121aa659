"""``lmsprint bench``: the least wall-clock time to a target validation loss, recipes side by side.

Every recipe (and seed) is trained in this one process, one after the other, on the same data, evaluated
every ``eval_every`` steps on the same fixed validation tokens. Times are the trainer's ``train_time``: device
synchronised at both edges, compile warm-up, evaluation and checkpointing excluded. The target is a loss: by
default the final loss of the external reference (nanoGPT's own ``train.py``, :mod:`lmsprint.reference`), or
``auto``: the mean final loss of the first recipe (the baseline). For each run the crossing of the target is
interpolated linearly between evaluations in time, tokens and steps. Speed-ups are given against the first
recipe, measured in the same invocation, and against the reference's time to the target.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmsprint.compare import crossing
from lmsprint.config import build_config
from lmsprint.errors import LmsprintError
from lmsprint.plots import plot_bench
from lmsprint.reference import Reference, check_curve
from lmsprint.training.metrics import read_metrics, steady
from lmsprint.training.run import train
from lmsprint.training.trainer import Callback

# One technique of a recipe removed at a time (`--ablate fast`): name -> overrides that switch it off.
ABLATIONS: dict[str, list[str]] = {
    "muon (AdamW instead)": ["--optim.name=adamw", "--optim.lr=2e-3", "--optim.betas=0.9,0.95",
                             "--optim.embed_lr=none", "--optim.head_lr=none", "--optim.scalar_lr=none"],
    "wsd schedule (cosine instead)": ["--schedule.name=cosine"],
    "document masking": ["--data.doc_mask=false"],
    "sequence-length schedule": ["--data.seq_schedule=none"],
    "architecture (rope/rmsnorm/swiglu -> GPT-2's)": ["--model.pos_emb=learned", "--model.norm=layernorm",
                                                     "--model.mlp=gelu", "--model.qk_norm=false",
                                                     "--model.logit_softcap=0"],
    # not a removal: the data-side techniques the recipe leaves out, added back (FlexAttention on a GPU)
    "+ document masking and sequence-length schedule": ["--data.doc_mask=true", "--data.seq_schedule=stages",
                                                        "--data.seq_start=256", "--data.seq_warmup=0.3"],
}


class _StopAtTarget(Callback):
    def __init__(self, target: float) -> None:
        self.target = target

    def on_eval(self, step: int, val_loss: float) -> bool:
        return val_loss <= self.target


@dataclass
class BenchRun:
    name: str
    seed: int
    run_dir: str
    final_loss: float
    train_time: float
    compile_time: float
    steps: int
    tokens: int
    tokens_per_s: float
    mfu: float | None
    graphs: int
    val: list[dict] = field(default_factory=list)  # {"step", "tokens", "time", "loss"}
    to_target: dict[str, float | None] = field(default_factory=dict)  # time / tokens / steps

    def measure(self, target: float) -> None:
        self.to_target = {
            key: crossing([(v[key], v["loss"]) for v in self.val], target) for key in ("time", "tokens", "step")
        }


def run_one(name: str, recipe: str, seed: int, *, overrides: list[str], out_dir: Path,
            stop_at: float | None = None) -> BenchRun:
    """Train one recipe/seed and collect its curve."""
    cfg = build_config(recipe, [*overrides, f"--train.seed={seed}"])
    run_dir = out_dir / f"{name}-seed{seed}".replace(" ", "_").replace("/", "_")
    callbacks = [_StopAtTarget(stop_at)] if stop_at is not None else []
    train(cfg, run_dir=run_dir, callbacks=callbacks)
    records = read_metrics(run_dir / "metrics.jsonl")
    val = [{"step": r["step"], "tokens": r["tokens"], "time": r["time"], "loss": r["loss"]}
           for r in records if r["kind"] == "val"]
    summary = next(r for r in reversed(records) if r["kind"] == "summary")
    return BenchRun(name=name, seed=seed, run_dir=str(run_dir), final_loss=val[-1]["loss"],
                    train_time=summary["train_time"], compile_time=summary["compile_time"], steps=summary["step"],
                    tokens=summary["tokens"], tokens_per_s=steady(records, "tokens_per_s") or 0.0,
                    mfu=steady(records, "mfu"), graphs=summary.get("graphs", 0), val=val)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(mean: float, sd: float, unit: str = "", digits: int = 1) -> str:
    if math.isnan(mean):
        return "not reached"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}{unit}" if sd else f"{mean:.{digits}f}{unit}"


def summarize(runs: list[BenchRun], target: float, *, reference: str | None = None) -> list[dict]:
    """Per recipe: mean and spread over seeds of time/tokens/steps to target and final loss.

    The reference recipe (whose mean final loss is the target) reaches the target, by definition, at the end
    of its budget: its time, tokens and steps to target are those of its whole runs.
    """
    out = []
    for name in dict.fromkeys(r.name for r in runs):
        group = [r for r in runs if r.name == name]
        if name == reference:
            for r in group:
                r.to_target = {"time": r.train_time, "tokens": float(r.tokens), "step": float(r.steps)}
        reached = [r for r in group if r.to_target.get("time") is not None]
        row = {
            "name": name,
            "seeds": len(group),
            "reached": len(reached),
            "time": _to_target(group, "time"),
            "tokens": _to_target(group, "tokens"),
            "steps": _to_target(group, "step"),
            "final": _mean_sd([r.final_loss for r in group]),
            "train_time": _mean_sd([r.train_time for r in group]),
            "compile": _mean_sd([r.compile_time for r in group]),
            "tokens_per_s": _mean_sd([r.tokens_per_s for r in group]),
            "mfu": _mean_sd([r.mfu for r in group if r.mfu is not None]),
        }
        out.append(row)
    return out


def _to_target(group: list[BenchRun], key: str) -> tuple[float, float]:
    """Mean and sd of ``key`` to the target over the seeds; NaN unless every seed reached the target (a mean over
    only those that did would flatter the recipe)."""
    if all(r.to_target.get("time") is not None for r in group):
        return _mean_sd([r.to_target[key] for r in group])
    return math.nan, math.nan


def _speedup(base: float, time: float, *, bound: bool = False) -> str:
    if math.isnan(time) or time <= 0 or math.isnan(base):
        return "-"
    return f"{'≥ ' if bound else ''}{base / time:.2f}x"


def table(rows: list[dict], target: float, *, baseline: str | None = None, ref: Reference | None = None) -> str:
    """Markdown table: per recipe, time/tokens/steps to ``target`` and the speed-ups against the first recipe
    (``baseline``) and the external reference. A baseline that misses the target in some seed is credited with its
    whole training time, so the speed-up against it is a lower bound (marked ≥)."""
    base = next((r for r in rows if r["name"] == baseline), rows[0]) if rows else None
    base_bound = bool(base) and base["reached"] < base["seeds"]
    base_time = (base["train_time"][0] if base_bound else base["time"][0]) if base else math.nan
    ref_time = ref.time_to(target) if ref else None
    lines = [f"Target validation loss: {target:.4f}"]
    if ref is not None:
        lines.append(f"Reference: {ref.name}: " + (f"{ref_time:.1f} s to the target" if ref_time is not None else
                                                     f"never reaches the target (ends at {ref.final_loss:.4f})"))
    lines += ["", "| recipe | seeds | time to target (s) | vs " + (baseline or "first") + " | vs reference | "
              "tokens to target (M) | steps to target | final val loss | train time (s) | compile (s) | tokens/s | "
              "MFU |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tok_m = (r["tokens"][0] / 1e6, r["tokens"][1] / 1e6)
        mfu = f"{r['mfu'][0]:.1%}" if not math.isnan(r["mfu"][0]) else "-"
        time = _fmt(*r["time"]) if not 0 < r["reached"] < r["seeds"] else f"{r['reached']}/{r['seeds']} seeds reached"
        vs_ref = _speedup(ref_time, r["time"][0]) if ref_time is not None else "-"
        lines.append(
            f"| {r['name']} | {r['seeds']} | {time} | {_speedup(base_time, r['time'][0], bound=base_bound)} | "
            f"{vs_ref} | {_fmt(*tok_m, digits=2)} | {_fmt(*r['steps'], digits=0)} | {_fmt(*r['final'], digits=4)} | "
            f"{_fmt(*r['train_time'])} | {_fmt(*r['compile'])} | {r['tokens_per_s'][0]:,.0f} | {mfu} |")
    return "\n".join(lines)


def curve_check(runs: list[BenchRun], name: str, ref: Reference) -> str | None:
    """The reference-curve comparison of recipe ``name`` (every seed), when its runs were evaluated at the
    reference's steps; else None."""
    curves = [{int(v["step"]): v["loss"] for v in r.val} for r in runs if r.name == name]
    try:
        check = check_curve(curves, ref)
    except ValueError:
        return None
    return f"{name} against the reference curve ({ref.name}):\n\n{check.table()}"


def bench(recipes: list[str], *, seeds: list[int], overrides: list[str], out_dir: Path,
          target: float | None = None, reference: Reference | None = None, ablate: str | None = None,
          stop_at_target: bool = False) -> dict:
    """Run every recipe x seed, then (optionally) the ablations of one recipe; write bench.{json,md,png}.

    Args:
        recipes: recipe names or TOML paths; the first is the baseline the others are compared with.
        seeds: seeds per recipe.
        overrides: ``--section.key=value`` applied to every run (e.g. the data source).
        out_dir: where run directories and the report go.
        target: the target loss; None = the first recipe's mean final validation loss.
        reference: an external reference curve (speed-up against its time to the target, and the first recipe's
            curve checked against it); None = none (use None on data other than the reference's).
        ablate: a recipe whose techniques are removed one at a time (first seed, stopped at the target).
        stop_at_target: end runs after recipe 1 once they reach the target (saves time; final loss is then
            the loss at the stop).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: list[BenchRun] = []
    baseline = Path(recipes[0]).stem
    auto = baseline if target is None else None  # an auto target is the baseline's mean final loss

    def report() -> str:
        """Write bench.{md,json,png} for the runs so far (a cut-short benchmark keeps what it measured)."""
        goal = target if target is not None else statistics.fmean(r.final_loss for r in runs)
        for r in runs:
            r.measure(goal)
        rows = summarize(runs, goal, reference=auto)
        md = table(rows, goal, baseline=baseline, ref=reference)
        check = curve_check(runs, baseline, reference) if reference is not None else None
        if check:
            md += "\n\n" + check
        (out_dir / "bench.md").write_text(md + "\n")
        (out_dir / "bench.json").write_text(json.dumps({"target": goal, "runs": [asdict(r) for r in runs],
                                                        "summary": rows, "reference": reference and asdict(reference)},
                                                       indent=1))
        plot_bench(runs, goal, out_dir / "bench.png")
        return md

    for i, recipe in enumerate(recipes):
        for seed in seeds:
            stop = target if (stop_at_target and i > 0 and target is not None) else None
            runs.append(run_one(Path(recipe).stem, recipe, seed, overrides=overrides, out_dir=out_dir, stop_at=stop))
            report()
        if target is None:
            target = statistics.fmean(r.final_loss for r in runs)
    assert target is not None
    if ablate is not None:
        base = build_config(ablate, overrides)
        for name, extra in ABLATIONS.items():
            try:
                changed = build_config(ablate, [*overrides, *extra])
            except LmsprintError as e:
                print(f"ablation {name!r} skipped: {e}")
                continue
            if changed == base:
                continue  # the recipe does not use this technique
            runs.append(run_one(f"{Path(ablate).stem} - {name}", ablate, seeds[0], overrides=[*overrides, *extra],
                                out_dir=out_dir, stop_at=target))
            report()
    md = report()
    return {"target": target, "runs": runs, "summary": summarize(runs, target, reference=auto), "table": md}
