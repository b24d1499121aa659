"""Command line: argument parsing only; every command calls a library function.

User errors (LmsprintError, bad arguments) print one line and exit with code 2. A training run stopped by
SIGINT/SIGTERM checkpoints and exits with 128 + the signal (130, 143); a second signal exits at once (130).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

from lmsprint.config import join_spaced_overrides
from lmsprint.errors import ConfigError, LmsprintError

MIN_TEMPERATURE = 1e-3


def _recipe_default(recipe: str | None, overrides: list[str]) -> str | None:
    """No --config: the fast recipe on a GPU, the dataclass defaults (tiny, CPU-sized) elsewhere."""
    if recipe is not None:
        return recipe
    if any(o.startswith("--train.device") and o.rstrip().endswith("cpu") for o in overrides):
        return None
    import torch

    return "fast" if torch.cuda.is_available() else None


def _budget_default(recipe: str | None, overrides: list[str]) -> list[str]:
    """No --config and no run length (--train.steps, --train.epochs, --train.budget): the run gets the budget
    sized for the machine (--train.budget=auto) and the planner picks the model size for the corpus (the GPU's
    fast recipe names one: --model.preset=auto replaces it, unless a --model size flag is given); its schedule is
    wsd, the one a budget runs (unless --schedule.name is given: then the plan says it replaced it)."""
    if recipe is not None:
        return overrides
    keys = {o[2:].split("=", 1)[0] for o in overrides if o.startswith("--")}
    if keys & {"train.steps", "train.epochs", "train.budget", "train.stop_at_step"}:
        return overrides
    sized = keys & {"model.preset", "model.n_layer", "model.n_head", "model.n_embd"}
    wsd = [] if "schedule.name" in keys else ["--schedule.name=wsd"]
    return ["--train.budget=auto", *([] if sized else ["--model.preset=auto"]), *wsd, *overrides]


def _with_data(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """The positional corpus argument, if given, as the --data.source override (flags after it still win)."""
    return overrides if args.data is None else [f"--data.source={args.data}", *overrides]


def _no_overrides(command: str, overrides: list[str]) -> None:
    """Commands without a config reject stray --section.key arguments instead of ignoring them."""
    if overrides:
        raise LmsprintError(f"unexpected arguments {' '.join(overrides)}; see lmsprint {command} --help")


def _finite_float(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {text!r}")
    return value


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a recipe name (see configs/) or a TOML file")


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmsprint.config import build_config
    from lmsprint.distributed import launch_rank
    from lmsprint.training.budget import Timer, process_start
    from lmsprint.training.plan import plan_run
    from lmsprint.training.run import new_run_dir, print_outcome, resume_config, train

    timer = Timer(started=process_start())  # a --train.budget counts from the launch
    overrides = _with_data(args, overrides)
    if args.resume_fresh_optimizer and not args.resume:
        raise ConfigError("--resume-fresh-optimizer applies to --resume RUN_DIR (a new run's optimizer is fresh)")
    if args.resume:
        if args.config is not None:
            raise ConfigError("--config does not apply to --resume: the run keeps its config.toml; give changes as "
                              "--section.key=value overrides")
        run_dir = Path(args.resume).expanduser()
        cfg = resume_config(run_dir, overrides, fresh_optimizer=args.resume_fresh_optimizer)
    else:
        recipe = _recipe_default(args.config, overrides)
        cfg = build_config(recipe, _budget_default(args.config, overrides))
        run_dir = new_run_dir(cfg)
    if args.dry_run:
        if cfg.train.budget is None or args.resume:
            raise ConfigError("--dry-run prints the plan of a --train.budget run; give a budget (and no --resume)")
        print(plan_run(cfg, timer=timer, progress=cfg.log.progress).describe())
        return 0
    if args.nproc != 1:
        from lmsprint.launch import launch
        from lmsprint.training.run import preflight

        if args.nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
        preflight(cfg, args.nproc)  # config errors once, here, rather than once per worker
        return launch(args.nproc, args.argv)
    result = train(cfg, run_dir=run_dir, resume=bool(args.resume), fresh_optimizer=args.resume_fresh_optimizer,
                   timer=timer)
    if launch_rank() == 0:  # under torchrun: rank 0 reports and samples
        print_outcome(result, cfg, sample_tokens=args.sample, timer=timer)
    # stopped by SIGINT/SIGTERM at a step boundary, checkpointed: 128 + signal, as a shell
    return 128 + int(result.stop_signal or 2) if result.interrupted else 0


def cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmsprint.config import build_config
    from lmsprint.data.prepare import load_prepared, prepare

    cfg = build_config(args.config, overrides).data
    out = prepare(args.source, args.out, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                  val_source=cfg.val_source, val_fraction=cfg.val_fraction, text_docs=cfg.text_docs,
                  workers=cfg.workers)
    meta = load_prepared(out).meta
    print(f"{out}: {meta['train']['tokens']:,} train tokens in {meta['train']['docs']:,} documents, "
          f"{meta['val']['tokens']:,} val tokens in {meta['val']['docs']:,} documents, vocabulary "
          f"{meta['vocab_size']:,} ({meta['seconds']}s)")
    return 0


def cmd_sample(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmsprint.sample import sample

    _no_overrides("sample", overrides)
    for flag, value, low in (("--tokens", args.tokens, 0), ("--num", args.num, 1), ("--top-k", args.top_k, 0)):
        if value < low:
            raise LmsprintError(f"{flag} must be at least {low}, got {value}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise LmsprintError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if 0 < args.temperature < MIN_TEMPERATURE:  # the logits / temperature would overflow float32
        raise LmsprintError(f"--temperature {args.temperature:g} is below {MIN_TEMPERATURE:g}, where sampling is "
                            "greedy anyway; use --temperature 0")
    if not 0 <= args.seed < 2**64:
        raise LmsprintError(f"--seed must be an integer from 0 to 2**64 - 1, got {args.seed}")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 on the command line arrive as lone surrogates
        raise LmsprintError("--prompt is not valid UTF-8 text; pass UTF-8") from None
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise LmsprintError(f"--device: unknown device {args.device!r}; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmsprintError(f"--device {args.device} but no CUDA GPU is available here; use --device cpu")
    from lmsprint.training.best import describe, find_weights

    found = Path(args.run)
    if found.exists():  # (a missing path gets sample's own error)
        found = find_weights(found)
    texts = sample(found, prompt=args.prompt, max_new_tokens=args.tokens, temperature=args.temperature,
                   top_k=args.top_k or None, seed=args.seed, num_samples=args.num, device=args.device)
    print(f"sampled from {describe(found)}", file=sys.stderr)  # once it loaded: an error stays one line
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i}")
        print(text)  # the prompt and its continuation
    return 0


def cmd_schedule(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmsprint.config import build_config
    from lmsprint.schedule_report import schedule_report

    cfg = build_config(_recipe_default(args.config, overrides), overrides)  # what `lmsprint train` would use
    if cfg.train.epochs is not None:
        raise ConfigError("lmsprint schedule needs the run length in steps (epochs depend on the corpus): pass "
                          "--train.epochs=none --train.steps=N")
    try:
        steps = [int(s) for s in args.at.split(",")] if args.at else None
    except ValueError:
        raise ConfigError(f"--at takes comma-separated step numbers, e.g. --at 0,100,500; got {args.at!r}") from None
    png = Path(args.png) if args.png else None
    print(schedule_report(cfg.schedule, peak_lr=cfg.optim.lr, total_steps=cfg.train.steps, at_steps=steps, png=png,
                          compare=args.compare))
    if png:
        print(f"plot: {png}")
    return 0


def cmd_data(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmsprint.config import build_config
    from lmsprint.data.stats import stats_table

    overrides = _with_data(args, overrides)
    cfg = build_config(args.config, overrides)
    print(stats_table(cfg))
    return 0


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmsprint.export import export, how_to_load

    _no_overrides("export", overrides)
    if (args.out is None) == (args.out_pos is None):
        raise ConfigError("lmsprint export needs one output directory: lmsprint export RUN --out DIR")
    from lmsprint.training.best import describe, find_weights

    found = find_weights(Path(args.run)) if Path(args.run).exists() else Path(args.run)  # (missing: export's error)
    out = export(found, args.out or args.out_pos)
    print(f"exported {describe(found)} to {out}; load it with {how_to_load(out)}")
    return 0


def cmd_compare(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmsprint.compare import compare

    _no_overrides("compare", overrides)
    png = Path(args.png) if args.png else None
    print(compare(args.runs, target=args.target, png=png, warn=lambda message: print(message, file=sys.stderr)))
    if png:
        print(f"\nplot: {png}")
    return 0


def cmd_bench(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmsprint.bench import bench

    overrides = _with_data(args, overrides)
    out = Path(args.out)
    from lmsprint.reference import NANOGPT

    reference = NANOGPT if args.reference == "nanogpt" else None
    if args.target == "reference":
        if reference is None:
            raise ConfigError("--target reference needs --reference nanogpt; give a loss or auto instead")
        target: float | None = reference.final_loss
    else:
        target = None if args.target == "auto" else _finite_float(args.target, "--target")
    result = bench(args.recipes.split(","), seeds=[int(s) for s in args.seeds.split(",")], overrides=overrides,
                   out_dir=out, target=target, reference=reference, ablate=args.ablate,
                   stop_at_target=args.stop_at_target)
    print(result["table"])
    print(f"\nreport: {out / 'bench.md'}, plot: {out / 'bench.png'}")
    return 0


def cmd_restarts(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmsprint.config import build_config
    from lmsprint.restarts import restarts

    overrides = _with_data(args, overrides)
    cfg = build_config(_recipe_default(args.config, overrides), overrides)
    gpus: list[int] | None = None
    if args.gpus != "auto":
        try:
            gpus = [int(g) for g in args.gpus.split(",") if g.strip() and g.strip() != "none"]
        except ValueError:
            raise LmsprintError(f"--gpus: expected auto, none or GPU ids like 0,1,2, got {args.gpus!r}") from None
    result = restarts(cfg, n=args.n, keep=args.keep, probe_steps=args.probe_steps, probe_fraction=args.probe_fraction,
                      halving=args.halving, out_dir=args.out, gpus=gpus)
    out = Path(args.out)
    print("\n" + result.table)
    print(f"\nwinner: {result.winner_dir or 'none (every run failed)'}")
    print(f"report: {out / 'restarts.md'}, plot: {out / 'restarts.png'}")
    return 0 if result.winner is not None else 1


class _Parser(argparse.ArgumentParser):
    """argparse with lmsprint's error style: one line, exit code 2 (sub-commands inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    from lmsprint import __version__

    parser = _Parser(prog="lmsprint", description="Train GPT-style language models fast.")
    parser.add_argument("--version", action="version", version=f"lmsprint {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model", description="Train a model. Any config field can be set "
                       "with --section.key=value; --help-config lists them all.")
    p.add_argument("data", nargs="?", help="corpus: stdlib (default), tinyshakespeare, a prepared directory, a file, "
                   "a directory or a glob")
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest valid checkpoint")
    p.add_argument("--resume-fresh-optimizer", action="store_true",
                   help="with --resume: load the weights and data position but start the optimizer afresh (how a "
                   "resume may change --optim.name)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) to launch through torchrun")
    p.add_argument("--sample", type=int, default=200, help="tokens of text to sample at the end (0 = none)")
    p.add_argument("--help-config", action="store_true", help="list every config field and exit")
    p.add_argument("--dry-run", action="store_true", help="with --train.budget: print the plan and exit")

    p = sub.add_parser("prepare", help="tokenize a corpus into shards")
    p.add_argument("source", help="stdlib, tinyshakespeare, a file, a directory or a glob")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    _add_config_args(p)

    p = sub.add_parser("sample", help="generate text from a trained run",
                       description="Continue a prompt with the newest valid checkpoint of a run; each sample ends "
                       "where the model ends the document, or after --tokens tokens.")
    p.add_argument("run", help="run directory or checkpoint directory")
    p.add_argument("--prompt", default="", help="text to continue (default: none, a new document)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="divides the logits: lower is more conservative; 0 = greedy, else at least "
                   f"{MIN_TEMPERATURE:g} (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=50,
                   help="sample among the k most likely tokens, 0 = all (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed, 0 to 2**64 - 1: the same seed gives the same samples (default: %(default)s)")
    p.add_argument("--num", type=int, default=1, help="number of samples (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")

    p = sub.add_parser("schedule", help="print and plot the learning-rate schedule of a config")
    _add_config_args(p)
    p.add_argument("--at", help="comma-separated steps to print (default: a spread over the run)")
    p.add_argument("--png", default="schedule.png",
                   help="draw the schedule to this PNG (default: schedule.png; '' = none)")
    p.add_argument("--compare", action="store_true", help="draw cosine, sqrt, linear and wsd decay together")

    p = sub.add_parser("export", help="write a run as a Hugging Face transformers model",
                       description="Write the newest valid checkpoint of a run as a transformers model directory "
                       "with its tokenizer: Llama for rope+rmsnorm+swiglu models, GPT-2 for learned+layernorm+gelu, "
                       "any other model with lmsprint's modeling file (load it with trust_remote_code=True).")
    p.add_argument("run", metavar="RUN_DIR", help="run directory or checkpoint directory")
    p.add_argument("out_pos", nargs="?", metavar="OUT_DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--out", help="output directory, as OUT_DIR")

    p = sub.add_parser("compare", help="compare runs: loss curves and time/tokens to a target loss",
                       description="Draw the runs' training and validation loss against steps, tokens and training "
                       "time, and print a Markdown table of time and tokens to a target validation loss.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("--target", type=float, help="target validation loss (default: the worst final one)")
    p.add_argument("--png", default="compare.png", help="where to draw the figure (default: compare.png; '' = none)")

    p = sub.add_parser("bench", help="time to a target validation loss, recipes side by side",
                       description="Train recipes one after another on the same data and report the wall time "
                       "(compile and evaluation excluded) each needs to reach a target validation loss.")
    p.add_argument("data", nargs="?", help="corpus (default: each recipe's data.source)")
    p.add_argument("--recipes", default="baseline,fast", help="comma-separated recipes; the first is the reference")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, each recipe runs once per seed")
    p.add_argument("--target", default="reference", help="target validation loss: reference (default: the "
                   "reference's final loss, nanoGPT's 4.588), auto (the first recipe's mean final loss) or a number")
    p.add_argument("--reference", choices=("nanogpt", "none"), default="nanogpt",
                   help="external reference curve for the speed-up column and the baseline's curve check: "
                   "nanoGPT's train.py on enwiki2015 with the shared tokenizer and validation shard (default); none "
                   "on other data")
    p.add_argument("--ablate", help="also run this recipe with one technique removed at a time")
    p.add_argument("--stop-at-target", action="store_true", help="end non-reference runs once they reach the target")
    p.add_argument("--out", default="runs/bench", help="directory for the runs and the report")

    p = sub.add_parser("restarts", help="random restarts: probe several seeds, continue the best",
                       description="Train --n runs that differ only in --train.seed for a short probe (a prefix of "
                       "the full --train.steps schedule), rank them by validation loss and continue the best --keep "
                       "to the full budget. One run per GPU in parallel on several GPUs. Any config field can be set "
                       "with --section.key=value.")
    p.add_argument("data", nargs="?", help="corpus (default: the config's data.source)")
    _add_config_args(p)
    p.add_argument("--n", type=int, default=8, help="number of seeds (runs), from --train.seed upwards")
    p.add_argument("--keep", type=int, default=1, help="runs continued to the full budget")
    p.add_argument("--probe-steps", type=int, help="probe budget in steps")
    p.add_argument("--probe-fraction", type=float, help="probe budget as a fraction of --train.steps (default 0.1)")
    p.add_argument("--halving", action="store_true", help="successive halving: halve the survivors at doubling "
                   "budgets until --keep are left")
    p.add_argument("--gpus", default="auto", help="GPU ids to run on in parallel (e.g. 0,1,2,3), auto (every GPU "
                   "when there are several) or none (one after another in this process)")
    p.add_argument("--out", default="runs/restarts", help="directory for the runs and the summary")

    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("stats", help="padding waste and tokens per row of every batching strategy")
    p.add_argument("data", nargs="?", help="corpus (default: the config's data.source)")
    _add_config_args(p)
    return parser


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM before the training loop (which installs its own handler): end through the normal cleanup (the
    except/finally blocks that remove half-written directories), with the shell's code 143."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # the process's own command line (not an in-process call from Python)
        import signal

        argv = sys.argv[1:]
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = build_parser()
    args, overrides = parser.parse_known_args(join_spaced_overrides(argv))
    args.argv = argv  # what --nproc relaunches
    handlers = {"train": cmd_train, "prepare": cmd_prepare, "sample": cmd_sample, "schedule": cmd_schedule,
                "bench": cmd_bench,
                "restarts": cmd_restarts,
                "data": cmd_data, "export": cmd_export, "compare": cmd_compare}
    try:
        if getattr(args, "help_config", False):
            from lmsprint.config import build_config, help_lines

            values = build_config(args.config, overrides) if args.config else None  # a recipe's values, loaded
            print("\n".join(([f"(defaults: --config {args.config})"] if values else []) + help_lines(values)))
            sys.exit(0)
        sys.exit(handlers[args.command](args, overrides))
    except LmsprintError as e:
        from lmsprint.distributed import launch_rank

        rank = launch_rank()
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        elif not isinstance(e, ConfigError):  # every rank reads the same config: rank 0 reports those
            print(f"error (rank {rank}): {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        sys.exit(1)


if __name__ == "__main__":
    main()
