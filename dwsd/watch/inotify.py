"""A recursive inotify watch of one directory tree, read on its own thread.

Why not watchdog's observers: watchdog 6 drops IN_Q_OVERFLOW without a trace (its reader
skips events with wd -1) and ignores watch-limit errors for directories created later,
so a lost event could never be noticed. Both must force a full reconcile walk here, so
this module talks to inotify(7) directly, through ctypes.

The thread hands batches of relative paths (bytes) to `on_batch(paths, problem)`, where
`problem` is None, "overflow" or a watch error. A path ending in `/` is a directory that
appeared (created or moved in): it is to be walked whole.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
import threading
from typing import Callable

from dwsd.snapshot.exclude import ExcludeMatcher

log = logging.getLogger(__name__)

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK = 0x01000000, 0x02000000, 0x04000000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO |
              IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR |
              IN_DONT_FOLLOW | IN_EXCL_UNLINK)
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

BatchFn = Callable[[list[bytes], str | None], None]


class WatchLimitError(OSError):
    pass


class TreeWatcher:
    """Watches `root` and everything below it except excluded directories."""

    def __init__(self, root: bytes, excludes: ExcludeMatcher, on_batch: BatchFn) -> None:
        self.root = root
        self.excludes = excludes
        self.on_batch = on_batch
        self._fd = -1
        self._kill_r, self._kill_w = -1, -1
        self._paths: dict[int, bytes] = {}   # wd -> directory, relative ("" = root)
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    @property
    def watches(self) -> int:
        return len(self._paths)

    def start(self) -> None:
        """Add the watches (blocks: walks the tree) and start the reader thread.
        A watch-limit error is not raised: it is reported through `on_batch`."""
        self._fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._kill_r, self._kill_w = os.pipe()
        problem = self._watch_tree(b"")
        if problem:
            self.on_batch([], problem)
        self._thread = threading.Thread(target=self._run, name="inotify", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and release the inotify instance (blocks briefly)."""
        if self._thread is not None:
            os.write(self._kill_w, b"x")
            self._thread.join()
            self._thread = None
        for fd in (self._fd, self._kill_r, self._kill_w):
            if fd >= 0:
                os.close(fd)
        self._fd = self._kill_r = self._kill_w = -1

    # -- watches --------------------------------------------------------------------------

    def _watch_tree(self, rel: bytes) -> str | None:
        """Watch `rel` and its subdirectories; the first problem met, or None."""
        for dirpath, dirnames, _ in os.walk(self._abs(rel)):
            sub = os.path.relpath(dirpath, self.root)
            sub = b"" if sub == b"." else sub
            dirnames[:] = [d for d in dirnames
                           if not self.excludes.excluded(_join(sub, d), True)]
            try:
                self._add_watch(sub)
            except WatchLimitError as exc:
                return f"watch limit reached ({exc.strerror})"
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    self.errors.append(str(exc))
        return None

    def _add_watch(self, rel: bytes) -> None:
        wd = _libc.inotify_add_watch(self._fd, self._abs(rel), WATCH_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err == errno.ENOSPC:
                raise WatchLimitError(err, "the inotify watch limit is reached")
            raise OSError(err, os.strerror(err), self._abs(rel))
        self._paths[wd] = rel

    def _forget_under(self, rel: bytes) -> None:
        """Drop the watches of a directory that moved away (their paths are stale)."""
        prefix = rel + b"/"
        for wd, path in list(self._paths.items()):
            if path == rel or path.startswith(prefix):
                _libc.inotify_rm_watch(self._fd, wd)
                self._paths.pop(wd, None)

    def _abs(self, rel: bytes) -> bytes:
        return os.path.join(self.root, rel) if rel else self.root

    # -- reading --------------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._kill_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._kill_r in ready:
                return
            try:
                data = os.read(self._fd, 1 << 18)
            except BlockingIOError:
                continue
            try:
                paths, problem = self._parse(data)
            except Exception as exc:  # never let the thread die silently
                log.exception("inotify reader failed")
                paths, problem = [], f"watcher error: {exc}"
            self.on_batch(paths, problem)

    def _parse(self, data: bytes) -> tuple[list[bytes], str | None]:
        paths: list[bytes] = []
        problem: str | None = None
        pos = 0
        while pos < len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            name = data[pos + 16:pos + 16 + length].rstrip(b"\0")
            pos += 16 + length
            if mask & IN_Q_OVERFLOW:
                problem = "overflow"
                continue
            if mask & IN_IGNORED:
                self._paths.pop(wd, None)
                continue
            parent = self._paths.get(wd)
            if parent is None or not name:
                continue  # events on a watched directory itself are seen from its parent
            rel = _join(parent, name)
            if self.excludes and self.excludes.excluded(rel, bool(mask & IN_ISDIR)):
                continue
            if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                problem = self._watch_tree(rel) or problem
                paths.append(rel + b"/")
            elif mask & IN_ISDIR and mask & IN_MOVED_FROM:
                self._forget_under(rel)
                paths.append(rel)
            else:
                paths.append(rel)
            if parent and mask & (IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO):
                paths.append(parent)  # its mtime moved
        return paths, problem


def _join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name
