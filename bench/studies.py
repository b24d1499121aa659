"""The studies behind docs/benchmarks.md's optimizer, schedule, batching and stability sections.

Many short runs of one small model (preset `small`, 6 x 512, rotary/RMSNorm/SwiGLU, tied 32K embeddings,
32 rows x 1024 tokens per step) on the enwiki2015 corpus, plus the precision comparison on gpt2-124m. Run on
the GPU after `bench/gpu_session.py --phases prepare` (which tokenizes the corpus to .data/prep):

    PYTHONPATH=src python bench/studies.py run --out $OUT --studies precision,optim,clip --deadline 480
    python bench/studies.py report DIR --png-dir docs/img   # Markdown tables + plots from DIR/studies.json

Each finished run is appended to .data/studies.json (kept on a warm machine, so a later call skips what is
done) and copied to OUT/studies.json; at the end the runs' metrics.jsonl files go to OUT/runs.tgz. A run that
would start after ``--deadline`` seconds is left for the next call. ``--smoke`` runs everything on the CPU with
a one-layer model for a few steps, to check the script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tarfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_session import DATA, SMOKE_ARGS, _train  # noqa: E402

STATE = ROOT / ".data" / "studies.json"
STEPS = 300  # 300 x 32 x 1024 = 9.8M tokens, 0.3 epochs of enwiki2015


def small(steps: int = STEPS) -> list[str]:
    """The study model and budget, on top of the gpt2-124m recipe (AdamW, cosine to 10%, clip 1.0)."""
    return ["--model.preset=small", "--train.batch_size=32", "--train.micro_batch_size=32", "--train.epochs=none",
            f"--train.steps={steps}", f"--train.eval_every={steps // 10}", "--train.eval_tokens=262144",
            "--train.log_every=10", "--train.ckpt_every=0", "--train.clip_norm=1.0",
            "--schedule.warmup_fraction=0.02"]


ADAMW = ["--optim.name=adamw", "--optim.betas=0.9,0.95", "--optim.weight_decay=0.1"]
# name -> (overrides, peak lrs of the sweep): each optimizer's recommended settings, lr around its usual value
OPTIMIZERS: dict[str, tuple[list[str], list[float]]] = {
    "adamw": (ADAMW, [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3]),
    # Lion: lr ~1/10 of AdamW's, weight decay x10 (same lr x wd)
    "lion": (["--optim.name=lion", "--optim.betas=0.9,0.99", "--optim.weight_decay=1.0"], [1e-4, 2e-4, 4e-4]),
    # SOAP paper: betas (0.95, 0.95), preconditioner refreshed every 10 steps, lr 3e-3
    "soap": (["--optim.name=soap", "--optim.betas=0.95,0.95", "--optim.weight_decay=0.1",
              "--optim.precondition_frequency=10"], [7.5e-4, 1.5e-3, 3e-3, 6e-3]),
    # AdEMAMix paper: betas (0.9, 0.999, 0.9999), alpha 5, alpha/beta3 warm-ups over the whole run
    "ademamix": (["--optim.name=ademamix", "--optim.betas=0.9,0.999,0.9999", "--optim.alpha=5",
                  "--optim.weight_decay=0.1"], [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3]),
    # Muon reference: lr 0.02, momentum 0.95 Nesterov; AdamW (lr 2e-3) for the embedding and the gains
    "muon": (["--optim.name=muon", "--optim.momentum=0.95", "--optim.embed_lr=2e-3", "--optim.scalar_lr=2e-3",
              "--optim.head_lr=2e-3", "--optim.betas=0.9,0.95", "--optim.weight_decay=0.1"], [0.01, 0.02, 0.04, 0.08]),
}
SCHEDULES: dict[str, list[str]] = {
    "cosine": ["--schedule.name=cosine"],
    "sqrt": ["--schedule.name=sqrt"],
    "linear": ["--schedule.name=linear"],
    "wsd": ["--schedule.name=wsd", "--schedule.decay_fraction=0.2", "--schedule.decay_shape=linear"],
}
WD_LENGTHS = (150, 600)
WD_MODES: dict[str, list[str]] = {
    "fixed 0.1": ["--optim.weight_decay_mode=fixed", "--optim.weight_decay=0.1"],
    "horizon 1.0": ["--optim.weight_decay_mode=horizon", "--optim.wd_horizon=1.0"],
    "horizon 0.25": ["--optim.weight_decay_mode=horizon", "--optim.wd_horizon=0.25"],
}
BATCHING: dict[str, list[str]] = {
    "pad": ["--data.batching=pad"],
    "bucket": ["--data.batching=bucket"],
    "pack": ["--data.batching=pack"],
    "pack + doc mask": ["--data.batching=pack", "--data.doc_mask=true"],
    "best-fit": ["--data.batching=best-fit"],
    "best-fit + doc mask": ["--data.batching=best-fit", "--data.doc_mask=true"],
    "pack + seq schedule": ["--data.batching=pack", "--data.seq_schedule=stages", "--data.seq_start=128",
                            "--data.seq_warmup=0.3"],
}
PRECISIONS = ("bf16", "fp16", "bf16-pure", "fp32")
CLIP_LRS = (6e-3, 1e-2, 3e-2)
RESTART_SEEDS = 8


def _run(study: str, name: str, recipe: str, overrides: list[str], args: argparse.Namespace,
         results: dict[str, list[dict]], **extra: object) -> None:
    """Train one run (unless done or past the deadline) and record it."""
    done = {r["name"] for r in results.get(study, []) if "error" not in r}
    if name in done:
        return
    if time.time() - args.t0 > args.deadline:
        print(f"-- deadline: {study}/{name} left for the next call", flush=True)
        return
    print(f"-- {study}/{name}", flush=True)
    run_name = f"{study}-{name}".replace(" ", "_").replace("/", "_").replace("+", "and")
    try:
        rec = _train(run_name, recipe, overrides, args)
    except Exception:
        rec = {"error": traceback.format_exc()[-2000:]}
    rec.update(name=name, **extra)
    results.setdefault(study, [])
    results[study] = [r for r in results[study] if r["name"] != name] + [rec]
    _save(results, args)


def _save(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    text = json.dumps(results, indent=1, default=str)
    STATE.write_text(text)
    (Path(args.out) / "studies.json").write_text(text)


def study_precision(args: argparse.Namespace, results: dict) -> None:
    """gpt2-124m (recipe as shipped, micro-batch 32) for 120 steps in each precision."""
    base = ["--train.epochs=none", "--train.steps=120", "--train.eval_every=40", "--train.log_every=10",
            "--train.ckpt_every=0"]
    for p in PRECISIONS:
        _run("precision", p, "gpt2-124m", [*base, f"--train.precision={p}"], args, results, precision=p)


def study_optim(args: argparse.Namespace, results: dict) -> None:
    """Each optimizer at three to five peak lrs (widened where the best was at an edge), cosine schedule; the
    AdamW runs double as the schedule study's cosine runs."""
    for opt, (extra, lrs) in OPTIMIZERS.items():
        for lr in lrs:
            _run("optim", f"{opt} lr={lr:g}", "gpt2-124m", [*small(), *extra, f"--optim.lr={lr}"], args, results,
                 optimizer=opt, lr=lr)


def study_schedule(args: argparse.Namespace, results: dict) -> None:
    """AdamW with each decay shape at five peak lrs (cosine taken from the optimizer study)."""
    for shape, extra in SCHEDULES.items():
        if shape == "cosine":
            continue
        for lr in OPTIMIZERS["adamw"][1]:
            _run("schedule", f"{shape} lr={lr:g}", "gpt2-124m", [*small(), *ADAMW, *extra, f"--optim.lr={lr}"],
                 args, results, schedule=shape, lr=lr)


def study_wd(args: argparse.Namespace, results: dict) -> None:
    """AdamW lr 2e-3: fixed weight decay 0.1 against horizon-aware decay, at two run lengths."""
    for steps in WD_LENGTHS:
        for mode, extra in WD_MODES.items():
            _run("wd", f"{mode} @ {steps}", "gpt2-124m", [*small(steps), *ADAMW, "--optim.lr=2e-3", *extra],
                 args, results, mode=mode, steps=steps)


def study_batching(args: argparse.Namespace, results: dict) -> None:
    """Every batching strategy, AdamW lr 2e-3, same rows per step (pad/bucket rows hold fewer real tokens)."""
    for strategy, extra in BATCHING.items():
        _run("batching", strategy, "gpt2-124m", [*small(), *ADAMW, "--optim.lr=2e-3", *extra], args, results)


def study_clip(args: argparse.Namespace, results: dict) -> None:
    """High learning rates with and without clipping at norm 1, guard off (nothing else rescues a run)."""
    for lr in CLIP_LRS:
        for clip in (1.0, 0.0):
            _run("clip", f"lr={lr:g} clip={clip:g}", "gpt2-124m",
                 [*small(150), *ADAMW, f"--optim.lr={lr}", f"--train.clip_norm={clip}", "--guard.enabled=false"],
                 args, results, lr=lr, clip=clip)


def study_restarts(args: argparse.Namespace, results: dict) -> None:
    """`lmsprint restarts` with 8 seeds, probe at 20% of the run, all 8 continued (to compare rankings)."""
    if any("error" not in r for r in results.get("restarts", [])):
        return
    if time.time() - args.t0 > args.deadline:
        print("-- deadline: restarts left for the next call", flush=True)
        return
    import shutil

    from lmsprint.config import build_config
    from lmsprint.restarts import restarts

    out = Path("/tmp/runs/restarts")
    shutil.rmtree(out, ignore_errors=True)
    cfg = build_config("gpt2-124m", [f"--data.source={DATA}", "--log.progress=false", "--log.plot=false", *small(),
                                     *ADAMW, "--optim.lr=2e-3", "--train.seed=0",
                                     *(SMOKE_ARGS if args.smoke else [])])
    t0 = time.time()
    try:
        restarts(cfg, n=RESTART_SEEDS, keep=RESTART_SEEDS, probe_fraction=0.2, out_dir=out, gpus=[])
        rec = json.loads((out / "restarts.json").read_text())
    except Exception:
        rec = {"error": traceback.format_exc()[-2000:]}
    rec.update(name="restarts", wall=time.time() - t0)
    results["restarts"] = [rec]
    _save(results, args)


STUDIES: dict[str, Callable[[argparse.Namespace, dict], None]] = {
    "precision": study_precision, "optim": study_optim, "clip": study_clip, "schedule": study_schedule,
    "wd": study_wd, "batching": study_batching, "restarts": study_restarts,
}


def cmd_run(args: argparse.Namespace) -> None:
    args.t0 = time.time()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".data" / "inductor"))  # as gpu_session.py
    os.environ.setdefault("LMSPRINT_CACHE", "/tmp/lmc-main")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = json.loads(STATE.read_text()) if STATE.exists() and not args.fresh else {}
    for name in args.studies.split(","):
        t0 = time.time()
        print(f"\n######## study {name}", flush=True)
        STUDIES[name](args, results)
        print(f"######## study {name} took {time.time() - t0:.1f}s", flush=True)
    _save(results, args)
    with tarfile.open(Path(args.out) / "runs.tgz", "w:gz") as tar:
        for f in sorted(Path("/tmp/runs").glob("**/metrics.jsonl")):
            tar.add(f, arcname=str(f.relative_to("/tmp/runs")))
        for f in sorted(Path("/tmp/runs/restarts").glob("restarts.*")):
            tar.add(f, arcname=str(f.relative_to("/tmp/runs")))


# ----------------------------------------------------------------------------------------------------------
# report: Markdown tables and plots from studies.json


def _crossing(run: dict, target: float, key: int) -> float | None:
    """key: 1 tokens, 2 time (columns of run["val"] = [step, tokens, time, loss])."""
    from lmsprint.compare import crossing

    return crossing([(v[key], v[3]) for v in run.get("val", [])], target)


def _f(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _mega(x: float | None) -> str:
    return "not reached" if x is None else f"{x / 1e6:.2f}M"


def _secs(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.1f} s"


def _best(runs: list[dict], key: str) -> dict[str, dict]:
    """The run with the lowest final validation loss for each value of ``key``."""
    best: dict[str, dict] = {}
    for r in runs:
        v = r.get("final_val")
        if v is None or not math.isfinite(v):
            continue
        if r[key] not in best or v < best[r[key]]["final_val"]:
            best[r[key]] = r
    return best


def _plot(curves: list[tuple[str, dict]], png: Path, title: str, target: float | None = None,
          axes_keys: tuple[tuple[int, str], ...] = ((1, "training tokens (M)"), (2, "training time (s)"))) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(axes_keys), figsize=(6 * len(axes_keys), 4.2), sharey=True, squeeze=False)
    losses = []
    for label, run in curves:
        val = [v for v in run.get("val", []) if math.isfinite(v[3])]
        losses += [v[3] for v in val[1:]]
        for ax, (k, _) in zip(axes[0], axes_keys):
            scale = 1e-6 if k == 1 else 1.0
            ax.plot([v[k] * scale for v in val], [v[3] for v in val], "o-", ms=3, label=label)
    for ax, (_, xlabel) in zip(axes[0], axes_keys):
        if target is not None:
            ax.axhline(target, color="gray", ls=":", lw=1)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    if losses:
        lo, hi = min(losses), max(losses)
        axes[0][0].set_ylim(lo - 0.03 * (hi - lo), hi + 0.03 * (hi - lo))
    axes[0][0].set_ylabel("validation loss")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def report_optim(res: dict, png_dir: Path) -> str:
    order = list(OPTIMIZERS)
    runs = sorted((r for r in res.get("optim", []) if "error" not in r),
                  key=lambda r: (order.index(r["optimizer"]), r["lr"]))
    if not runs:
        return ""
    best = _best(runs, "optimizer")
    low = max(r["final_val"] for r in best.values())  # the worst optimizer's best final loss: all reach it
    high = best["adamw"]["final_val"] if "adamw" in best else low  # where AdamW ends
    lines = [f"Targets: **A = {low:.4f}**, the highest of the optimizers' best final losses (every optimizer "
             f"reaches it); **B = {high:.4f}**, AdamW's best final loss. Time is training time (evaluation and "
             "compilation excluded), interpolated between evaluations every 30 steps.", "",
             "| optimizer | peak lr | final val loss | tokens to A | time to A | tokens to B | time to B | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        mark = "**" if best.get(r["optimizer"]) is r else ""
        lines.append(f"| {mark}{r['optimizer']}{mark} | {r['lr']:g} | {mark}{_f(r['final_val'])}{mark} | "
                     f"{_mega(_crossing(r, low, 1))} | {_secs(_crossing(r, low, 2))} | "
                     f"{_mega(_crossing(r, high, 1))} | {_secs(_crossing(r, high, 2))} | "
                     f"{_f(r['tokens_per_s'], ',.0f')} |")
    _plot([(f"{k} lr={r['lr']:g}", r) for k, r in best.items()], png_dir / "optimizers.png",
          "Optimizers at their best peak lr (small model, 9.8M tokens)", low)
    return "\n".join(lines)


def report_schedule(res: dict, png_dir: Path) -> str:
    runs = [dict(r, schedule="cosine") for r in res.get("optim", []) if r.get("optimizer") == "adamw"
            and "error" not in r]
    runs += [r for r in res.get("schedule", []) if "error" not in r]
    if not runs:
        return ""
    lrs = sorted({r["lr"] for r in runs})
    best = _best(runs, "schedule")
    lines = ["| schedule | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |",
             "|---|" + "---:|" * (len(lrs) + 1)]
    for shape in SCHEDULES:
        cells = []
        for lr in lrs:
            r = next((x for x in runs if x["schedule"] == shape and x["lr"] == lr), None)
            cells.append(_f(r and r["final_val"]))
        b = best.get(shape)
        lines.append(f"| {shape} | " + " | ".join(cells) + f" | {_f(b and b['final_val'])} |")
    _plot([(f"{k} lr={r['lr']:g}", r) for k, r in best.items()], png_dir / "schedules.png",
          "AdamW, decay shapes at their best peak lr (small model, 9.8M tokens)",
          axes_keys=((0, "step"),))
    return "\n".join(lines)


def report_wd(res: dict, png_dir: Path) -> str:
    runs = [r for r in res.get("wd", []) if "error" not in r]
    if not runs:
        return ""
    lines = ["| weight decay | " + " | ".join(f"{s} steps ({s * 32768 / 1e6:.1f}M tokens)" for s in WD_LENGTHS)
             + " |", "|---|" + "---:|" * len(WD_LENGTHS)]
    for mode in WD_MODES:
        cells = []
        for s in WD_LENGTHS:
            r = next((x for x in runs if x["mode"] == mode and x["steps"] == s), None)
            wd = 0.1 if mode.startswith("fixed") else 1 / (2e-3 * float(mode.split()[1]) * s)
            cells.append(f"{_f(r and r['final_val'])} (λ={wd:.3g})")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    _plot([(r["name"], r) for r in runs], png_dir / "weight_decay.png",
          "AdamW lr 2e-3: fixed vs horizon-aware weight decay", axes_keys=((1, "training tokens (M)"),))
    return "\n".join(lines)


def report_batching(res: dict, png_dir: Path) -> str:
    runs = [r for r in res.get("batching", []) if "error" not in r]
    if not runs:
        return ""
    target = max(r["final_val"] for r in runs if math.isfinite(r["final_val"]))
    lines = [f"Target: {target:.4f} (the highest final loss of the strategies). tokens/s counts real tokens, "
             "not padding.", "",
             "| strategy | waste | tokens/s | real tokens | final val loss | time to target | tokens to target |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        tok = _crossing(r, target, 1)
        lines.append(f"| {r['name']} | {_f(r.get('waste'), '.1%')} | {_f(r['tokens_per_s'], ',.0f')} | "
                     f"{r['val'][-1][1] / 1e6:.2f}M | {_f(r['final_val'])} | "
                     f"{_secs(_crossing(r, target, 2))} | {_mega(tok)} |")
    _plot([(r["name"], r) for r in runs], png_dir / "batching.png",
          "Batching strategies (small model, AdamW, 300 steps of 32 rows)", target)
    return "\n".join(lines)


def report_precision(res: dict) -> str:
    runs = [r for r in res.get("precision", []) if "error" not in r]
    if not runs:
        return ""
    ref = next((r for r in runs if r["precision"] == "bf16"), runs[0])
    lines = ["| precision | tokens/s | vs bf16 | peak memory (GB) | MFU | final val loss (120 steps) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['precision']} | {_f(r['tokens_per_s'], ',.0f')} | "
                     f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x | {_f(r['mem_gb'], '.1f')} | "
                     f"{_f(r['mfu'] and 100 * r['mfu'], '.1f')}% | {_f(r['final_val'])} |")
    return "\n".join(lines)


def report_clip(res: dict, png_dir: Path) -> str:
    runs = sorted((r for r in res.get("clip", []) if "error" not in r), key=lambda r: (r["lr"], -r["clip"]))
    if not runs:
        return ""
    lines = ["| peak lr | clip | final val loss | max train loss after warm-up | max pre-clip grad norm |",
             "|---:|---:|---:|---:|---:|"]
    for r in runs:
        tr = [x for x in r.get("train", []) if x[0] > 10]
        lines.append(f"| {r['lr']:g} | {'1.0' if r['clip'] else 'off'} | {_f(r['final_val'])} | "
                     f"{_f(max((x[3] for x in tr), default=None), '.3f')} | "
                     f"{_f(max((x[4] for x in tr), default=None), '.3g')} |")
    _plot([(r["name"], r) for r in runs], png_dir / "clipping.png", "High learning rates with and without clipping",
          axes_keys=((0, "step"),))
    return "\n".join(lines)


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    for rank, i in enumerate(order, 1):
        ranks[i] = float(rank)
    return ranks


def report_restarts(res: dict) -> str:
    rec = next(iter(res.get("restarts", [])), None)
    if not rec or "error" in rec:
        return ""
    probe, full = str(rec["probe_steps"]), str(rec["full_steps"])
    runs = [r for r in rec["runs"] if probe in r["val"] and full in r["val"]]
    p = [r["val"][probe] for r in runs]
    f = [r["val"][full] for r in runs]
    rp, rf = _ranks(p), _ranks(f)
    n = len(runs)
    spearman = 1 - 6 * sum((a - b) ** 2 for a, b in zip(rp, rf)) / (n * (n * n - 1)) if n > 1 else math.nan
    picked = runs[min(range(n), key=lambda i: p[i])]
    lines = [f"{n} seeds, probe at step {probe} of {full}; every run continued to the end.", "",
             "| seed | val @ probe | probe rank | final val | final rank |", "|---:|---:|---:|---:|---:|"]
    for r, a, b in sorted(zip(runs, rp, rf), key=lambda x: x[1]):
        lines.append(f"| {r['seed']} | {r['val'][probe]:.4f} | {a:.0f} | {r['val'][full]:.4f} | {b:.0f} |")
    lines += ["", f"- Spearman rank correlation probe vs final: {spearman:.2f}.",
              f"- Final loss over seeds: mean {statistics.fmean(f):.4f}, sd {statistics.stdev(f):.4f}, "
              f"best {min(f):.4f}, worst {max(f):.4f}.",
              f"- Best-of-{n} picked by the probe (seed {picked['seed']}): final {picked['val'][full]:.4f}, "
              f"{statistics.fmean(f) - picked['val'][full]:+.4f} against the mean "
              f"({(statistics.fmean(f) - picked['val'][full]) / statistics.stdev(f):.1f} sd)."]
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> None:
    res = json.loads((Path(args.dir) / "studies.json").read_text())
    png_dir = Path(args.png_dir)
    parts = {"Precision (gpt2-124m)": report_precision(res), "Optimizers": report_optim(res, png_dir),
             "Schedules": report_schedule(res, png_dir), "Weight decay": report_wd(res, png_dir),
             "Batching": report_batching(res, png_dir), "Clipping": report_clip(res, png_dir),
             "Restarts": report_restarts(res)}
    text = "\n\n".join(f"### {k}\n\n{v}" for k, v in parts.items() if v) + "\n"
    (Path(args.dir) / "studies.md").write_text(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--out", required=True)
    run.add_argument("--studies", default=",".join(STUDIES))
    run.add_argument("--deadline", type=float, default=480.0, help="start no run after this many seconds")
    run.add_argument("--smoke", action="store_true")
    run.add_argument("--fresh", action="store_true", help="ignore the results of earlier calls")
    rep = sub.add_parser("report")
    rep.add_argument("dir")
    rep.add_argument("--png-dir", default="docs/img")
    args = ap.parse_args()
    if args.cmd == "run":
        cmd_run(args)
    else:
        cmd_report(args)


if __name__ == "__main__":
    main()
