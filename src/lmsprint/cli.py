"""Command line: argument parsing only; every command calls a library function.

User errors (LmsprintError) print one line and exit with code 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmsprint.errors import LmsprintError

COMMANDS = ("train", "prepare", "sample", "schedule", "data")


def _recipe_default(recipe: str | None, overrides: list[str]) -> str | None:
    """No --config: the fast recipe on a GPU, the dataclass defaults (tiny, CPU-sized) elsewhere."""
    if recipe is not None:
        return recipe
    if any(o.startswith("--train.device") and o.rstrip().endswith("cpu") for o in overrides):
        return None
    import torch

    return "fast" if torch.cuda.is_available() else None


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a recipe name (see configs/) or a TOML file")


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmsprint.config import build_config
    from lmsprint.train.trainer import new_run_dir, resume_config, train

    if args.data is not None:
        overrides = [f"--data.source={args.data}", *overrides]
    if args.resume:
        run_dir = Path(args.resume)
        cfg = resume_config(run_dir, overrides)
    else:
        cfg = build_config(_recipe_default(args.config, overrides), overrides)
        run_dir = new_run_dir(cfg)
    if args.nproc > 1:
        from lmsprint.launch import launch

        return launch(args.nproc, sys.argv[1:])
    result = train(cfg, run_dir=run_dir, resume=bool(args.resume))
    if result.interrupted:
        return 130
    print(f"\nrun: {result.run_dir}")
    if result.val_loss is not None:
        print(f"final validation loss: {result.val_loss:.4f} after {result.step} steps "
              f"({result.train_time:.1f}s of training)")
    if cfg.log.plot and (result.run_dir / "loss.png").exists():
        print(f"loss plot: {result.run_dir / 'loss.png'}")
    if args.sample > 0:
        from lmsprint.sample import sample

        text = sample(result.run_dir, max_new_tokens=args.sample, seed=cfg.train.seed)[0]
        print("sample:\n" + "-" * 60 + f"\n{text}\n" + "-" * 60)
    return 0


def cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmsprint.config import build_config
    from lmsprint.data.prepare import load_prepared, prepare

    cfg = build_config(args.config, overrides).data
    out = prepare(args.source, args.out, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                  val_source=cfg.val_source, val_fraction=cfg.val_fraction, text_docs=cfg.text_docs,
                  workers=cfg.workers, cache_dir=cfg.cache_dir)
    meta = load_prepared(out).meta
    print(f"{out}: {meta['train']['tokens']:,} train tokens in {meta['train']['docs']:,} documents, "
          f"{meta['val']['tokens']:,} val tokens in {meta['val']['docs']:,} documents, vocabulary "
          f"{meta['vocab_size']:,} ({meta['seconds']}s)")
    return 0


def cmd_sample(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmsprint.sample import sample

    if overrides:
        raise LmsprintError(f"unexpected arguments {' '.join(overrides)}; see lmsprint sample --help")
    texts = sample(args.run, prompt=args.prompt, max_new_tokens=args.tokens, temperature=args.temperature,
                   top_k=args.top_k or None, seed=args.seed, num_samples=args.num, device=args.device)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i}")
        print(args.prompt + text)
    return 0


def cmd_schedule(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmsprint.config import build_config
    from lmsprint.schedules import schedule_report

    cfg = build_config(args.config, overrides)
    steps = [int(s) for s in args.at.split(",")] if args.at else None
    png = Path(args.png) if args.png else None
    print(schedule_report(cfg.schedule, peak_lr=cfg.optim.lr, total_steps=cfg.train.steps, at_steps=steps, png=png,
                          compare=args.compare))
    if png:
        print(f"plot: {png}")
    return 0


def cmd_data(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmsprint.config import build_config
    from lmsprint.data.stats import stats_table

    if args.data is not None:
        overrides = [f"--data.source={args.data}", *overrides]
    cfg = build_config(args.config, overrides)
    print(stats_table(cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lmsprint import __version__

    parser = argparse.ArgumentParser(prog="lmsprint", description="Train GPT-style language models fast.")
    parser.add_argument("--version", action="version", version=f"lmsprint {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model", description="Train a model. Any config field can be set "
                       "with --section.key=value; --help-config lists them all.")
    p.add_argument("data", nargs="?", help="corpus: stdlib (default), tinyshakespeare, a prepared directory, a file, "
                   "a directory or a glob")
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest valid checkpoint")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) to launch through torchrun")
    p.add_argument("--sample", type=int, default=200, help="tokens of text to sample at the end (0 = none)")
    p.add_argument("--help-config", action="store_true", help="list every config field and exit")

    p = sub.add_parser("prepare", help="tokenize a corpus into shards")
    p.add_argument("source", help="stdlib, tinyshakespeare, a file, a directory or a glob")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    _add_config_args(p)

    p = sub.add_parser("sample", help="generate text from a trained run")
    p.add_argument("run", help="run directory or checkpoint directory")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=1, help="number of samples")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("schedule", help="print and plot the learning-rate schedule of a config")
    _add_config_args(p)
    p.add_argument("--at", help="comma-separated steps to print (default: a spread over the run)")
    p.add_argument("--png", help="draw the schedule to this PNG")
    p.add_argument("--compare", action="store_true", help="draw cosine, sqrt, linear and wsd decay together")

    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("stats", help="padding waste and tokens per row of every batching strategy")
    p.add_argument("data", nargs="?", help="corpus (default: the config's data.source)")
    _add_config_args(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    handlers = {"train": cmd_train, "prepare": cmd_prepare, "sample": cmd_sample, "schedule": cmd_schedule,
                "data": cmd_data}
    try:
        if getattr(args, "help_config", False):
            from lmsprint.config import help_lines

            print("\n".join(help_lines()))
            sys.exit(0)
        sys.exit(handlers[args.command](args, overrides))
    except LmsprintError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
