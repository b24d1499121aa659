"""The budget planner against a grid of hand-picked sizes (docs/budget.md).

For each wall-clock budget, every size of the grid (rungs of ``lmsprint.model.presets.ladder``) is trained for the
steps it fits in that budget on this machine (what the planner would give it: its throughput measured here, the
batch halved below 200 steps, a wsd schedule with the default warm-up and a 20% cool-down), and the final
validation losses are compared with the size the planner picks. The grid runs have a fixed step count, so their
losses do not depend on how loaded the machine is while they train; only the throughput measurement does (the
fastest of ``--repeats`` measurements is kept). ``--real`` also runs ``lmsprint train --train.budget=B`` itself for
every budget and records its wall time, launch to exit.

CPU (this project's 2-core machine; about 35 minutes of training for budgets 1, 2, 4 minutes and 4 sizes):

    PYTHONPATH=src python bench/budget_study.py run --out bench/results/budget-cpu --budgets 1m,2m,4m \
        --sizes 0,1,2,3 --real
    python bench/budget_study.py report bench/results/budget-cpu --png docs/img/budget-cpu.png

H200 (not run yet: about 4 GPU-hours for 1-30 minutes with 5 sizes around each pick; trim --budgets/--around),
and issue 15's acceptance runs (`lmsprint train --train.budget=2m` and the default `lmsprint train`, ~5 minutes):

    PYTHONPATH=src python bench/budget_study.py acceptance --out $OUT/budget-h200-acceptance --budget 2m

    PYTHONPATH=src python bench/budget_study.py run --out $OUT/budget-h200-enwiki --recipe fast \\
        --data .data/prep --budgets 1m,2m,5m,10m,30m --around 2 --real
    PYTHONPATH=src python bench/budget_study.py run --out $OUT/budget-h200-stdlib --recipe fast \\
        --budgets 1m,2m,5m,10m,30m --around 2 --real

Results are appended to OUT/results.json as each run ends (a second call skips what is there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

STARTUP_S = 10.0
"""Seconds of start-up (interpreter, torch, data, measuring) the grid's plans leave out of each budget."""


def load(out: Path) -> dict[str, Any]:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else {"costs": {}, "grid": [], "real": [], "machine": {}}


def save(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return math.nan


def base_config(args: argparse.Namespace, extra: list[str] | None = None) -> Any:
    from lmsprint.config import build_config

    data = [f"--data.source={args.data}"] if args.data else []
    return build_config(args.recipe, [*data, "--model.preset=auto", "--train.budget=1m", "--log.progress=false",
                                      "--log.plot=false", *(extra or [])])


def sized(cfg: Any, shape: Any) -> Any:
    from dataclasses import replace

    return replace(cfg.model, n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd)


def measure_costs(args: argparse.Namespace, results: dict[str, Any], indices: list[int]) -> dict[int, Any]:
    """The cost of each size, the fastest of ``--repeats`` measurements (the least disturbed by other jobs)."""
    from lmsprint.data.prepare import prepared_data
    from lmsprint.distributed import resolve_device
    from lmsprint.model import resolve_model_config
    from lmsprint.model.presets import ladder
    from lmsprint.planner import Cost
    from lmsprint.training.batches import micro_batch_rows
    from lmsprint.training.throughput import device_name, measure

    cfg = base_config(args)
    data = prepared_data(cfg.data, progress=False)
    device = resolve_device(cfg.train.device)
    seq, t = cfg.data.seq_len, cfg.train
    val = sum(s.header.n_tokens for s in data.val)
    eval_rows = math.ceil(min(t.eval_tokens, val) / seq)
    results["machine"] = {"device": device_name(device), "corpus_tokens": sum(s.header.n_tokens for s in data.train),
                          "startup_s": STARTUP_S, "recipe": args.recipe, "data": args.data or cfg.data.source}
    costs = {}
    for i in indices:
        if str(i) in results["costs"]:
            costs[i] = Cost(**results["costs"][str(i)]["cost"])
            continue
        gpt = resolve_model_config(sized(cfg, ladder()[i]), vocab_size=data.tokenizer.vocab_size, block_size=seq)
        runs = [measure(cfg, gpt, device=device, rows=t.batch_size, micro=micro_batch_rows(t, 1), eval_rows=eval_rows)
                for _ in range(args.repeats)]
        costs[i] = min(runs, key=lambda c: c.step_s)
        results["costs"][str(i)] = {"cost": costs[i].__dict__, "all_step_s": [c.step_s for c in runs],
                                    "load": loadavg(), "shape": [gpt.n_layer, gpt.n_head, gpt.n_embd]}
        print(f"size {i} ({gpt.n_layer}x{gpt.n_embd}): {costs[i].step_s:.3f}s/step of {t.batch_size} rows "
              f"(of {[round(c.step_s, 3) for c in runs]}), load {loadavg():.1f}", flush=True)
        save(args.out, results)
    return costs


def plan_for(args: argparse.Namespace, results: dict[str, Any], costs: list[Any], seconds: float,
             ratio: float, min_steps: int) -> Any:
    from lmsprint import planner

    cfg = base_config(args)
    t = cfg.train
    return planner.plan([lambda c=c: c for c in costs], budget=seconds, spent=STARTUP_S,
                        corpus_tokens=results["machine"]["corpus_tokens"], seq_len=cfg.data.seq_len,
                        batch_size=t.batch_size, micro_batch_size=t.micro_batch_size, ckpt_every=t.ckpt_every,
                        tokens_per_param=ratio, max_epochs=t.max_epochs, min_steps=min_steps)


def run_grid_point(args: argparse.Namespace, budget: str, i: int, cost: Any, results: dict[str, Any]) -> None:
    """Train size ``i`` for the steps it fits in ``budget`` (fixed steps: the planned wsd run, minus the timing)."""
    from lmsprint.config import parse_duration
    from lmsprint.model.presets import ladder
    from lmsprint.schedules import default_warmup
    from lmsprint.training.run import train

    try:
        p = plan_for(args, results, [cost], parse_duration(budget), 1.0, args.min_steps)
    except ValueError as e:  # the size does not fit in the budget at all
        results["grid"].append({"budget": budget, "size": i, "params": cost.params, "fits": False,
                                "min_steps": args.min_steps})
        print(f"{budget} size {i}: does not fit ({e})", flush=True)
        save(args.out, results)
        return
    if any(g["budget"] == budget and g["size"] == i and g.get("batch") == p.batch_size for g in results["grid"]):
        return  # the same run under another batch rule
    shape = ladder()[i]
    cfg = base_config(args, [f"--model.n_layer={shape.n_layer}", f"--model.n_head={shape.n_head}",
                             f"--model.n_embd={shape.n_embd}", "--train.budget=none", f"--train.steps={p.steps}",
                             f"--train.batch_size={p.batch_size}", f"--train.eval_every={p.eval_every}",
                             *([f"--train.micro_batch_size={p.micro_batch_size}"] if p.micro_batch_size else []),
                             "--schedule.name=wsd", f"--schedule.warmup_steps={default_warmup(p.steps)}",
                             "--train.ckpt_every=0"])
    run_dir = args.out / "runs" / f"{budget}-size{i}-b{p.batch_size}"
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    r = train(cfg, run_dir=run_dir)
    results["grid"].append({"budget": budget, "size": i, "params": cost.params, "steps": p.steps,
                            "batch": p.batch_size, "tokens": p.tokens, "tokens_per_param": p.tokens_per_param,
                            "final": r.val_loss, "best": r.best_val_loss, "seconds": time.time() - t0,
                            "load": loadavg(), "min_steps": args.min_steps})
    print(f"{budget} size {i}: {p.steps} steps of {p.batch_size}, {p.tokens_per_param:.1f} tokens/param -> "
          f"{r.val_loss:.4f} (best {r.best_val_loss:.4f}), {time.time() - t0:.0f}s, load {loadavg():.1f}", flush=True)
    save(args.out, results)


def run_real(args: argparse.Namespace, budget: str, results: dict[str, Any], *, default: bool = False) -> None:
    """``lmsprint train --train.budget=B`` in a fresh process (``default``: plain ``lmsprint train``, whose budget
    is ``auto``): wall time from launch to exit."""
    run_dir = args.out / "runs" / ("default" if default else f"{budget}-planner")
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    how = [] if default else [*(["--config", args.recipe] if args.recipe else []), f"--train.budget={budget}",
                              "--model.preset=auto"]
    cmd = [sys.executable, "-m", "lmsprint", "train", *([args.data] if args.data else []), *how,
           "--log.progress=false", f"--train.out_dir={run_dir.parent}", f"--train.run_name={run_dir.name}"]
    load0 = loadavg()
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **({"OMP_NUM_THREADS": str(args.threads)}
                                                              if args.threads else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:], flush=True)
        return
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config = next(r for r in recs if r["kind"] == "config")
    plan = next(r for r in recs if r["kind"] == "plan")
    summary = recs[-1]
    model = config["model"]
    printed = re.search(r"time: (\S+) of the", proc.stdout)
    record = {"budget": budget, "wall": wall, "printed": printed.group(1) if printed else None,
              "shape": [model["n_layer"], model["n_head"], model["n_embd"]], "params": plan["params"],
              "planned_steps": plan["steps"], "steps": summary["step"], "expected": plan["expected"],
              "final": summary["val_loss"], "best": summary["best_val_loss"],
              "cooldown_start": summary.get("cooldown_start"), "load_before": load0, "load_after": loadavg(),
              "plan": plan, "stdout": proc.stdout[-3000:]}
    results.setdefault("default" if default else "real", []).append(record)
    print(f"{budget} planner: {wall:.1f}s wall, {model['n_layer']}x{model['n_embd']}, {summary['step']} steps -> "
          f"{summary['val_loss']:.4f}, load {load0:.1f}-{loadavg():.1f}", flush=True)
    save(args.out, results)


def cmd_run(args: argparse.Namespace) -> None:
    import torch

    from lmsprint.config import parse_duration
    from lmsprint.model.presets import ladder

    if args.threads:
        torch.set_num_threads(args.threads)
    results = load(args.out)
    budgets = args.budgets.split(",")
    if args.sizes:
        indices = [int(i) for i in args.sizes.split(",")]
    else:  # the planner's pick at each budget, and --around rungs either side
        costs = measure_costs(args, results, list(range(len(ladder()))))  # (measures as the search would not)
        indices = sorted({j for b in budgets for j in range(len(ladder()))
                          if abs(j - plan_for(args, results, [costs[k] for k in sorted(costs)], parse_duration(b),
                                              args.ratio, args.min_steps).size) <= args.around})
    costs = measure_costs(args, results, indices)
    for budget in budgets:
        for i in indices:
            if not any(g["budget"] == budget and g["size"] == i and g.get("min_steps", 200) == args.min_steps
                       for g in results["grid"]):
                run_grid_point(args, budget, i, costs[i], results)
        if args.real and not any(r["budget"] == budget for r in results["real"]):
            run_real(args, budget, results)


def cmd_acceptance(args: argparse.Namespace) -> None:
    """Issue 15's acceptance runs: ``lmsprint train --train.budget=B`` ends within B (+-5%) with its cool-down
    completed, and plain ``lmsprint train`` (the default budget) ends within 0.05 of its best validation loss."""
    results = load(args.out)
    run_real(args, args.budget, results)
    run_real(args, "auto", results, default=True)
    for r in [*results["real"][-1:], *results.get("default", [])[-1:]]:
        print(f"{r['budget']}: {r['wall']:.1f}s wall ({r['printed']} printed), {r['steps']} steps, final "
              f"{r['final']:.4f}, best {r['best']:.4f} (final - best {r['final'] - r['best']:.4f}), cool-down from "
              f"step {r['cooldown_start']}")


def cmd_report(args: argparse.Namespace) -> None:
    from lmsprint import planner
    from lmsprint.config import parse_duration

    results = load(args.dir)
    costs = {int(i): planner.Cost(**c["cost"]) for i, c in results["costs"].items()}
    indices = sorted(costs)
    m = results["machine"]
    ns = argparse.Namespace(recipe=m["recipe"], data=None if m["data"] == "stdlib" else m["data"])
    lines = [f"Machine: {m['device']}; corpus {m['corpus_tokens'] / 1e6:.2f}M training tokens; grid plans leave "
             f"{STARTUP_S:.0f}s of start-up out of each budget; the planner's picks are for its batch rule (halve "
             f"below {args.min_steps} steps).", ""]
    best_ratios = []
    budgets = sorted({g["budget"] for g in results["grid"]}, key=parse_duration)
    for budget in budgets:
        grid = sorted((g for g in results["grid"] if g["budget"] == budget and g.get("fits", True)),
                      key=lambda g: (g["size"], -g["batch"]))
        top = min(grid, key=lambda g: g["final"])
        best_ratios.append(top["tokens_per_param"])
        picks = {}
        for r in args.ratios:
            p = plan_for(ns, results, [costs[i] for i in indices], parse_duration(budget), r, args.min_steps)
            picks.setdefault((indices[p.size], p.batch_size), []).append(f"{r:g}")
        lines += [f"**{budget}**", "", "| size | N | steps x rows | tokens/param | final val loss | best val loss | "
                  "the planner's pick at tokens/param |", "|---|---:|---:|---:|---:|---:|---|"]
        for g in grid:
            shape = results["costs"][str(g["size"])]["shape"]
            by = ", ".join(picks.get((g["size"], g["batch"]), []))
            mark = " **(best)**" if g is top else ""
            lines.append(f"| {shape[0]}x{shape[2]} | {g['params'] / 1e6:.2f}M | {g['steps']} x {g['batch']} | "
                         f"{g['tokens_per_param']:.1f} | {g['final']:.4f}{mark} | {g['best']:.4f} | {by} |")
        for r in (x for x in results["real"] if x["budget"] == budget):
            lines.append(f"| `--train.budget={budget}`: {r['shape'][0]}x{r['shape'][2]} | {r['params'] / 1e6:.2f}M | "
                         f"{r['steps']} (planned {r['planned_steps']}) x {r['plan'].get('batch', '')} | "
                         f"{r['plan']['tokens_per_param']:.1f} (planned) | {r['final']:.4f} | {r['best']:.4f} | wall "
                         f"{r['wall']:.1f}s (plan {r['expected']:.1f}s), load {r['load_before']:.1f}-"
                         f"{r['load_after']:.1f} |")
        lines.append("")
    geo = math.exp(sum(math.log(x) for x in best_ratios) / len(best_ratios)) if best_ratios else math.nan
    lines.append(f"Tokens per parameter of the best grid point: {', '.join(f'{x:.1f}' for x in best_ratios)} "
                 f"(geometric mean {geo:.1f}).")
    print("\n".join(lines))
    if args.png:
        plot(results, budgets, Path(args.png))
        print(f"\nplot: {args.png}")


def plot(results: dict[str, Any], budgets: list[str], png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, budget in enumerate(budgets):
        by_size: dict[int, dict] = {}
        for g in results["grid"]:
            if g["budget"] == budget and g.get("fits", True) and (g["size"] not in by_size
                                                                   or g["final"] < by_size[g["size"]]["final"]):
                by_size[g["size"]] = g  # each size at its best batch
        grid = sorted(by_size.values(), key=lambda g: g["params"])
        color = f"C{k}"
        ax.plot([g["params"] for g in grid], [g["final"] for g in grid], "o-", color=color, label=f"grid, {budget}")
        for r in (x for x in results["real"] if x["budget"] == budget):
            ax.plot([r["params"]], [r["final"]], "*", color=color, markersize=14, markeredgecolor="black",
                    label=f"--train.budget={budget} ({r['wall']:.0f}s)")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("final validation loss")
    ax.set_title("Budget planner vs hand-picked sizes (steps: what each fits in the budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--recipe", default=None, help="recipe (default: the CPU defaults; fast on a GPU)")
    p.add_argument("--data", default=None, help="corpus (default: the recipe's, stdlib)")
    p.add_argument("--budgets", default="1m,2m,4m")
    p.add_argument("--sizes", default=None, help="ladder indices of the grid (default: --around the picks)")
    p.add_argument("--around", type=int, default=2, help="without --sizes: rungs either side of the planner's pick")
    p.add_argument("--ratio", type=float, default=20.0, help="without --sizes: the tokens/param the picks are for")
    p.add_argument("--repeats", type=int, default=3, help="throughput measurements per size (the fastest is kept)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--real", action="store_true", help="also run lmsprint train --train.budget=B for each budget")
    p.add_argument("--min-steps", type=int, default=None,
                   help="the planner's batch rule: halve below this many steps (default: planner.MIN_STEPS)")
    p = sub.add_parser("acceptance")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", default="2m")
    p.add_argument("--data", default=None, help="corpus of the --train.budget run and the default run")
    p.add_argument("--recipe", default=None, help="recipe of the --train.budget run (default: what lmsprint picks)")
    p.add_argument("--threads", type=int, default=0)
    p = sub.add_parser("report")
    p.add_argument("dir", type=Path)
    p.add_argument("--png", default=None)
    p.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[1, 2, 5, 10, 20])
    p.add_argument("--min-steps", type=int, default=None,
                   help="the planner's batch rule the picks are for (default: planner.MIN_STEPS)")
    args = parser.parse_args()
    if getattr(args, "min_steps", 0) is None:
        from lmsprint.planner import MIN_STEPS

        args.min_steps = MIN_STEPS
    {"run": cmd_run, "report": cmd_report, "acceptance": cmd_acceptance}[args.command](args)


if __name__ == "__main__":
    main()
