"""SIGINT/SIGTERM during training: stop at the next step boundary, checkpointed; a second signal stops at once."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import TracebackType
from typing import Any


class StopSignal:
    """While entered, SIGINT and SIGTERM ask the training loop to stop (``signum`` is set); a second one raises
    KeyboardInterrupt. Outside the main thread nothing is installed."""

    def __init__(self, *, announce: bool) -> None:
        self.signum: int | None = None
        """The signal that asked the run to stop, if one did."""
        self._announce = announce
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signum = signum
        if self._announce:  # os.write: print() may be mid-write to the same stream (a reentrant-call error)
            with contextlib.suppress(OSError, ValueError):
                os.write(sys.stderr.fileno(), b"stopping: checkpointing at the end of this step "
                                              b"(signal again to stop at once)\n")

    def __enter__(self) -> StopSignal:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in previous:
                signal.signal(s, self._handler)
        except ValueError:  # not the main thread
            return self
        self._previous = previous
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
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
