"""A CPU pre-screen of issue 14's "fewer tokens" levers: `fast`'s recipe shrunk to a CPU, each lever alone.

    lmsprint prepare ../shared/data/enwiki2015/train-00000.jsonl.xz --out /tmp/enwiki-4k --data.tokenizer=bpe \\
        --data.vocab_size=4096 --data.val_source=../shared/data/enwiki2015/val-00000.jsonl.xz
    PYTHONPATH=src python bench/levers_cpu.py --data /tmp/enwiki-4k --out bench/results/DIR

`fast` (Muon, WSD, ReLU², QK-norm, soft-cap) at 6 layers x 128 wide on sequences of 256, 16 rows a step, 150 steps
(0.6M tokens), fp32, not compiled; the final validation loss of each lever, seeds 0 and 1, all in one process.
This is not issue 14's measurement (the 124M model on the H200 at ~230 steps, timed to 4.588: bench/trust.py's
`levers` phase): a model 1/200th the size, on a 4K vocabulary, for 150 steps. It says whether each
lever trains sanely at its default settings and which way it leans at small scale; nothing more.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CPU = ["--train.device=cpu", "--train.compile=false", "--train.precision=fp32", "--model.n_layer=6",
       "--model.n_embd=128", "--model.n_head=4", "--data.seq_len=256", "--train.batch_size=16",
       "--train.micro_batch_size=16", "--train.steps=150", "--train.eval_every=50", "--train.eval_tokens=65536",
       "--train.log_every=50", "--train.ckpt_every=0", "--log.progress=false", "--log.plot=false"]
MUON_DECAY = ["--optim.weight_decay=0.02", "--optim.embed_weight_decay=0", "--optim.head_weight_decay=0"]
LEVERS: dict[str, list[str]] = {
    "fast": [],
    "+ value embeddings (3)": ["--model.value_embeds=3"],
    "+ U-net skips": ["--model.unet_skips=true"],
    "+ smear": ["--model.smear=true"],
    "+ bigram embedding (5 x vocab)": ["--model.bigram_embed=20480"],
    "+ Polar Express coefficients": ["--optim.ns_coefficients=polar_express"],
    "+ NorMuon": ["--optim.normuon=true"],
    "+ Muon weight decay 0.02": MUON_DECAY,
    "+ cautious weight decay 0.02": [*MUON_DECAY, "--optim.cautious_wd=true"],
    "+ the six above but weight decay, together": ["--model.value_embeds=3", "--model.unet_skips=true",
                                                    "--model.smear=true", "--model.bigram_embed=20480",
                                                    "--optim.ns_coefficients=polar_express", "--optim.normuon=true"],
}


def table(results: dict[str, list[dict]]) -> str:
    """Final validation loss per lever (mean ± sd over its seeds) and against `fast`'s mean."""
    base = statistics.fmean(r["final_loss"] for r in results["fast"])
    lines = ["| lever | seeds | final val loss (mean ± sd) | vs fast |", "|---|---:|---:|---:|"]
    for name, runs in results.items():
        finals = [r["final_loss"] for r in runs]
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        lines.append(f"| {name} | {len(finals)} | {statistics.fmean(finals):.4f} ± {sd:.4f} | "
                     f"{statistics.fmean(finals) - base:+.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a prepared directory (lmsprint prepare)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--report", action="store_true", help="only the table of OUT/levers_cpu.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report:
        print(table(json.loads((out / "levers_cpu.json").read_text())["results"]))
        return
    if args.data is None:
        ap.error("--data is needed to run (or --report)")
    import torch

    from lmsprint import bench as B

    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, extra in LEVERS.items():
            t0 = time.time()
            run = B.run_one(name, "fast", seed, overrides=[f"--data.source={args.data}", *CPU, *extra],
                            out_dir=out / "runs")
            results.setdefault(name, []).append({**asdict(run), "wall": time.time() - t0})
            print(f"{name} seed={seed}: final {run.final_loss:.4f} ({time.time() - t0:.0f}s)", flush=True)
            (out / "levers_cpu.json").write_text(json.dumps(
                {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "overrides": CPU,
                 "results": results}, indent=1))
    (out / "levers_cpu.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
