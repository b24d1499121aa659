"""Trustworthy numbers (issue 18) on one H200: lmsprint against nanoGPT's own curve, warm-up length, optimizers.

    PYTHONPATH=src python bench/trust.py run --out $OUT --deadline 560     # on the GPU, as often as needed
    python bench/trust.py report DIR --png-dir docs/img                     # tables and plots from DIR/trust.json

The corpus is ``../shared/data/enwiki2015`` copied to ``.data/enwiki2015`` (train-*.jsonl.xz, val-00000.jsonl.xz)
with its tokenizer at ``.data/tokenizer-bpe32k.json``: the tokenizer, training text and validation text nanoGPT's
reference run used (``lmsprint.reference``). Tasks, in order (each finished one is kept in ``.data/trust.json``, so
a later call on a warm machine skips it, and copied to OUT):

- ``prepare``: tokenize the corpus into ``.data/prep-ref``.
- ``bench``: the baseline recipe (nanoGPT's) and ``fast``, seeds 0 and 1, timed to nanoGPT's final loss 4.588.
- ``optim``: the ``small`` preset for 300 steps of 32 x 1024 tokens: every optimizer at a grid of peak lr x warm-up
  (2, 10, 20 % of the run; AdamW also 0.1, 0.5 and 5 % at lr 1e-3); where an optimizer's best lies on the edge of
  what it was run at, the grid is widened past that edge (lr x2 or /2, the next warm-up of ``WARMUP_LADDER``) until
  the best is inside it or ``MAX_WIDEN`` steps out; then seeds 1 and 2 at each one's best setting.
- ``ablation``: ``fast`` with AdamW at AdamW's best setting from ``optim`` in place of Muon, timed to 4.588.
- ``levers`` (issue 14; not in the default phases): ``fast`` and each of ``LEVERS`` on it, seeds 0 and 1, timed to
  4.588 in the same call.
- ``warmup``: the baseline recipe (1000 steps) with warm-ups of 0.1, 0.5, 2, 5, 20 and 30 % (10 % is the bench's
  seed 0; 30 % because 20 % was the best).

Every warm-up has nanoGPT's shape, ``lr (it + 1) / (w + 1)``: ``--schedule.start_factor=1/(w+1)``. A task starts
only if its estimated duration fits before ``--deadline`` seconds. ``--smoke`` runs everything on the CPU with a
six-layer, 32-wide model (deep enough for every lever) on a tiny corpus, to check the script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DATA_SRC = ROOT / ".data" / "enwiki2015"
TOKENIZER = ROOT / ".data" / "tokenizer-bpe32k.json"
PREP = ROOT / ".data" / "prep-ref"
STATE = ROOT / ".data" / "trust.json"
RUNS = Path("/tmp/trust-runs")
SMOKE = ["--train.device=cpu", "--train.compile=false", "--model.n_layer=6", "--model.n_embd=32", "--model.n_head=2",
         "--data.seq_len=64", "--train.batch_size=4", "--train.micro_batch_size=4", "--train.eval_tokens=512",
         "--train.precision=fp32"]
SMOKE_STEPS = 20
TARGET = 4.588  # nanoGPT's final validation loss (lmsprint.reference.NANOGPT)

SMALL_STEPS = 300
WARMUP_PCTS = (0.1, 0.5, 2.0, 5.0, 10.0, 20.0)
GRID_WARMUPS = (2.0, 10.0, 20.0)
WARMUP_LADDER = (0.1, 0.5, 2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0)  # where a grid is widened past its edge
MAX_WIDEN = 3  # at most this many lr doublings (or halvings) past the grid
ADAMW = ["--optim.name=adamw", "--optim.betas=0.9,0.95", "--optim.weight_decay=0.1"]
# name -> (overrides, peak lrs): each optimizer's recommended settings; lrs around the best of the earlier sweep
# (2 % warm-up, docs/benchmarks.md before 2026-12-04) and above it, since a longer warm-up tolerates a higher lr
OPTIMIZERS: dict[str, tuple[list[str], tuple[float, ...]]] = {
    "adamw": (ADAMW, (5e-4, 1e-3, 2e-3)),
    "lion": (["--optim.name=lion", "--optim.betas=0.9,0.99", "--optim.weight_decay=1.0"], (2e-4, 4e-4)),
    "soap": (["--optim.name=soap", "--optim.betas=0.95,0.95", "--optim.weight_decay=0.1",
              "--optim.precondition_frequency=10"], (1.5e-3, 3e-3)),
    "ademamix": (["--optim.name=ademamix", "--optim.betas=0.9,0.999,0.9999", "--optim.alpha=5",
                  "--optim.weight_decay=0.1"], (5e-4, 1e-3)),
    "muon": (["--optim.name=muon", "--optim.momentum=0.95", "--optim.embed_lr=2e-3", "--optim.scalar_lr=2e-3",
              "--optim.head_lr=2e-3", "--optim.betas=0.9,0.95", "--optim.weight_decay=0.1"], (0.02, 0.04)),
}
SEEDS = (1, 2)  # beyond the grid's seed 0, at each optimizer's best setting


def warmup_steps(pct: float, steps: int) -> int:
    return max(1, round(pct / 100 * steps))


def warmup_args(pct: float, steps: int) -> list[str]:
    w = warmup_steps(pct, steps)
    return [f"--schedule.warmup_steps={w}", f"--schedule.start_factor={1 / (w + 1)!r}"]


def small(steps: int = SMALL_STEPS) -> list[str]:
    """The study model and budget (as bench/studies.py): small preset, 32 rows of 1024, cosine to 10 %."""
    return ["--model.preset=small", "--train.batch_size=32", "--train.micro_batch_size=32", "--train.epochs=none",
            f"--train.steps={steps}", f"--train.eval_every={steps // 10}", "--train.eval_tokens=262144",
            "--train.log_every=10", "--train.ckpt_every=0", "--train.clip_norm=1.0", "--schedule.name=cosine",
            "--schedule.min_lr_ratio=0.1"]


class Session:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0, self.out = args, time.time(), Path(args.out)
        self.state: dict[str, dict] = json.loads(STATE.read_text()) if STATE.exists() and not args.fresh else {}

    def save(self) -> None:
        text = json.dumps(self.state, indent=1, default=str)
        STATE.parent.mkdir(parents=True, exist_ok=True)
        STATE.write_text(text)
        (self.out / "trust.json").write_text(text)

    def fits(self, name: str, seconds: float) -> bool:
        if self.args.smoke:
            return True
        left = self.args.deadline - (time.time() - self.t0)
        if seconds > left:
            print(f"-- deadline: {name} (~{seconds:.0f}s) left for the next call ({left:.0f}s left)", flush=True)
            return False
        return True

    def task(self, key: str, seconds: float, fn) -> dict | None:  # noqa: ANN001
        """Run ``fn()`` unless already done or past the deadline; keep its record under ``key``."""
        if key in self.state and "error" not in self.state[key]:
            return self.state[key]
        if not self.fits(key, seconds):
            return None
        print(f"-- {key}", flush=True)
        t0 = time.time()
        try:
            rec = fn()
        except Exception:
            rec = {"error": traceback.format_exc()[-3000:]}
            print(rec["error"], flush=True)
        rec["wall"] = time.time() - t0
        self.state[key] = rec
        self.save()
        return rec

    def overrides(self, extra: list[str], *, warmup: list[str] | None = None) -> list[str]:
        """The run's overrides; under --smoke the run is cut to 20 steps, so a warm-up is scaled to them."""
        smoke = [*SMOKE, f"--train.steps={SMOKE_STEPS}", "--train.eval_every=10"] if self.args.smoke else []
        return [f"--data.source={PREP}", "--log.progress=false", "--log.plot=false", *extra, *smoke, *(warmup or [])]

    def steps(self, steps: int) -> int:
        return SMOKE_STEPS if self.args.smoke else steps


def train_record(name: str, recipe: str, overrides: list[str]) -> dict:
    from lmsprint.config import build_config
    from lmsprint.training.metrics import read_metrics
    from lmsprint.training.run import train

    run_dir = RUNS / name.replace(" ", "_").replace("/", "_").replace("%", "pct").replace("=", "")
    shutil.rmtree(run_dir, ignore_errors=True)
    res = train(build_config(recipe, overrides), run_dir=run_dir)
    recs = read_metrics(run_dir / "metrics.jsonl")
    trains = [r for r in recs if r["kind"] == "train"]
    steady = trains[len(trains) // 4 :] or trains
    return {"recipe": recipe, "overrides": overrides, "final_val": res.val_loss, "train_time": res.train_time,
            "compile_time": res.compile_time, "steps": res.step,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
            "mfu": statistics.median(r["mfu"] for r in steady if "mfu" in r) if any("mfu" in r for r in steady)
            else None,
            "val": [[r["step"], r["tokens"], r["time"], r["loss"]] for r in recs if r["kind"] == "val"]}


# ----------------------------------------------------------------------------------------------------------
# tasks


def do_prepare(s: Session) -> None:
    if (PREP / "meta.json").exists():
        return
    if s.args.smoke:
        src = ROOT / ".data" / "trust-smoke"
        src.mkdir(parents=True, exist_ok=True)
        docs = [json.dumps({"text": f"document {i} " + "lorem ipsum dolor sit amet " * (i % 7 + 1)})
                for i in range(300)]
        (src / "train-0.jsonl").write_text("\n".join(docs) + "\n")
        (src / "val-0.jsonl").write_text("\n".join(docs[:40]) + "\n")
        tok = "--data.tokenizer=byte"
    else:
        src, tok = DATA_SRC, f"--data.tokenizer={TOKENIZER}"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "lmsprint", "prepare", str(src), "--out", str(PREP), tok,
                           "--log.progress=false"], capture_output=True, text=True, cwd=ROOT)
    print(proc.stdout[-1500:], proc.stderr[-1500:], f"prepare: rc={proc.returncode} in {time.time() - t0:.1f}s",
          flush=True)
    if proc.returncode != 0:
        raise SystemExit("prepare failed")
    s.state["prepare"] = {"seconds": time.time() - t0, "meta": json.loads((PREP / "meta.json").read_text())}
    s.save()


def do_bench(s: Session) -> None:
    from lmsprint import bench as B

    # estimated seconds: training, evaluation, checkpoint and (first seed) compilation
    for recipe, seed, est in (("baseline", 0, 150.0), ("baseline", 1, 130.0), ("fast", 0, 130.0), ("fast", 1, 45.0)):
        s.task(f"bench {recipe} seed={seed}", est,
               lambda recipe=recipe, seed=seed: asdict(B.run_one(recipe, recipe, seed, overrides=s.overrides(
                   [], warmup=warmup_args(10.0, SMOKE_STEPS) if s.args.smoke and recipe == "baseline" else None),
                   out_dir=RUNS / "bench")))
    write_bench(s)


def write_bench(s: Session) -> None:
    from lmsprint import bench as B
    from lmsprint.plots import plot_bench
    from lmsprint.reference import NANOGPT

    runs = [B.BenchRun(**{k: v for k, v in rec.items() if k != "wall"}) for key, rec in s.state.items()
            if key.startswith(("bench ", "ablation", "lever ")) and "error" not in rec]
    if not runs:
        return
    target = TARGET if not s.args.smoke else statistics.fmean(r.final_loss for r in runs if r.name == "baseline")
    for r in runs:
        r.measure(target)
    md = B.table(B.summarize(runs, target), target, baseline="baseline", ref=NANOGPT)
    check = B.curve_check(runs, "baseline", NANOGPT)
    md += "\n\n" + (check or "(baseline curve not comparable: not evaluated at the reference's steps)")
    (s.out / "bench.md").write_text(md + "\n")
    (s.out / "bench.json").write_text(json.dumps({"target": target, "runs": [asdict(r) for r in runs]}, indent=1))
    plot_bench(runs, target, s.out / "bench.png")
    print(md, flush=True)


def optim_key(opt: str, lr: float, pct: float, seed: int = 0) -> str:
    return f"optim {opt} lr={lr:g} warmup={pct:g}% seed={seed}"


def optim_grid() -> list[tuple[str, float, float]]:
    grid = [(opt, lr, pct) for opt, (_, lrs) in OPTIMIZERS.items() for lr in lrs for pct in GRID_WARMUPS]
    grid += [("adamw", 1e-3, pct) for pct in WARMUP_PCTS if pct not in GRID_WARMUPS]
    return grid


def grid_runs(state: dict) -> dict[str, dict[tuple[float, float], float]]:
    """Each optimizer's seed-0 runs that ended with a finite loss: {(lr, warm-up %): final loss}."""
    runs: dict[str, dict[tuple[float, float], float]] = {}
    for rec in state.values():
        if not isinstance(rec, dict) or rec.get("seed") != 0 or "error" in rec or "optimizer" not in rec:
            continue
        if rec.get("final_val") is not None and math.isfinite(rec["final_val"]):
            runs.setdefault(rec["optimizer"], {})[(rec["lr"], rec["warmup_pct"])] = rec["final_val"]
    return runs


def best_settings(state: dict) -> dict[str, tuple[float, float]]:
    """Each optimizer's (lr, warm-up %) with the lowest seed-0 final loss of the grid and its widenings."""
    return {opt: min(runs, key=runs.__getitem__) for opt, runs in grid_runs(state).items() if opt in OPTIMIZERS}


def widen(state: dict) -> list[tuple[str, float, float]]:
    """Settings just past the edge of each optimizer's grid where its best lies on that edge.

    Along lr (at the best warm-up): the best is the highest lr run there -> twice it; the lowest -> half of it. Along
    warm-up (at the best lr): the next longer or shorter warm-up of WARMUP_LADDER. A setting that was run (even one
    that diverged or failed) is not proposed again, so a diverging lr closes its edge."""
    tried = {tuple(k.split()[1:4]) for k in state if k.startswith("optim ") and k.endswith(" seed=0")}
    tried = {(o, float(lr[3:]), float(p[7:-1])) for o, lr, p in tried}  # "adamw", "lr=0.001", "warmup=20%"
    out = []
    for opt, (lr, pct) in best_settings(state).items():
        lrs = sorted(x for o, x, p in tried if o == opt and p == pct)
        base = OPTIMIZERS[opt][1]
        if lr == lrs[-1] and lr < max(base) * 2**MAX_WIDEN:
            out.append((opt, lr * 2, pct))
        if lr == lrs[0] and lr > min(base) / 2**MAX_WIDEN:
            out.append((opt, lr / 2, pct))
        pcts = sorted(p for o, x, p in tried if o == opt and x == lr)
        i = WARMUP_LADDER.index(pct)
        if pct == pcts[-1] and i + 1 < len(WARMUP_LADDER):
            out.append((opt, lr, WARMUP_LADDER[i + 1]))
        if pct == pcts[0] and i > 0:
            out.append((opt, lr, WARMUP_LADDER[i - 1]))
    return [g for g in out if (g[0], g[1], g[2]) not in tried]


def optim_run(s: Session, opt: str, lr: float, pct: float, seed: int) -> None:
    extra, _ = OPTIMIZERS[opt]
    est = 28.0 if opt == "soap" else 13.0
    s.task(optim_key(opt, lr, pct, seed), est,
           lambda: {**train_record(optim_key(opt, lr, pct, seed), "gpt2-124m", s.overrides(
               [*small(), *extra, f"--optim.lr={lr}", f"--train.seed={seed}"],
               warmup=warmup_args(pct, s.steps(SMALL_STEPS)))),
               "optimizer": opt, "lr": lr, "warmup_pct": pct, "seed": seed})


def do_optim(s: Session) -> None:
    for opt, lr, pct in optim_grid():
        optim_run(s, opt, lr, pct, 0)
    if not all(optim_key(*g) in s.state for g in optim_grid()):
        return  # widen and seed only once every optimizer's grid is known
    while todo := widen(s.state):
        for opt, lr, pct in todo:
            optim_run(s, opt, lr, pct, 0)
        if any(optim_key(*g) not in s.state for g in todo):
            return  # past the deadline: the next call goes on from here
    for seed in SEEDS:
        for opt, (lr, pct) in best_settings(s.state).items():
            optim_run(s, opt, lr, pct, seed)


FAST_STEPS = 250


def ablation_overrides(lr: float) -> list[str]:
    """fast with AdamW (AdamW's best lr of the optimizer study; its warm-up fraction is added) in place of Muon."""
    return [*ADAMW, f"--optim.lr={lr}", "--optim.embed_lr=none", "--optim.head_lr=none", "--optim.scalar_lr=none",
            "--optim.eps=1e-8"]


def do_ablation(s: Session) -> None:
    from lmsprint import bench as B

    best = best_settings(s.state).get("adamw")
    if best is None or not all(optim_key(*g) in s.state for g in optim_grid() if g[0] == "adamw") or any(
            g[0] == "adamw" for g in widen(s.state)):
        print("-- ablation waits for the AdamW grid", flush=True)
        return
    lr, pct = best
    name = f"fast - muon (AdamW lr={lr:g}, warm-up {pct:g}%)"
    overrides = s.overrides(ablation_overrides(lr), warmup=warmup_args(pct, s.steps(FAST_STEPS)))
    stop = None if s.args.smoke else TARGET
    s.task(f"ablation {name}", 60.0,
           lambda: asdict(B.run_one(name, "fast", 0, overrides=overrides, out_dir=RUNS / "bench", stop_at=stop)))
    write_bench(s)


# issue 14's levers, each timed to 4.588 against `fast` in the same call: name -> (overrides, Inductor config).
# Every lever run evaluates every 10 steps (LEVER_EVAL), so the crossing is interpolated over 10 steps, not 25.
LEVER_EVAL = ["--train.eval_every=10"]
MUON_DECAY = ["--optim.weight_decay=0.02", "--optim.embed_weight_decay=0", "--optim.head_weight_decay=0"]
LEVERS: dict[str, tuple[list[str], dict[str, object]]] = {  # most telling first: a call runs what fits
    "fast (same call)": ([], {}),
    # smaller models: the 2-minute budget run's 5 x 192 (fast's architecture) crossed 4.588 after 17.7 s of
    # training at its peak lr (docs/benchmarks.md, issue 14); with a schedule of their own
    "fast, 5x192, 600 steps": (["--model.n_layer=5", "--model.n_embd=192", "--model.n_head=6", "--train.steps=600"],
                               {}),
    "fast, 8x512, 350 steps": (["--model.n_layer=8", "--model.n_embd=512", "--model.n_head=8", "--train.steps=350"],
                               {}),
    "fast, 6x384, 450 steps": (["--model.n_layer=6", "--model.n_embd=384", "--model.n_head=6", "--train.steps=450"],
                               {}),
    # tokens/s
    "fast + cuDNN attention": (["--train.sdpa_backend=cudnn"], {}),
    "fast + FP8 head": (["--train.fp8_head=true"], {}),
    "fast + fused linear cross-entropy": (["--train.fused_ce=true"], {}),
    "fast + compiled Muon": (["--optim.impl=compiled"], {}),
    # fewer tokens
    "fast + value embeddings (3)": (["--model.value_embeds=3"], {}),
    "fast + U-net skips": (["--model.unet_skips=true"], {}),
    "fast, 230 steps": (["--train.steps=230"], {}),
    "fast, batch 32 x 460 steps": (["--train.batch_size=32", "--train.micro_batch_size=32", "--train.steps=460"], {}),
    "fast + smear": (["--model.smear=true"], {}),
    "fast + Polar Express coefficients": (["--optim.ns_coefficients=polar_express"], {}),
    "fast + NorMuon": (["--optim.normuon=true"], {}),
    # modded-nanogpt's table size, 5 x the vocabulary (fast's 32,768): 126 M more parameters at width 768
    "fast + bigram embedding (5 x 32768)": (["--model.bigram_embed=163840"], {}),
    # cautious decay needs a decay (fast has none): on the Muon matrices only, at modded-nanogpt's per-step rate
    # (its lr 0.023 x wd 1.2 x lr 0.023 = 6e-4 ~ 0.03 x 0.02), with plain decay at that rate as its control
    "fast + Muon weight decay 0.02": (MUON_DECAY, {}),
    "fast + cautious weight decay 0.02": ([*MUON_DECAY, "--optim.cautious_wd=true"], {}),
    "fast, 8 layers": (["--model.n_layer=8"], {}),
    "fast, 210 steps": (["--train.steps=210"], {}),
    "fast, cool-down 55%": (["--schedule.decay_fraction=0.55"], {}),
    "fast, batch 32 x 400 steps": (["--train.batch_size=32", "--train.micro_batch_size=32", "--train.steps=400"], {}),
    "fast + coordinate-descent tuning": ([], {"coordinate_descent_tuning": True}),
}


def chosen_levers(args: argparse.Namespace) -> dict[str, tuple[list[str], dict[str, object]]]:
    """LEVERS, or those named by ``--levers`` (in that order), then the ``--lever "NAME=--a=1 --b=2"`` ones."""
    levers = dict(LEVERS) if not args.levers else {n: LEVERS[n] for n in args.levers.split(";")}
    for spec in args.lever or []:
        name, _, overrides = spec.partition("=")
        levers[name] = (overrides.split(), {})
    return levers


def do_levers(s: Session) -> None:
    """Each lever on `fast`, seed 0 of every lever first, stopped at the target (time and tokens to 4.588)."""
    from lmsprint import bench as B

    for seed in (int(x) for x in s.args.lever_seeds.split(",")):
        for name, (extra, inductor) in chosen_levers(s.args).items():

            def run(name: str = name, extra: list[str] = extra, inductor: dict[str, object] = inductor,
                    seed: int = seed) -> dict:
                import torch._inductor.config as inductor_config

                shutil.rmtree(RUNS / "levers" / f"{name}-seed{seed}".replace(" ", "_").replace("/", "_"),
                              ignore_errors=True)  # a re-run on a warm machine starts afresh
                with inductor_config.patch(inductor):
                    return asdict(B.run_one(name, "fast", seed, overrides=s.overrides([*LEVER_EVAL, *extra]),
                                            out_dir=RUNS / "levers", stop_at=None if s.args.smoke else TARGET))

            s.task(f"lever {name} seed={seed}", 45.0, run)
    write_bench(s)


def do_warmup(s: Session) -> None:
    # most telling first (10 % is the baseline recipe: the bench's seed 0); 30 % since 20 % was the best
    for pct in (2.0, 5.0, 20.0, 0.5, 0.1, 30.0):
        s.task(f"warmup baseline {pct:g}%", 135.0, lambda pct=pct: {**train_record(
            f"warmup-{pct:g}", "baseline", s.overrides(["--train.eval_every=500", "--train.seed=0"],
                                                       warmup=warmup_args(pct, s.steps(1000)))), "warmup_pct": pct})


PHASES = {"prepare": do_prepare, "bench": do_bench, "optim": do_optim, "ablation": do_ablation, "warmup": do_warmup,
          "levers": do_levers}


def cmd_run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".data" / "inductor"))  # kept on a warm machine
    os.environ.setdefault("LMSPRINT_CACHE", "/tmp/lmc-trust")
    if args.smoke:
        global PREP, STATE, RUNS
        PREP, STATE, RUNS = ROOT / ".data" / "prep-smoke", ROOT / ".data" / "trust-smoke.json", Path("/tmp/trust-smoke")
    s = Session(args)
    import torch

    s.state["env"] = {"torch": torch.__version__, "python": sys.version.split()[0],
                      "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                      "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=ROOT).stdout.strip()}
    for name in args.phases.split(","):
        print(f"\n######## {name} at {time.time() - s.t0:.0f}s", flush=True)
        PHASES[name](s)
    s.save()
    with tarfile.open(out / "runs.tgz", "w:gz") as tar:
        for f in sorted(RUNS.glob("**/metrics.jsonl")):
            tar.add(f, arcname=str(f.relative_to(RUNS)))
    done = sum(1 for k, v in s.state.items() if k not in ("env", "prepare") and "error" not in v)
    errors = [k for k, v in s.state.items() if "error" in v]
    print(f"\n######## {done} tasks done, errors: {errors or 'none'}; {time.time() - s.t0:.0f}s", flush=True)


# ----------------------------------------------------------------------------------------------------------
# report


def _crossing(rec: dict, target: float, key: int) -> float | None:
    """key 1: tokens, 2: time (columns of rec["val"] = [step, tokens, time, loss])."""
    from lmsprint.compare import crossing

    return crossing([(v[key], v[3]) for v in rec.get("val", [])], target)


def _ms(values: list[float], fmt: str = ".4f") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.fmean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def report_warmup(state: dict, png_dir: Path) -> str:
    big = {rec["warmup_pct"]: rec["final_val"] for k, rec in state.items() if k.startswith("warmup ")
           and "error" not in rec}
    base = state.get("bench baseline seed=0")
    if base and "error" not in base:
        big[10.0] = base["final_loss"]
    smallw = {rec["warmup_pct"]: rec["final_val"] for k, rec in state.items()
              if k.startswith("optim adamw lr=0.001 ") and rec.get("seed") == 0 and "error" not in rec}
    lines = ["| warm-up (% of the run) | baseline, 1000 steps: warm-up steps | final val loss | small, 300 steps "
             "(AdamW lr 1e-3): warm-up steps | final val loss |", "|---:|---:|---:|---:|---:|"]
    for pct in sorted(set(WARMUP_PCTS) | set(big) | set(smallw)):
        lines.append(f"| {pct:g} | {warmup_steps(pct, 1000)} | {big[pct]:.4f} | "
                     if pct in big else f"| {pct:g} | {warmup_steps(pct, 1000)} | - | ")
        lines[-1] += (f"{warmup_steps(pct, SMALL_STEPS)} | {smallw[pct]:.4f} |" if pct in smallw else
                      f"{warmup_steps(pct, SMALL_STEPS)} | - |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, pts in (("baseline (nanoGPT recipe, 124M), 1000 steps", big),
                       ("small (36M, AdamW lr 1e-3), 300 steps", smallw)):
        xs = sorted(pts)
        if xs:
            ax.plot(xs, [pts[x] for x in xs], "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("warm-up length (% of the run, log scale)")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    ax.set_title("AdamW: final loss against warm-up length (one H200)")
    fig.tight_layout()
    png_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_dir / "warmup.png", dpi=100)
    plt.close(fig)
    return "\n".join(lines)


def report_optim(state: dict, png_dir: Path) -> str:
    runs = [r for k, r in state.items() if k.startswith("optim ") and "error" not in r]
    best = best_settings(state)
    lines = ["Grid (seed 0): final validation loss for each peak lr (rows) and warm-up (columns).", ""]
    for opt in OPTIMIZERS:
        pcts = sorted({r["warmup_pct"] for r in runs if r["optimizer"] == opt})
        lines += [f"**{opt}**", "", "| peak lr | " + " | ".join(f"warm-up {p:g}%" for p in pcts) + " |",
                  "|---:|" + "---:|" * len(pcts)]
        for lr in sorted({r["lr"] for r in runs if r["optimizer"] == opt}):
            cells = []
            for p in pcts:
                rec = state.get(optim_key(opt, lr, p))
                v = rec.get("final_val") if rec and "error" not in rec else None
                mark = "**" if best.get(opt) == (lr, p) else ""
                cells.append("-" if v is None else f"{mark}{v:.4f}{mark}")
            lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        lines.append("")
    # each optimizer at its best setting, over seeds
    seeds = {opt: [state.get(optim_key(opt, lr, pct, sd)) for sd in (0, *SEEDS)] for opt, (lr, pct) in best.items()}
    seeds = {opt: [r for r in rs if r and "error" not in r] for opt, rs in seeds.items()}
    finals = {opt: [r["final_val"] for r in rs] for opt, rs in seeds.items()}
    if "adamw" not in finals:
        return "\n".join(lines)
    target = statistics.fmean(finals["adamw"])  # AdamW's mean final loss at its best setting
    common = max(statistics.fmean(v) for v in finals.values())  # every optimizer's mean reaches it
    lines += [f"Each optimizer at its best setting, seeds 0, 1, 2 (mean ± sd). Target **B = {target:.4f}**: AdamW's "
              f"mean final loss at its best setting (AdamW's own row: its whole run); target **A = {common:.4f}**: "
              "the highest of the optimizers' mean final losses. Times are training time (evaluation and "
              "compilation excluded), interpolated between evaluations every 30 steps; '-' where not every seed "
              "reached the target.", "",
              "| optimizer | best peak lr | best warm-up | seeds | final val loss | tokens to A (M) | time to A (s) | "
              "tokens to B (M) | time to B (s) | tokens/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def to(rs: list[dict], tgt: float, key: int, scale: float) -> str:
        if tgt == target and rs is seeds["adamw"]:  # AdamW reaches its own mean final loss at the end, by definition
            return _ms([(r["val"][-1][1] if key == 1 else r["train_time"]) * scale for r in rs],
                       ".2f" if key == 1 else ".1f")
        xs = [_crossing(r, tgt, key) for r in rs]
        return "-" if any(x is None for x in xs) else _ms([x * scale for x in xs], ".2f" if key == 1 else ".1f")

    for opt, rs in seeds.items():
        lr, pct = best[opt]
        lines.append(f"| {opt} | {lr:g} | {pct:g}% | {len(rs)} | {_ms(finals[opt])} | {to(rs, common, 1, 1e-6)} | "
                     f"{to(rs, common, 2, 1)} | {to(rs, target, 1, 1e-6)} | {to(rs, target, 2, 1)} | "
                     f"{statistics.fmean(r['tokens_per_s'] for r in rs):,.0f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for i, (opt, rs) in enumerate(seeds.items()):
        for j, r in enumerate(rs):
            val = r["val"]
            for ax, k, scale in ((axes[0], 1, 1e-6), (axes[1], 2, 1.0)):
                ax.plot([v[k] * scale for v in val], [v[3] for v in val], "-", color=f"C{i}", lw=1, alpha=0.8,
                        label=f"{opt} (lr {best[opt][0]:g}, warm-up {best[opt][1]:g}%)" if j == 0 and k == 1 else None)
    for ax, label in ((axes[0], "training tokens (M)"), (axes[1], "training time (s)")):
        ax.axhline(target, color="gray", ls=":", lw=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    lo = min(v[3] for rs in seeds.values() for r in rs for v in r["val"])
    axes[0].set_ylim(lo - 0.05, lo + 2.0)
    axes[0].set_ylabel("validation loss")
    axes[0].legend(fontsize="small")
    fig.suptitle("Optimizers at their own best lr and warm-up, 3 seeds each (small model, 9.8M tokens, one H200)")
    fig.tight_layout()
    fig.savefig(png_dir / "optimizers.png", dpi=100)
    plt.close(fig)
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> None:
    state = json.loads((Path(args.dir) / "trust.json").read_text())
    png_dir = Path(args.png_dir)
    text = (f"### Warm-up\n\n{report_warmup(state, png_dir)}\n\n### Optimizers\n\n{report_optim(state, png_dir)}\n\n"
            f"env: {state.get('env')}\n")
    (Path(args.dir) / "trust.md").write_text(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--out", required=True)
    run.add_argument("--phases", default=",".join(k for k in PHASES if k != "levers"))
    run.add_argument("--deadline", type=float, default=560.0, help="start no task that would end after this")
    run.add_argument("--smoke", action="store_true")
    run.add_argument("--fresh", action="store_true", help="ignore the results of earlier calls")
    run.add_argument("--levers", help="levers phase: only these LEVERS names, ';'-separated, in this order")
    run.add_argument("--lever", action="append", help='levers phase: one more, "NAME=--a=1 --b=2" (repeatable)')
    run.add_argument("--lever-seeds", default="0,1", help="levers phase: seeds, all levers at each seed in turn")
    rep = sub.add_parser("report")
    rep.add_argument("dir")
    rep.add_argument("--png-dir", default="docs/img")
    args = ap.parse_args()
    cmd_run(args) if args.cmd == "run" else cmd_report(args)


if __name__ == "__main__":
    main()
