"""The run's batches: the training loader (with its curriculum), the fixed validation set, the run length, and a
prefetcher that builds the next step's batch while the device works on this one."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from lmsprint.config import RunConfig
from lmsprint.data.batching import TokenStream, epoch_plan
from lmsprint.data.curriculum import SeqLenSchedule
from lmsprint.data.loader import Loader, MicroBatch, StepBatch, eval_batches
from lmsprint.errors import ConfigError, DataError


def micro_batch_rows(t: Any, world: int) -> int:
    """Rows per forward pass on each of ``world`` processes (ConfigError when the batch does not split)."""
    micro = t.micro_batch_size or max(1, t.batch_size // world)
    if t.batch_size % (micro * world) != 0:
        raise ConfigError(f"--train.batch_size={t.batch_size} is not divisible by --train.micro_batch_size="
                          f"{micro} x {world} processes; pick sizes with batch = micro x processes x k")
    return micro


def check_streams(cfg: RunConfig, train: TokenStream, val: TokenStream) -> None:
    """The data can make the run's rows and a validation loss (checked before the model is built): rows of
    --data.seq_len tokens (pack, best-fit, random) need more training tokens than that, or every row would be
    mostly padding, and as wide (seq_len 1,000,000 on a small corpus: gigabytes of padding); a validation loss
    needs a token and its next one."""
    d = cfg.data
    if d.batching in ("pack", "best-fit", "random") and train.n_tokens <= d.seq_len:
        raise DataError(f"--data.seq_len={d.seq_len:,} is not shorter than the training data ({train.n_tokens:,} "
                        f"tokens): every --data.batching={d.batching} row would be mostly padding; use a "
                        f"--data.seq_len below {train.n_tokens:,}, or more data")
    if min(val.n_tokens, cfg.train.eval_tokens) < 2:
        raise DataError(f"the validation data holds {val.n_tokens} token(s): no token has a next one to predict, so "
                        "there is no validation loss; hold out more data (--data.val_fraction, --data.val_source)")


def total_steps(cfg: RunConfig, stream: TokenStream) -> int:
    """Optimizer steps of the run: --train.steps, or --train.epochs passes over the training rows."""
    t, d = cfg.train, cfg.data
    if t.epochs is None:
        return t.steps
    rows = epoch_plan(stream, d.batching, d.seq_len, seed=t.seed, epoch=0, batch_rows=t.batch_size,
                      bucket_window=d.bucket_window).n_rows
    return max(1, math.ceil(t.epochs * rows / t.batch_size))


def build_loader(cfg: RunConfig, stream: TokenStream, *, total_steps: int, micro_rows: int, rank: int, world: int,
                 pad_id: int) -> Loader:
    """The training loader of this rank, with the sequence-length curriculum if one is configured."""
    d, t = cfg.data, cfg.train
    curriculum = None
    if d.seq_schedule != "none" or d.short_mix > 0:
        curriculum = SeqLenSchedule(d.seq_schedule, d.seq_len, d.seq_start, total_steps,
                                    warmup=d.seq_warmup, milestones=tuple(d.seq_milestones),
                                    multiple=d.seq_multiple, tokens_per_step=t.batch_size * d.seq_len,
                                    short_mix=d.short_mix)
    return Loader(stream, strategy=d.batching, seq_len=d.seq_len, batch_rows=t.batch_size, micro_rows=micro_rows,
                  rank=rank, world=world, seed=t.seed, doc_mask=d.doc_mask, curriculum=curriculum,
                  pad_multiple=d.pad_multiple, bucket_window=d.bucket_window, pad_id=pad_id)


def eval_set(cfg: RunConfig, stream: TokenStream, loader: Loader, *, micro_rows: int, rank: int, world: int,
             pad_id: int, device: torch.device) -> list[MicroBatch]:
    """The fixed validation micro-batches of this rank, on the device for the whole run (copied once, not at
    every evaluation)."""
    d = cfg.data
    batches = eval_batches(stream, seq_len=d.seq_len, micro_rows=micro_rows, max_tokens=cfg.train.eval_tokens,
                           rank=rank, world=world, masked=loader.masked, doc_mask=d.doc_mask, pad_id=pad_id)
    return [mb.to(device) for mb in batches]


class Prefetcher:
    """Step batches on the device, the next one built ahead; its state is the loader's before that batch.

    ``state_dict`` is what a checkpoint saves: loading it and asking for the same step gives the batch that was
    pending, so a resumed run sees exactly the batches of an uninterrupted one.
    """

    def __init__(self, loader: Loader, device: torch.device) -> None:
        self.loader, self.device = loader, device
        self._pending: StepBatch | None = None
        self._state: dict[str, int] = {}

    def prefetch(self, step: int) -> StepBatch:
        """Build step ``step``'s batch now (returned, and kept for :meth:`take`)."""
        self._state = self.loader.state_dict()
        batch = self.loader.next(step)
        self._pending = replace(batch, micro=[mb.to(self.device) for mb in batch.micro])
        return self._pending

    def take(self, step: int) -> StepBatch:
        """Step ``step``'s batch: the prefetched one, or built now."""
        batch = self._pending if self._pending is not None else self.prefetch(step)
        self._pending = None
        return batch

    def state_dict(self) -> dict[str, int]:
        return dict(self._state) if self._pending is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loader.load_state_dict(state)
        self._pending = None

    def reseed(self, seed: int) -> None:
        """A new data order from the current position (after a rollback)."""
        self.loader.reseed(seed)
        self._pending = None
