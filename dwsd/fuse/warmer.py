"""A helper process that reads store files into the kernel's page cache ahead of the
view's opens, and lists view directories ahead of a reader's lookups.

The view serves a small file's open from the page cache on its trio thread, with no
worker thread (`ViewOps._small_content`). Files not cached there were read ahead by a
worker thread of the serving process; on two cores that thread and the trio thread
fought over the GIL, and the thread spent about 550 µs a blob where a plain loop takes
80-100 µs. A separate process shares the page cache and nothing else: the server only
writes paths into a pipe, and its opens find the files cached.

A directory of the view listed by this process gives the kernel every name's entry in
a few READDIRPLUS replies, where a reader opening the names one by one costs a LOOKUP
round trip each (`ViewOps._count_lookup`). The listings run on a thread of their own:
their replies come from the server, busy with that reader, and reads queued behind
them would come too late.

Protocol: NUL-terminated paths on stdin. A path ending in "/" is a directory to list,
any other a file to read front to back; what was read or listed is dropped, and errors
are ignored (the open or lookup that follows meets and reports them). The process ends
at the end of its input, so it ends with its server, however that ends.
"""
from __future__ import annotations

import os
import queue
import select
import signal
import subprocess
import sys
import threading
from typing import Sequence

READ_SIZE = 1 << 20


class Warmer:
    """The server's end: hands the helper process paths without blocking. The process
    starts with the first paths, not with the server: a view that nobody reads needs
    none, and its start would slow the server's own (both import Python cold)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._fd = -1

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def warm(self, paths: Sequence[str]) -> bool:
        """Queue `paths` to be read, in order. False when the helper is behind and its
        pipe is full; OSError when it is gone or cannot be started. A write of at most
        PIPE_BUF bytes to a pipe is all or nothing, so longer lists go in parts (and on
        False, the parts before the refused one are queued)."""
        data = b"".join(os.fsencode(p) + b"\0" for p in paths)
        if len(data) > select.PIPE_BUF and len(paths) > 1:
            half = len(paths) // 2
            return self.warm(paths[:half]) and self.warm(paths[half:])
        if self._proc is None:
            self._start()
        try:
            os.write(self._fd, data)
        except BlockingIOError:
            return False
        return True

    def list_dir(self, path: bytes) -> bool:
        """Queue directory `path` (absolute, in the view) to be listed; as `warm`. A
        path too long to open by name (PATH_MAX, which is PIPE_BUF here) is dropped:
        it could not be written to the pipe in one piece either."""
        message = path.rstrip(b"/") + b"/"
        if len(message) + 1 > select.PIPE_BUF:
            return True
        return self.warm([os.fsdecode(message)])

    def _start(self) -> None:
        # close_fds: the helper must hold nothing of the server's (the FUSE device
        # would keep a dead server's mount alive).
        self._proc = subprocess.Popen([sys.executable, "-m", "dwsd.fuse.warmer"],
                                      stdin=subprocess.PIPE, close_fds=True)
        assert self._proc.stdin is not None
        self._fd = self._proc.stdin.fileno()
        os.set_blocking(self._fd, False)

    def close(self) -> int:
        """End the helper if started (it stops at the end of its input), reap it
        (blocks briefly) and return its exit status (0 if never started)."""
        if self._proc is None:
            return 0
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            return self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait()


def main() -> None:
    # A Ctrl-C at a terminal reaches the whole process group: the server ends, and
    # this process with it at the end of its input, without a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    listings: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    # A daemon: the process ends at the end of its input even with a listing waiting
    # for a server that is gone.
    threading.Thread(target=_list_all, args=(listings,), daemon=True).start()
    buf = bytearray(READ_SIZE)
    pending = b""
    while chunk := os.read(0, 65536):
        *paths, pending = (pending + chunk).split(b"\0")
        # Listings first: the reader they are for waits on lookups meanwhile.
        for path in paths:
            if path.endswith(b"/"):
                listings.put(path)
        for path in paths:
            if not path.endswith(b"/"):
                _read(path, buf)


def _list_all(listings: "queue.SimpleQueue[bytes]") -> None:
    while True:
        path = listings.get()
        try:
            with os.scandir(path) as entries:
                for _ in entries:
                    pass
        except OSError:
            pass


def _read(path: bytes, buf: bytearray) -> None:
    try:
        # O_NONBLOCK: a FIFO where a blob should be must not stall the queue.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return
    try:
        while os.readv(fd, [buf]) == READ_SIZE:
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
