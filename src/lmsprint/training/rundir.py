"""The run directory's life: named, created with its config, metrics file and tokenizer, checked on resume,
removed again when a fresh run fails before it trained."""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path

from lmsprint import distributed as D
from lmsprint.config import RunConfig, build_config, load_toml, to_toml
from lmsprint.data.prepare import PreparedData, prepared_data
from lmsprint.data.tokenizer import load_tokenizer
from lmsprint.errors import CheckpointError, ConfigError
from lmsprint.training import checkpoint as ckpt


def new_run_dir(cfg: RunConfig) -> Path:
    name = cfg.train.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.train.out_dir).expanduser() / name  # ~ expanded, as in --data.source


def write_config(cfg: RunConfig, run_dir: Path) -> None:
    """``RUN/config.toml``, replaced atomically."""
    tmp = run_dir / "config.toml.tmp"
    tmp.write_text(to_toml(cfg))
    os.replace(tmp, run_dir / "config.toml")


def _end_last_line(path: Path) -> None:
    """End a metrics file cut short mid-line by a crash, so the next record starts on a line of its own."""
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def prepare_run_dir(cfg: RunConfig, run_dir: Path, *, resume: bool, is_main: bool) -> None:
    """Create the run directory (rank 0; every rank waits): refuse an existing one unless resuming, clear the
    temporary files of a killed checkpoint write, write the config of a new run and mend the metrics file."""
    if resume:
        if not (run_dir / "config.toml").exists():
            raise CheckpointError(f"no run to resume at {run_dir}; start it without --resume")
    elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"run directory {run_dir} already exists; pass --resume to continue it or choose "
                          "another --train.run_name")
    D.barrier()
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(run_dir / "checkpoints")
            if not resume:  # a resumed run's config is rewritten only once its checkpoint has loaded
                write_config(cfg, run_dir)
            _end_last_line(run_dir / "metrics.jsonl")
        except OSError as e:
            raise ConfigError(f"cannot write the run directory {run_dir} ({e.strerror or e}); choose "
                              "another --train.out_dir or check its permissions and free space") from None
    D.barrier()


def open_data(cfg: RunConfig, run_dir: Path, *, is_main: bool) -> PreparedData:
    """The run's data: rank 0 prepares it (once, cached), the others wait and open it. The run directory keeps
    the tokenizer; a resumed run's data must use the same one."""
    d = cfg.data
    progress = cfg.log.progress and is_main
    if is_main:
        data = prepared_data(d, progress=progress)
    D.barrier()
    if not is_main:
        data = prepared_data(d, progress=progress)
    if is_main:
        tok_path = run_dir / "tokenizer.json"
        if tok_path.exists():  # resuming: the data must still be read with the run's tokenizer
            if load_tokenizer(tok_path).sha != data.tokenizer.sha:
                raise CheckpointError(f"the data {d.source!r} is tokenized with another tokenizer than the run "
                                      f"at {run_dir} was trained with; resume with the run's data settings "
                                      f"(--data.source/--data.tokenizer, or --data.tokenizer={tok_path})")
        else:
            tmp = tok_path.with_name("tokenizer.json.tmp")
            data.tokenizer.save(tmp)
            os.replace(tmp, tok_path)
    return data


class FreshRunDir:
    """Remembers what a new run creates, so a run that fails to start (bad corpus, a micro-batch the GPU cannot
    hold, Ctrl-C while preparing data) leaves no run directory behind."""

    def __init__(self, path: Path, *, resume: bool) -> None:
        self.path = path
        self.existed = path.exists()
        self.fresh = not resume and (not self.existed or (path.is_dir() and not any(path.iterdir())))
        created = path  # the outermost directory this run creates (runs/ too, the first time)
        while not created.parent.exists() and created.parent != created:
            created = created.parent
        self.created = created

    def discard(self) -> None:
        """Remove what this run created (rank 0; nothing for a resumed run or an existing non-empty directory)."""
        if self.fresh and D.launch_rank() == 0:
            shutil.rmtree(self.path if self.existed else self.created, ignore_errors=True)
            if self.existed:
                self.path.mkdir(exist_ok=True)


def resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The saved config of a run, with command-line overrides on top (e.g. more --train.steps)."""
    path = run_dir / "config.toml"
    if not path.exists():
        raise CheckpointError(f"no run to resume at {run_dir} (no config.toml); check the path")
    cfg = build_config(str(path), overrides)
    saved = RunConfig.from_dict(load_toml(str(path)), where=str(path))
    if cfg.model != saved.model or cfg.data.seq_len != saved.data.seq_len:
        raise ConfigError("resume cannot change the model shape (--model.*, --data.seq_len); start a new run instead")
    # the loader's state is a position in the plan these settings make, and the length schedule is a function of
    # the step and the run's total steps: changing them would skip or repeat data, or send lengths backwards
    fixed = [f"--data.{k}" for k in ("batching", "bucket_window", "seq_schedule", "seq_start", "seq_warmup",
                                     "seq_milestones", "seq_multiple", "short_mix")
             if getattr(cfg.data, k) != getattr(saved.data, k)]
    fixed += ["--train.batch_size"] if cfg.train.batch_size != saved.train.batch_size else []
    if saved.data.seq_schedule in ("linear", "stages") and (cfg.train.steps, cfg.train.epochs) != \
            (saved.train.steps, saved.train.epochs):
        fixed.append("--train.steps/--train.epochs (the sequence-length schedule spans them)")
    if fixed:
        raise ConfigError(f"resume cannot change {', '.join(fixed)}; start a new run instead")
    return cfg
