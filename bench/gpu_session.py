"""One device call's worth of measurements, phase by phase, each result saved to OUT as soon as it exists.

    PYTHONPATH=src python bench/gpu_session.py --out $OUT --phases prepare,cold,tests,optim,sweep,profile

Phases:
    prepare   tokenize the enwiki2015 benchmark corpus (.data/enwiki-src) with the shipped 32K BPE tokenizer
    cold      `lmsprint train --config fast` in a fresh process with empty compile caches: launch to first step
    tests     the GPU-marked tests
    optim     optimizer step time and state bytes on the gpt2-124m parameter set (bench/optim_step.py)
    mfu       tokens/s and MFU of gpt2-124m (rotary/RMSNorm/SwiGLU, SDPA) and of the fast recipe
    sweep     short runs of fast-recipe variants and a full baseline run (tuning the fast recipe)
    profile   where a fast-recipe step's GPU time goes (bench/profile_step.py)

``--smoke`` runs every phase on the CPU with a tiny model and a tiny corpus, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

DATA = ROOT / ".data" / "prep"  # git-ignored: survives between calls on a warm machine
SMOKE_ARGS = ["--train.device=cpu", "--train.compile=false", "--model.n_layer=1", "--model.n_embd=32",
              "--model.n_head=2", "--data.seq_len=128", "--data.seq_start=32", "--train.batch_size=4",
              "--train.micro_batch_size=4", "--train.eval_tokens=512", "--train.precision=fp32"]


def save(out: Path, name: str, obj: object) -> None:
    (out / f"{name}.json").write_text(json.dumps(obj, indent=1, default=str))
    print(f"== saved {name}.json", flush=True)


def lmsprint_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmsprint", *args]


def run(cmd: list[str], *, env: dict | None = None, timeout: int = 600) -> tuple[int, str, float]:
    t0 = time.time()
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    dt = time.time() - t0
    tail = (proc.stdout + proc.stderr)[-3000:]
    print(f"$ {' '.join(cmd)}\n  rc={proc.returncode} in {dt:.1f}s\n{tail}", flush=True)
    return proc.returncode, tail, dt


def steady(records: list[dict], key: str) -> float | None:
    from lmsprint.training.metrics import steady as steady_value  # the median after the warm-up windows

    return steady_value(records, key)


def metrics(run_dir: Path) -> list[dict]:
    from lmsprint.training.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def phase_prepare(args: argparse.Namespace, out: Path) -> None:
    if args.smoke:
        src = ROOT / ".data" / "smoke-src"
        src.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"text": f"document {i} " + "lorem ipsum dolor sit amet " * (i % 7 + 1)}) + "\n"
                       for i in range(300))
        (src / "train-0.jsonl").write_text(text)
        (src / "val-0.jsonl").write_text("".join(text.splitlines(keepends=True)[:40]))
        tok = ["--data.tokenizer=byte"]
    else:
        src = ROOT / ".data" / "enwiki-src"
        tok = [f"--data.tokenizer={ROOT / '.data' / 'tokenizer.json'}"]
    shutil.rmtree(DATA, ignore_errors=True)
    rc, tail, dt = run(lmsprint_cmd("prepare", str(src), "--out", str(DATA), *tok))
    meta = json.loads((DATA / "meta.json").read_text()) if rc == 0 else {}
    save(out, "prepare", {"rc": rc, "seconds": dt, "meta": meta, "tail": tail})


def phase_cold(args: argparse.Namespace, out: Path) -> None:
    results = {}
    for label, cache in (("cold", "/tmp/inductor-cold"),):
        shutil.rmtree(cache, ignore_errors=True)
        run_dir = Path("/tmp/runs") / label
        shutil.rmtree(run_dir, ignore_errors=True)
        extra = SMOKE_ARGS if args.smoke else []
        t0 = time.time()
        rc, tail, dt = run(lmsprint_cmd("train", str(DATA), "--config", "fast", "--train.epochs=none",
                                        "--train.steps=60", "--train.eval_every=0", "--train.log_every=10",
                                        f"--train.out_dir={run_dir.parent}", f"--train.run_name={label}",
                                        "--log.progress=false", "--sample=0", *extra),
                           env={"TORCHINDUCTOR_CACHE_DIR": cache, "LMSPRINT_CACHE": "/tmp/lmc-" + label})
        recs = metrics(run_dir) if rc == 0 else []
        first = next((r["wall"] for r in recs if r.get("event") == "first_step"), None)
        compiled = next((r["seconds"] for r in recs if r.get("event") == "compiled"), None)
        summary = next((r for r in recs if r["kind"] == "summary"), {})
        results[label] = {"rc": rc, "launch_to_first_step_s": None if first is None else first - t0,
                          "compile_s": compiled, "process_s": dt, "tokens_per_s": steady(recs, "tokens_per_s"),
                          "mfu": steady(recs, "mfu"), "graphs": summary.get("graphs"), "tail": tail[-800:]}
        save(out, "cold", results)


def phase_tests(args: argparse.Namespace, out: Path) -> None:
    rc, tail, dt = run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "--timeout=300",
                        "--continue-on-collection-errors", "-p", "no:cacheprovider", "tests"]
                       if not args.smoke else [sys.executable, "-m", "pytest", "-q", "tests/test_model.py"],
                       timeout=400)
    save(out, "tests", {"rc": rc, "seconds": dt, "tail": tail})


def phase_optim(args: argparse.Namespace, out: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "optim_step.py"), "--out", str(out / "optim_step.json")]
    if args.smoke:
        cmd += ["--device", "cpu", "--preset", "tiny", "--iters", "3", "--warmup", "1"]
    run(cmd, env={"PYTHONPATH": str(ROOT / "src")})


def _train(name: str, recipe: str, overrides: list[str], args: argparse.Namespace) -> dict:
    from lmsprint.config import build_config
    from lmsprint.training.run import train

    run_dir = Path("/tmp/runs") / name
    shutil.rmtree(run_dir, ignore_errors=True)
    extra = SMOKE_ARGS if args.smoke else []
    cfg = build_config(recipe, [f"--data.source={DATA}", "--log.progress=false", "--log.plot=false", *overrides,
                                *extra])
    t0 = time.time()
    res = train(cfg, run_dir=run_dir)
    recs = metrics(run_dir)
    return {"name": name, "recipe": recipe, "overrides": overrides, "val": [[r["step"], r["tokens"], r["time"],
                                                                              r["loss"]] for r in recs
                                                                             if r["kind"] == "val"],
            "final_val": res.val_loss, "train_time": res.train_time, "compile_time": res.compile_time,
            "tokens_per_s": steady(recs, "tokens_per_s"), "mfu": steady(recs, "mfu"),
            "mem_gb": steady(recs, "mem_gb"), "waste": steady(recs, "waste"), "wall": time.time() - t0,
            "steps": res.step, "train": [[r["step"], r["tokens"], r["time"], r["loss"], r["grad_norm"]]
                                         for r in recs if r["kind"] == "train"]}


def phase_mfu(args: argparse.Namespace, out: Path) -> None:
    results = []
    short = ["--train.epochs=none", "--train.steps=80", "--train.eval_every=0", "--train.log_every=10"]
    for name, recipe, extra in (("gpt2-124m", "gpt2-124m", ["--train.batch_size=64", "--train.micro_batch_size=64"]),):
        try:
            results.append(_train(f"mfu-{name}", recipe, [*short, *extra], args))
        except Exception:
            results.append({"name": name, "error": traceback.format_exc()[-2000:]})
        save(out, "mfu", results)


SWEEP = [
    ("fast", []),
    ("fast-muon.05", ["--optim.lr=0.05"]),
    ("fast-muon.02", ["--optim.lr=0.02"]),
    ("fast-adam-hi", ["--optim.embed_lr=0.05", "--optim.head_lr=0.008", "--optim.scalar_lr=0.02"]),
    ("fast-adamw", ["--optim.name=adamw", "--optim.lr=2e-3", "--optim.embed_lr=none", "--optim.head_lr=none",
                    "--optim.scalar_lr=none", "--optim.betas=0.9,0.95"]),
]


def _variants(name: str, variants: list[tuple[str, list[str]]], args: argparse.Namespace, out: Path,
              results: list[dict] | None = None) -> list[dict]:
    """Short runs of the fast recipe with each variant's overrides, saved to OUT/name.json as they finish."""
    results = [] if results is None else results
    steps = 20 if args.smoke else args.sweep_steps
    for label, extra in variants:
        try:
            results.append(_train(label, "fast", ["--train.epochs=none", f"--train.steps={steps}",
                                                  f"--train.eval_every={max(steps // 5, 1)}", *extra], args))
        except Exception:
            results.append({"name": label, "error": traceback.format_exc()[-2000:]})
        save(out, name, results)
    return results


def phase_sweep(args: argparse.Namespace, out: Path) -> None:
    results = _variants("sweep", SWEEP, args, out)
    try:
        base = ["--train.epochs=none", "--train.steps=60"] if args.smoke else []
        results.append(_train("baseline", "baseline", base, args))
    except Exception:
        results.append({"name": "baseline", "error": traceback.format_exc()[-2000:]})
    save(out, "sweep", results)


def phase_profile(args: argparse.Namespace, out: Path) -> None:
    if args.smoke:
        save(out, "profile", {"skipped": "needs CUDA"})
        return
    from profile_step import profile

    save(out, "profile", profile(str(DATA), "fast", []))


DEBUG = [
    ("fast-causal", ["--data.doc_mask=false", "--data.seq_schedule=none"]),
    ("fast-dense", ["--train.flex_attention=false"]),
    ("fast-flex", []),
]


def phase_debug(args: argparse.Namespace, out: Path) -> None:
    """Is FlexAttention right on this GPU, and does the fast recipe learn with each attention path?"""
    rc, tail, dt = run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--timeout=300",
                        "tests/test_gpu.py"], timeout=400)
    save(out, "tests_gpu", {"rc": rc, "seconds": dt, "tail": tail})
    _variants("debug", DEBUG, args, out)


def phase_bench(args: argparse.Namespace, out: Path) -> None:
    """The time-to-target benchmark: baseline and fast, 2 seeds each, then fast's ablations."""
    from lmsprint.bench import bench

    work = Path("/tmp/bench")
    shutil.rmtree(work, ignore_errors=True)
    extra = [*SMOKE_ARGS, "--train.epochs=none", "--train.steps=30", "--train.eval_every=10",
             "--data.seq_start=32"] if args.smoke else []
    try:
        bench(["baseline", "fast"], seeds=[0, 1], overrides=[f"--data.source={DATA}", "--log.progress=false",
                                                              "--log.plot=false", *extra],
              out_dir=work, ablate="fast")
    finally:
        for name in ("bench.md", "bench.json", "bench.png"):
            if (work / name).exists():
                shutil.copy(work / name, out / name)


def phase_oom(args: argparse.Namespace, out: Path) -> None:
    rc, tail, dt = run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--timeout=200",
                        "-m", "gpu", "-k", "out_of_memory", "tests/test_reliability.py"], timeout=250)
    save(out, "oom", {"rc": rc, "seconds": dt, "tail": tail})


def phase_gputests(args: argparse.Namespace, out: Path) -> None:
    rc, tail, dt = run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--timeout=200",
                        "tests/test_gpu.py"], timeout=250)
    save(out, "tests_gpu", {"rc": rc, "seconds": dt, "tail": tail[-1500:]})


PHASES = {"prepare": phase_prepare, "cold": phase_cold, "tests": phase_tests, "optim": phase_optim, "mfu": phase_mfu,
          "sweep": phase_sweep, "profile": phase_profile, "debug": phase_debug, "bench": phase_bench,
          "oom": phase_oom, "gputests": phase_gputests}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--phases", default="prepare,cold,tests,optim,sweep,profile")
    ap.add_argument("--sweep-steps", type=int, default=200)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".data" / "inductor"))
    os.environ.setdefault("LMSPRINT_CACHE", "/tmp/lmc-main")
    env = {"torch": None}
    import torch

    env["torch"] = torch.__version__
    env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    env["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
    save(out, "env", env)
    for name in args.phases.split(","):
        t0 = time.time()
        print(f"\n######## phase {name}", flush=True)
        try:
            PHASES[name](args, out)
        except Exception:
            traceback.print_exc()
        print(f"######## phase {name} took {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
