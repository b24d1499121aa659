"""SIGINT/SIGTERM during training: stop at the next step boundary, checkpointed; a second signal stops at once."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import TracebackType
from typing import Any

from tqdm import tqdm


class StopSignal:
    """While entered, SIGINT and SIGTERM ask the training loop to stop (``signum`` is set); a second one raises
    KeyboardInterrupt. Outside the main thread nothing is installed.

    Python runs a handler only between bytecodes, so two signals that arrive while one step's kernels run reach it
    as a single call; each delivery also writes its number to Python's wakeup file descriptor, which counts them.
    """

    def __init__(self, *, announce: bool) -> None:
        self.signum: int | None = None
        """The signal that asked the run to stop, if one did."""
        self._announce = announce
        self._previous: dict[int, Any] = {}
        self._received = 0
        self._wakeup: tuple[int, int] | None = None  # (read end, previous wakeup fd) while entered

    def _handler(self, signum: int, frame: Any) -> None:
        if self._wakeup is not None:
            with contextlib.suppress(BlockingIOError):
                self._received += sum(b in self._previous for b in os.read(self._wakeup[0], 64))
        self._received = max(self._received, 1 if self.signum is None else 2)
        if self._received >= 2:  # a second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signum = signum
        if self._announce:
            message = "stopping: checkpointing at the end of this step (signal again to stop at once)"
            try:
                tqdm.write(message, file=sys.stderr)  # on a line of its own, the progress bar redrawn below it
            except (RuntimeError, OSError, ValueError):  # the signal came mid-write to stderr (a reentrant call)
                with contextlib.suppress(OSError, ValueError):
                    os.write(sys.stderr.fileno(), f"\n{message}\n".encode())

    def __enter__(self) -> StopSignal:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in previous:
                signal.signal(s, self._handler)
        except ValueError:  # not the main thread
            return self
        self._previous = previous
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        self._wakeup = (read, signal.set_wakeup_fd(write, warn_on_full_buffer=False))
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self._wakeup is not None:
            read, previous = self._wakeup
            os.close(signal.set_wakeup_fd(previous))  # the write end
            os.close(read)
            self._wakeup = None
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def agreed(self, votes: float, world: int) -> bool:
        """Whether the run stops after this step: this process was signalled (one process), or ``votes`` (ranks
        signalled, all-reduced) is positive; a rank stopped by another's signal records SIGTERM."""
        stop = self.signum is not None if world == 1 else votes > 0
        if stop and self.signum is None:
            self.signum = signal.SIGTERM  # another rank was signalled
        return stop
