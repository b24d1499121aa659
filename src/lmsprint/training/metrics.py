"""Metrics: the JSONL log every run writes, an optional TensorBoard sink, the training clock, the throughput of
a log window and the MFU denominator."""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmsprint.data.sources import read_cached_json, write_cached_json
from lmsprint.errors import ConfigError, LmsprintError

if TYPE_CHECKING:
    from lmsprint.data.loader import StepBatch


class MetricsLog:
    """Appends one JSON object per line to ``RUN/metrics.jsonl`` (and mirrors scalars to TensorBoard)."""

    def __init__(self, path: Path, *, tensorboard: bool = False) -> None:
        self.path = path
        self._f: Any = None  # opened at the first record: a resume refused before it writes nothing
        self._tb: Any = None
        self._tensorboard, self._purge_step = tensorboard, None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise ConfigError("--log.tensorboard needs the tensorboard package: pip install tensorboard") from None

    def write(self, kind: str, **values: Any) -> None:
        record = {"kind": kind, **values}
        if self._f is None:
            self._f = open(self.path, "a", buffering=1)
            if self._tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=self._purge_step)
        self._f.write(json.dumps(record, default=float) + "\n")
        if self._tb is not None and "step" in values:
            for key, v in values.items():
                if key != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{key}", v, values["step"])

    def replay_from(self, step: int) -> None:
        """A resume or rollback logs steps >= ``step`` again: TensorBoard hides the abandoned attempt's events of
        those steps (readers of metrics.jsonl keep the last record of each step)."""
        self._purge_step = step
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=step)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self._tb is not None:
            self._tb.close()


_NUMBERS = ("loss", "lr", "time", "tokens", "tokens_per_s", "mfu", "grad_norm")
"""Fields that readers do arithmetic on: a record that has one must hold a number there."""
_LARGEST = 3.4e38  # float32's largest: what a run can log (a loss, a norm); beyond it a number is damage


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**63


def _is_number(v: Any) -> bool:
    """An int or float a plot can take: NaN and infinities (a diverged loss), or at most float32's largest."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (
        not isinstance(v, int) and not math.isfinite(v) or abs(v) <= _LARGEST)


def _record(line: bytes) -> dict[str, Any] | None:
    """The record a line holds, or None if it holds none: not UTF-8, not JSON, or not shaped like a record (a
    ``kind``; an integer ``step``; numbers where readers expect them; a step and a loss in train and val records)."""
    try:
        r = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: bad JSON, or a number too long to convert
        return None
    if not isinstance(r, dict) or not isinstance(r.get("kind"), str):
        return None
    if ("step" in r and not _is_int(r["step"])) or (r["kind"] in ("train", "val") and ("step" not in r or
                                                                                      "loss" not in r)):
        return None
    return r if all(_is_number(r[k]) for k in _NUMBERS if k in r) else None


def read_metrics(path: Path, *, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order: the one reader of these files (compare, plots, bench, restarts).

    A line that holds no well-formed record (one cut short by a crash, a damaged or hand-edited one) is skipped;
    ``warn``, if given, is told once how many were skipped. A missing file has no records.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise LmsprintError(f"cannot read {path} ({e.strerror or e}); check the run directory") from None
    out, bad = [], []
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        record = _record(line)
        if record is None:
            bad.append(lineno)
        else:
            out.append(record)
    if bad and warn is not None:
        what = "line of {} that holds" if len(bad) == 1 else "lines of {} that hold"
        warn(f"warning: skipped {len(bad)} {what.format(path)} no metrics record (line {bad[0]}"
             f"{', ...' if len(bad) > 1 else ''})")
    return out


def latest_per_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records in step order as the run's last attempt left them: a step logged again (after a resume or a
    rollback) replaces its earlier record and every later one. Rollback events among ``records`` drop the records
    after their step at once (for a run that ended before it logged those steps again)."""
    out: list[dict[str, Any]] = []
    for r in records:
        rollback = r.get("kind") == "event" and r.get("event") == "rollback"
        while out and (out[-1]["step"] > r["step"] if rollback else out[-1]["step"] >= r["step"]):
            out.pop()
        if not rollback:
            out.append(r)
    return out


def steady(records: list[dict[str, Any]], key: str) -> float | None:
    """The steady-state value of a train-record field (tokens_per_s, mfu, ...): its median over the log windows
    after the first quarter (compile and allocator warm-up); None when no record has it."""
    values = [r[key] for r in records if r.get("kind") == "train" and key in r]
    return statistics.median(values[len(values) // 4 :] or values) if values else None


class Stopwatch:
    """The training clock: device-synchronised laps, paused around evaluation and checkpointing.

    Args:
        sync: waits for the device (a no-op on CPU), so a lap ends when the work queued in it is done.
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self.total = 0.0
        """Seconds of training so far (a resumed run starts from the saved value)."""
        self._sync = sync
        self._mark = 0.0

    def start(self) -> None:
        self._sync()
        self._mark = time.perf_counter()

    def lap(self) -> None:
        """Add the time since the last mark to :attr:`total`."""
        self._sync()
        now = time.perf_counter()
        self.total += now - self._mark
        self._mark = now

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The time spent inside is not training time."""
        self.lap()
        try:
            yield
        finally:
            self._mark = time.perf_counter()


class MetricsWindow:
    """What the steps since the last train record did: tokens/s, MFU, padding waste, tokens per row, the pre-clip
    gradient norm of each step whose statistics reached the host.

    Args:
        clock: the training clock (the window's time is the training time since :meth:`reset`).
        world: processes; a step's batch counts the tokens of all of them, its micro-batches are this rank's.
        flops_6n, flops_per_attended: FLOPs per token are ``flops_6n + flops_per_attended * T``, T the length
            a step's tokens attend over (it varies: padding, curriculum).
        peak: the MFU denominator in FLOP/s per GPU, or None (no MFU).
    """

    def __init__(self, clock: Stopwatch, *, world: int, flops_6n: float, flops_per_attended: float,
                 peak: float | None) -> None:
        self.clock, self.world, self.peak = clock, world, peak
        self.flops_6n, self.flops_per_attended = flops_6n, flops_per_attended
        self.reset()

    def reset(self) -> None:
        self.start, self.tokens, self.slots, self.rows, self.flops = self.clock.total, 0, 0, 0, 0.0
        self.norms: list[float] = []

    def add(self, batch: StepBatch) -> None:
        """Count a step taken (or skipped)."""
        self.tokens += batch.n_tokens
        self.slots += batch.n_slots  # all ranks: pad/bucket widths differ between ranks
        self.flops += batch.n_slots * (self.flops_6n + self.flops_per_attended * batch.attn_len)
        self.rows += sum(mb.inputs.shape[0] for mb in batch.micro) * self.world

    def stats(self) -> dict[str, Any]:
        """The window's fields of a train record (then a new window starts)."""
        dt = max(self.clock.total - self.start, 1e-9)
        out: dict[str, Any] = {"grad_norms": self.norms, "tokens_per_s": self.tokens / dt,
                               "waste": 1.0 - self.tokens / max(self.slots, 1),
                               "tokens_per_row": self.tokens / max(self.rows, 1)}
        if self.peak:
            out["mfu"] = self.flops / dt / self.world / self.peak  # per GPU, against its peak
        self.reset()
        return out


def graphs_compiled() -> int:
    """Graphs torch.compile has made in this process (0 without importing Dynamo when nothing was compiled)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure_peak_flops(device: torch.device, *, n: int = 8192, iters: int = 10) -> float:
    """Dense bf16 matmul FLOP/s of the GPU, measured on random data (as the H200's 790 TFLOP/s was)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start)


def peak_flops(device: torch.device, configured_tflops: float | None = None) -> float | None:
    """The MFU denominator: the configured peak, or the measured one (cached per GPU model); None on CPU."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    known = read_cached_json("peak_flops.json")
    if name not in known:
        known[name] = measure_peak_flops(device)
        write_cached_json("peak_flops.json", known)
    return float(known[name])
