"""Out of GPU memory: measure what a training row costs and name the micro-batch that fits."""

from __future__ import annotations

import gc
import math
from pathlib import Path

import torch

from lmsprint.errors import LmsprintError
from lmsprint.model import GPT
from lmsprint.training.precision import autocast


class GPUOutOfMemory(LmsprintError):
    """The GPU ran out of memory; the message names the micro-batch that fits."""


def is_out_of_memory(e: BaseException, device: torch.device) -> bool:
    """torch.OutOfMemoryError, or cuBLAS/cuDNN failing to get a workspace, on a GPU."""
    return device.type == "cuda" and (isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e))


def suggest_micro_batch(bytes_per_row: float, fixed_bytes: float, total_bytes: float, batch_rows: int, *,
                        current: int | None = None, margin: float = 0.9) -> tuple[int, int]:
    """How many rows fit on a GPU, and the micro-batch to use: (rows, micro-batch; 0 when not even one fits).

    Args:
        bytes_per_row: memory one more row of the micro-batch takes (activations), measured.
        fixed_bytes: memory that does not grow with the micro-batch (weights, gradients, optimizer state).
        total_bytes: memory the process can use.
        batch_rows: rows per optimizer step on this GPU; the micro-batch must divide it.
        current: the micro-batch that ran out of memory; the suggestion is smaller.
        margin: fraction of ``total_bytes`` to plan for (the allocator's fragmentation, workspaces).
    """
    usable = total_bytes * margin - fixed_bytes
    if math.isinf(bytes_per_row) or usable <= 0:
        rows = 0 if math.isinf(fixed_bytes) or usable <= 0 else 1
    else:
        rows = int(usable // bytes_per_row) if bytes_per_row > 0 else batch_rows
    limit = min(rows, batch_rows, current - 1 if current else batch_rows)
    micro = max((m for m in range(1, limit + 1) if batch_rows % m == 0), default=0)
    return rows, micro


def measure_memory(model: GPT, optimizer: torch.optim.Optimizer, *, seq_len: int, vocab: int, amp: str,
                   device: torch.device) -> tuple[float, float]:
    """(fixed bytes, bytes per row) of a training step: peak memory at micro-batches of 1 and 2 rows.

    Eager and without FlexAttention (compiled code needs less, so the estimate errs on the safe side); the
    weights are updated, so this runs only when the run is ending anyway. (inf, inf): one row does not fit.
    """
    model.use_flex = False
    model.train()

    def peak(rows: int, update: bool = False) -> int | None:
        """Peak bytes of a forward+backward of ``rows`` rows (gradients accumulate, held as in a step) and,
        with ``update``, an optimizer step (the first allocates the optimizer state); None: out of memory."""
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        oom = False
        try:
            with torch.compiler.set_stance("force_eager"):
                if rows:
                    x = torch.randint(vocab, (rows, seq_len), device=device)
                    with autocast(amp, device):
                        loss = model(x, x, reduction="sum")
                    loss.float().backward()
                    del loss, x
                if update:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, zeroed
        except torch.cuda.OutOfMemoryError:
            oom = True
        return None if oom else torch.cuda.max_memory_allocated(device)

    inf = float("inf")
    optimizer.zero_grad(set_to_none=True)
    if peak(1, update=True) is None:  # one row and the optimizer state do not fit
        return inf, inf
    one, two = peak(1), peak(2)
    update = peak(0, update=True)
    optimizer.zero_grad(set_to_none=True)
    if one is None:
        return inf, inf
    if two is None:  # one row fits, two do not
        return float(one), inf
    per_row = float(max(two - one, 1))
    fixed = one - per_row
    if update is not None:  # the optimizer step's temporaries may be the peak: then no row is added to it
        fixed = max(fixed, update - per_row)
    return fixed, per_row


def out_of_memory_error(model: GPT, optimizer: torch.optim.Optimizer, *, batch_size: int, micro_rows: int,
                        seq_len: int, precision: str, amp: str, world: int, device: torch.device,
                        resume_dir: Path | None) -> GPUOutOfMemory:
    """The error that names the micro-batch that fits (measured in one process; a plain hint on several).

    ``resume_dir``: the run directory when it holds a checkpoint to continue from.
    """
    per_rank = batch_size // world
    where = (f"out of GPU memory at --train.micro_batch_size={micro_rows} (--data.seq_len={seq_len}, "
             f"{precision})")
    again = f", then continue with --resume {resume_dir}" if resume_dir is not None else ""
    if world > 1:  # measuring would take every rank's collectives: no estimate
        return GPUOutOfMemory(f"{where}; lower --train.micro_batch_size (a divisor of the per-GPU batch of "
                              f"{per_rank}) or --data.seq_len{again}")
    fixed, per_row = measure_memory(model, optimizer, seq_len=seq_len, vocab=model.config.vocab_size, amp=amp,
                                    device=device)
    free, _ = torch.cuda.mem_get_info(device)
    budget = free + torch.cuda.memory_reserved(device)  # what this process can have (others' use aside)
    rows, micro = suggest_micro_batch(per_row, fixed, budget, per_rank, current=micro_rows)
    gib = f"{budget / 2**30:.0f} GiB"
    if micro == 0:
        return GPUOutOfMemory(f"{where}; not even one row fits in the {gib} this GPU has free; lower "
                              f"--data.seq_len or use a smaller model (--model.preset){again}")
    return GPUOutOfMemory(f"{where}; about {rows} rows fit in the {gib} this GPU has free: use "
                          f"--train.micro_batch_size={micro} (a divisor of --train.batch_size={per_rank}; "
                          f"gradient accumulation keeps the batch) or lower --data.seq_len{again}")
