"""One owner per run: an exclusive lock on the run directory while a process trains it.

The lock is ``flock`` on ``RUN/.lock``, which also names its holder (PID, host, start time) for the message that a
second process gets. The kernel drops the lock when its holder dies, so a crashed run (``kill -9``, a power cut)
leaves at most a stale ``.lock`` that the next run takes over. The file is removed when the run ends; it is
locked before it is written and checked to still be the one at its path after locking, so two processes never
both hold a lock. On a filesystem without ``flock``, the holder named in the file decides: a live process (or
one on another host, which cannot be checked) holds the run, a dead one on this host left a stale lock.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from lmsprint.errors import CheckpointError

try:
    import fcntl
except ImportError:  # not POSIX: the holder's PID decides
    fcntl = None  # type: ignore[assignment]

LOCK = ".lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """The held lock of a run directory; :meth:`release` (or leaving a ``with`` block) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path, *, create: bool = False) -> RunLock | None:
        """Lock ``run_dir`` for this process (``create``: make the directory of a new run first).

        Returns None when there is no directory to lock (it cannot be made, or is a file): the caller's own
        checks of the run directory then say what is wrong with it.

        Raises:
            CheckpointError: another process holds the run (the message names its PID and host).
        """
        if create:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError:
                return None
        if not run_dir.is_dir():
            return None
        path = run_dir / LOCK
        for _ in range(100):  # another process removing the file between our open and flock: try again
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                raise CheckpointError(f"cannot lock the run directory {run_dir} ({e.strerror or e}); check its "
                                      "permissions") from None
            try:
                how = _flock(fd)
                holder = _read(fd)
                if how == "held" or (how == "no flock" and holder and not _stale(holder)):
                    raise CheckpointError(_in_use(run_dir, holder))
                if how == "locked" and not _same_file(path, fd):  # unlinked by its last holder after our open
                    os.close(fd)
                    continue
                _write_holder(fd)
            except BaseException:
                os.close(fd)
                raise
            return cls(path, fd)
        raise CheckpointError(f"cannot lock the run directory {run_dir} (its lock file keeps changing); try again")

    def release(self) -> None:
        """Give the run up: the lock file is removed while still locked, then closed."""
        if self.fd < 0:
            return
        try:
            if _same_file(self.path, self.fd):
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _flock(fd: int) -> str:
    """Try to take the flock of ``fd``: "locked", "held" (by another process) or "no flock" (not on this
    filesystem)."""
    if fcntl is None:
        return "no flock"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "held"
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return "no flock"
        raise
    return "locked"


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_holder(fd: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    data = json.dumps(record).encode() + b"\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _stale(holder: dict) -> bool:
    """The holder is a process of this host that is gone."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, under another user
        return False
    return False


def _in_use(run_dir: Path, holder: dict) -> str:
    who = (f"process {holder['pid']} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"
           if isinstance(holder.get("pid"), int) else "another process")
    return (f"run directory {run_dir} is in use by {who}; one process trains a run at a time: wait for it to "
            f"finish or stop it (if that process is gone on another host, delete {run_dir / LOCK})")
