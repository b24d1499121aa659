"""The run directory's life: named, created with its config, metrics file and tokenizer, checked on resume,
removed again when a fresh run fails before it trained."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from lmsprint import distributed as D
from lmsprint.config import RunConfig, build_config, load_toml, to_toml
from lmsprint.data.prepare import PreparedData, prepared_data
from lmsprint.data.tokenizer import TextTokenizer, load_tokenizer
from lmsprint.errors import CheckpointError, ConfigError, LmsprintError
from lmsprint.training import checkpoint as ckpt
from lmsprint.training.lock import LOCK

TOKENIZER = ckpt.TOKENIZER


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
    """Create the run directory of a new run with its config (rank 0; every rank waits), refusing an existing one;
    a resumed run's directory must hold a run, and nothing in it is written until its checkpoint has loaded
    (:func:`commit_resume`)."""
    if resume:
        if not (run_dir / "config.toml").exists():
            raise CheckpointError(f"no run to resume at {run_dir}; start it without --resume")
    elif run_dir.exists() and (not run_dir.is_dir() or any(p.name != LOCK for p in run_dir.iterdir())):
        raise ConfigError(f"run directory {run_dir} already exists; pass --resume to continue it or choose "
                          "another --train.run_name")
    D.barrier()
    if is_main and not resume:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_config(cfg, run_dir)
        except OSError as e:
            raise ConfigError(f"cannot write the run directory {run_dir} ({e.strerror or e}); choose "
                              "another --train.out_dir or check its permissions and free space") from None
    D.barrier()


def check_resume_step(cfg: RunConfig, step: int, total_steps: int) -> None:
    """A resume's run length and stop step lie ahead of the step its checkpoint reached (else the run would end
    at once, or train past a --train.stop_at_step it never meets)."""
    if total_steps < step:
        raise ConfigError(f"the run is at step {step} already, past the {total_steps} steps --train.steps/--train."
                          "epochs give now; pass more to train further")
    stop = cfg.train.stop_at_step
    if stop is not None and stop <= step:
        raise ConfigError(f"--train.stop_at_step={stop} is not after the step the run is at ({step}); pass a later "
                          "step, or none")


def commit_resume(cfg: RunConfig, run_dir: Path, tokenizer: TextTokenizer, warn: Callable[[str], None]) -> None:
    """What a resume writes once its checkpoint has loaded (rank 0): the config with the resume's overrides, the
    run's tokenizer.json (again, if it was lost or damaged: the checkpoint's copy is the run's tokenizer), the
    metrics file mended after a crash, and the temporary files of a killed checkpoint write removed."""
    try:
        write_config(cfg, run_dir)
        tok_path = run_dir / TOKENIZER
        if not _holds(tok_path, tokenizer):
            if tok_path.exists():
                warn(f"warning: {tok_path} is not the tokenizer the run was trained with (damaged or replaced); "
                     "restored from its checkpoint")
            _write_tokenizer(tokenizer, tok_path)
        _end_last_line(run_dir / "metrics.jsonl")
        ckpt.clean_partial(run_dir / "checkpoints")
    except OSError as e:
        raise CheckpointError(f"cannot write the run directory {run_dir} ({e.strerror or e}); check its "
                              "permissions and free space") from None


def _file_sha(path: Path) -> bytes | None:
    """SHA-256 of a file's bytes (as :attr:`TextTokenizer.sha` is of the tokenizer it holds); None if unreadable."""
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None


def _holds(path: Path, tokenizer: TextTokenizer) -> bool:
    """``path`` is a tokenizer.json of ``tokenizer`` (byte for byte, or as an earlier version wrote it)."""
    if _file_sha(path) == tokenizer.sha:
        return True
    try:
        return path.exists() and load_tokenizer(path).sha == tokenizer.sha
    except LmsprintError:
        return False


def _write_tokenizer(tokenizer: TextTokenizer, path: Path) -> None:
    """``tokenizer.json`` (atomically), byte for byte the checkpoints' copy: its SHA-256 is the tokenizer's."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(tokenizer_bytes(tokenizer))
    os.replace(tmp, path)


def tokenizer_bytes(tokenizer: TextTokenizer) -> bytes:
    """The tokenizer as the run and its checkpoints keep it."""
    return tokenizer.tok.to_str().encode()


def run_tokenizer(run_dir: Path) -> tuple[TextTokenizer, Path] | None:
    """The tokenizer a run was trained with, and where it was read: the copy in its newest checkpoint whose copy
    passes its checksum (the run's tokenizer never changes, so the rest of that checkpoint need not be verified
    here), else the run's tokenizer.json (a run checkpointed before checkpoints held a copy, or not at all); None
    if it has none."""
    for path in reversed(ckpt.list_checkpoints(run_dir / "checkpoints")):
        copy = ckpt.verified_file(path, TOKENIZER)
        if copy is not None:
            return load_tokenizer(copy), copy
    tok_path = run_dir / TOKENIZER
    return (load_tokenizer(tok_path), tok_path) if tok_path.exists() else None


def open_data(cfg: RunConfig, run_dir: Path, *, is_main: bool, resume: bool = False) -> PreparedData:
    """The run's data: rank 0 prepares it (once, cached), the others wait and open it. A new run keeps its
    tokenizer in the run directory; a resumed run's data must use the run's tokenizer (:func:`run_tokenizer`)."""
    d = cfg.data
    progress = cfg.log.progress and is_main
    if is_main:
        data = prepared_data(d, progress=progress)
    D.barrier()
    if not is_main:
        data = prepared_data(d, progress=progress)
    if is_main and resume:
        found = run_tokenizer(run_dir)
        if found is not None and found[0].sha != data.tokenizer.sha:
            raise CheckpointError(f"the data {d.source!r} is tokenized with another tokenizer than the run "
                                  f"at {run_dir} was trained with; resume with the run's data settings "
                                  f"(--data.source/--data.tokenizer, or --data.tokenizer={found[1]})")
    elif is_main:
        try:
            _write_tokenizer(data.tokenizer, run_dir / TOKENIZER)
        except OSError as e:
            raise ConfigError(f"cannot write the run directory {run_dir} ({e.strerror or e}); choose "
                              "another --train.out_dir or check its permissions and free space") from None
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


def resume_config(run_dir: Path, overrides: list[str], *, fresh_optimizer: bool = False) -> RunConfig:
    """The saved config of a run, with command-line overrides on top (e.g. more --train.steps, another --optim.lr).

    Every override is applied for real or refused here, naming why: the model shape, what the saved data position
    and random state refer to, and where the run lives cannot change; the optimizer can only with
    ``fresh_optimizer`` (its saved state is another optimizer's).
    """
    path = run_dir / "config.toml"
    if not path.exists():
        raise CheckpointError(f"no run to resume at {run_dir} (no config.toml); check the path")
    cfg = build_config(str(path), overrides)
    saved = RunConfig.from_dict(load_toml(str(path)), where=str(path))
    if cfg.model != saved.model or cfg.data.seq_len != saved.data.seq_len:
        raise ConfigError("resume cannot change the model shape (--model.*, --data.seq_len); start a new run instead")
    o, was = cfg.optim, saved.optim
    change = (f"--optim.name ({was.name} -> {o.name}): the checkpoint holds {was.name}'s state"
              if o.name != was.name else
              f"--optim.max_precond_dim ({was.max_precond_dim} -> {o.max_precond_dim}): the checkpoint holds SOAP "
              "preconditioners of the old sizes" if o.name == "soap" and o.max_precond_dim != was.max_precond_dim
              else None)
    if change is not None and not fresh_optimizer:
        raise ConfigError(f"resume cannot change {change}; pass --resume-fresh-optimizer to continue the weights "
                          "with a fresh optimizer, or start a new run")
    moved = [f"--train.{k}" for k in ("out_dir", "run_name") if getattr(cfg.train, k) != getattr(saved.train, k)]
    if moved:
        raise ConfigError(f"resume cannot change {' or '.join(moved)}: the run stays in {run_dir}; copy the run "
                          "directory to move it")
    if cfg.train.seed != saved.train.seed:
        raise ConfigError("resume cannot change --train.seed: the data order and random state continue from the "
                          "checkpoint; start a new run for another seed")
    # the loader's state is a position in the plan these settings make, and the length schedule is a function of
    # the step and the run's total steps: changing them would skip or repeat data, or send lengths backwards
    fixed = [f"--data.{k}" for k in ("batching", "bucket_window", "seq_schedule", "seq_start", "seq_warmup",
                                     "seq_milestones", "seq_multiple", "short_mix")
             if getattr(cfg.data, k) != getattr(saved.data, k)]
    fixed += ["--train.batch_size"] if cfg.train.batch_size != saved.train.batch_size else []
    fixed += ["--train.budget (the run was not planned for one)"] if saved.train.budget is None and \
        cfg.train.budget is not None else []
    if saved.data.seq_schedule in ("linear", "stages") and (cfg.train.steps, cfg.train.epochs) != \
            (saved.train.steps, saved.train.epochs):
        fixed.append("--train.steps/--train.epochs (the sequence-length schedule spans them)")
    if fixed:
        raise ConfigError(f"resume cannot change {', '.join(fixed)}; start a new run instead")
    return cfg
