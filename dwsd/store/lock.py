"""The store's writer lock: an exclusive `flock` on `<store>/lock`, holding the pid.

The kernel drops a flock when its holder dies (even by SIGKILL), so a crash never leaves a
stale lock; the pid in the file is only there to name the holder in the error.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dwsd.errors import StoreLockedError


class StoreLock:
    """Held from `acquire()` until `release()` (or process death)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting; raise StoreLockedError naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise StoreLockedError(str(self.path.parent), pid) from None
        # Overwrite in place, padded to a fixed width, rather than truncate first: a
        # second writer reading between a truncate and the write would find no pid.
        os.pwrite(fd, f"{os.getpid():<20}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last fd drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (ValueError, IndexError, OSError):
        return None
