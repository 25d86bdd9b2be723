"""A recursive inotify watch of one directory tree, read on its own thread.

Why not watchdog's observers: watchdog 6 drops IN_Q_OVERFLOW without a trace (its reader
skips events with wd -1) and ignores watch-limit errors for directories created later,
so a lost event could never be noticed. Both must force a full reconcile walk here, so
this module talks to inotify(7) directly, through ctypes.

The thread hands each `Batch` to `on_batch`: the paths events named (`changed`), the
directories whose entries changed because of them (`parents`: their mtime moved) and the
problems met ("overflow", a watch-limit or watcher error, the resource directory itself
moved, deleted or not a directory). A path ending in `/` is a directory that appeared
(created or moved in): it is to be walked whole.

`request_sync` is a barrier through the reader thread: the kernel queues an inotify event
before the syscall that caused it returns, so once the thread has read the queue until
EAGAIN, every change made before the request has been handed to `on_batch`.

After an overflow the thread re-scans the tree before it reports the overflow: events of
directories created meanwhile were lost with the rest, and without a watch the changes
inside them would never be seen again. Only the reader thread touches the watches.
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
from dataclasses import dataclass, field
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
# The resource directory itself may be a symlink (`data -> /mnt/disk/data`): followed,
# as the capture and restore follow it. Nothing below it is.
ROOT_WATCH_MASK = WATCH_MASK & ~IN_DONT_FOLLOW
_EVENT = struct.Struct("iIII")
_READ_SIZE = 1 << 18
_NAME_MAX = 255
_STOP, _SYNC = b"k", b"s"
# How often the reader thread checks, when idle, that the resource's path still leads to
# the directory it watches: a symlink pointed elsewhere (`ln -sfn`) raises no event. One
# stat a resource: 5 s makes a re-pointed link a problem within 5 s, not 30, for nothing
# measurable (an idle daemon used 0 ticks of CPU over 40 s).
ROOT_CHECK_S = 5.0
# The problems of the resource directory itself (as opposed to a watch limit or an
# error below it): what is at the path now, or soon (a disk mounted late), can usually
# be watched at once.
ROOT_GONE = "the resource directory was moved or deleted"
ROOT_ELSEWHERE = "the resource's path leads to another directory"
ROOT_UNWATCHABLE = "cannot watch the resource directory"  # then "(why)"


def is_root_problem(problem: str) -> bool:
    return problem in (ROOT_GONE, ROOT_ELSEWHERE) or problem.startswith(ROOT_UNWATCHABLE)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass
class Batch:
    """What one read of the inotify queue found (relative paths, bytes)."""

    changed: list[bytes] = field(default_factory=list)
    parents: list[bytes] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


BatchFn = Callable[[Batch], None]
# Called on the reader thread once a sync request is served: the problem met re-scanning
# the tree (None when it went fine or no re-scan was asked for).
SyncDone = Callable[[str | None], None]


class WatchLimitError(OSError):
    pass


class TreeWatcher:
    """Watches `root` and everything below it except excluded directories."""

    def __init__(self, root: bytes, excludes: ExcludeMatcher, on_batch: BatchFn) -> None:
        self.root = root
        self.excludes = excludes  # replaced by `set_excludes`, read by the reader thread
        self.on_batch = on_batch
        self._fd = -1
        self._wake_r, self._wake_w = -1, -1
        self._paths: dict[int, bytes] = {}   # wd -> directory, relative ("" = root)
        # (st_dev, st_ino) of the directory the root watch is on, set with it; and
        # whether a change of what the path leads to has been reported since.
        self.root_id: tuple[int, int] | None = None
        self._root_reported = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()        # guards _requests and _serving
        self._requests: list[tuple[bool, SyncDone]] = []
        self._serving = False
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
        self._wake_r, self._wake_w = os.pipe()
        problem = self._watch_tree(b"")
        if problem:
            self.on_batch(Batch(problems=[problem]))
        self._serving = True
        self._thread = threading.Thread(target=self._run, name="inotify", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and release the inotify instance (blocks briefly)."""
        if self._thread is not None:
            os.write(self._wake_w, _STOP)
            self._thread.join()
            self._thread = None
        for fd in (self._fd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._fd = self._wake_r = self._wake_w = -1

    def set_excludes(self, excludes: ExcludeMatcher) -> None:
        """Use other excludes from now on. Watches follow at the next `request_sync`
        with `rescan` (directories no longer excluded have none yet)."""
        self.excludes = excludes

    def request_sync(self, rescan: bool, done: SyncDone) -> None:
        """Thread-safe and never blocks: ask the reader thread to re-scan the tree when
        `rescan` (adding missing watches, dropping stale ones), then hand every event
        queued so far to `on_batch`, then call `done` (on the reader thread). When the
        thread is not running, `done` is called at once, here."""
        with self._lock:
            serving = self._serving
            if serving:
                self._requests.append((rescan, done))
        if not serving:
            done(None)
            return
        os.write(self._wake_w, _SYNC)

    # -- watches --------------------------------------------------------------------------

    def _watch_tree(self, rel: bytes, seen: set[int] | None = None) -> str | None:
        """Watch `rel` and its subdirectories (adding each wd to `seen`); the first
        problem met, or None. The resource directory itself not being watchable (gone,
        not a directory) is a problem: nothing below it could be seen."""
        if not rel:
            try:
                self._add_watch(b"")
                st = os.stat(self.root)
            except OSError as exc:
                return f"{ROOT_UNWATCHABLE} ({exc.strerror})"
            self.root_id = (st.st_dev, st.st_ino)
            self._root_reported = False
        for dirpath, dirnames, _ in os.walk(self._abs(rel)):
            sub = os.path.relpath(dirpath, self.root)
            sub = b"" if sub == b"." else sub
            dirnames[:] = [d for d in dirnames
                           if not self.excludes.excluded(_join(sub, d), True)]
            try:
                wd = self._add_watch(sub)
            except WatchLimitError as exc:
                return f"watch limit reached ({exc.strerror})"
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    self.errors.append(str(exc))
                continue
            if seen is not None:
                seen.add(wd)
        return None

    def _add_watch(self, rel: bytes) -> int:
        # On a directory already watched this returns the same wd, so a re-scan also
        # corrects the path of a directory that moved while events were lost.
        mask = WATCH_MASK if rel else ROOT_WATCH_MASK
        wd: int = _libc.inotify_add_watch(self._fd, self._abs(rel), mask)
        if wd < 0:
            err = ctypes.get_errno()
            if err == errno.ENOSPC:
                raise WatchLimitError(err, "the inotify watch limit is reached")
            raise OSError(err, os.strerror(err), self._abs(rel))
        self._paths[wd] = rel
        return wd

    def _rescan(self) -> str | None:
        """Watch every directory of the tree that is not excluded; once all have their
        watch, drop the others (moved away, deleted or now excluded). The first problem
        met, or None."""
        seen: set[int] = set()
        problem = self._watch_tree(b"", seen)
        if problem is None:
            for wd in set(self._paths) - seen:
                _libc.inotify_rm_watch(self._fd, wd)
                self._paths.pop(wd, None)
        return problem

    def root_replaced(self) -> bool:
        """Whether the resource's path now leads to another directory than the one its
        root watch is on, or to none: a symlink pointed elsewhere (`ln -sfn`), which no
        event reports. One stat, which may block (a hung network filesystem): the reader
        thread asks, never the trio thread. False before the first watch."""
        try:
            st = os.stat(self.root)
        except OSError:
            return self.root_id is not None
        return self.root_id is not None and (st.st_dev, st.st_ino) != self.root_id

    def _check_root(self) -> None:
        """Report, once, that the resource's path leads elsewhere (reader thread)."""
        if not self._root_reported and self.root_replaced():
            self._root_reported = True
            self.on_batch(Batch(problems=[ROOT_ELSEWHERE]))

    def _forget_all(self) -> None:
        for wd in list(self._paths):
            _libc.inotify_rm_watch(self._fd, wd)
        self._paths.clear()

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
        try:
            self._loop()
        except Exception as exc:  # never let the thread die silently
            log.exception("inotify reader failed")
            self.on_batch(Batch(problems=[f"watcher error: {exc}"]))
        finally:
            with self._lock:
                self._serving = False
                pending, self._requests = self._requests, []
            for _, done in pending:
                done(None)

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll(int(ROOT_CHECK_S * 1000))}
            if not ready:
                self._check_root()
            elif self._wake_r in ready:
                if _STOP in os.read(self._wake_r, 4096):
                    return
                self._serve_requests()
            elif self._fd in ready:
                self._read_once()

    def _read_once(self) -> bool:
        """Read and hand over one chunk of events; False when the queue was empty."""
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return False
        try:
            batch = self._parse(data)
        except Exception as exc:  # a bad event must not stop the reading
            log.exception("inotify reader failed")
            batch = Batch(problems=[f"watcher error: {exc}"])
        self.on_batch(batch)
        return True

    def _serve_requests(self) -> None:
        with self._lock:
            requests, self._requests = self._requests, []
        problem = None
        if any(rescan for rescan, _ in requests):
            problem = self._rescan()
            if problem:
                self.on_batch(Batch(problems=[problem]))
        self._check_root()  # before the barrier: the capture that asked must know
        # A read that leaves events queued returns at least a buffer less one event, so
        # this many reads take all the queue could hold when the requests came; the
        # bound keeps a writer that never pauses from holding the barrier forever.
        largest = _EVENT.size + _NAME_MAX + 1
        reads = _queue_limit() * largest // (_READ_SIZE - largest) + 2
        while reads > 0 and self._read_once():
            reads -= 1
        for rescan, done in requests:
            done(problem if rescan else None)

    def _parse(self, data: bytes) -> Batch:
        batch = Batch()
        overflow = False
        pos = 0
        while pos < len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            name = data[pos + 16:pos + 16 + length].rstrip(b"\0")
            pos += 16 + length
            if mask & IN_Q_OVERFLOW:
                overflow = True
            elif mask & IN_IGNORED:
                self._paths.pop(wd, None)
            else:
                self._note_event(batch, wd, mask, name)
        if overflow:
            problem = self._rescan()
            batch.problems += ["overflow"] + ([problem] if problem else [])
        return batch

    def _note_event(self, batch: Batch, wd: int, mask: int, name: bytes) -> None:
        parent = self._paths.get(wd)
        if parent == b"" and not name and mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            # The resource directory itself went (`rm -rf`, `mv data data.old`): no
            # parent is watched to see it, and the watches below it now follow a tree
            # that is not the resource, or nothing. Only full walks are right until a
            # re-scan watches what is at the resource's path again.
            self._forget_all()
            batch.problems.append(ROOT_GONE)
            return
        if parent is None or not name:
            return  # events on a watched directory itself are seen from its parent
        rel = _join(parent, name)
        if self.excludes and self.excludes.excluded(rel, bool(mask & IN_ISDIR)):
            return
        if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
            problem = self._watch_tree(rel)
            if problem:
                batch.problems.append(problem)
            batch.changed.append(rel + b"/")
        elif mask & IN_ISDIR and mask & IN_MOVED_FROM:
            self._forget_under(rel)
            batch.changed.append(rel)
        else:
            batch.changed.append(rel)
        if parent and mask & (IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO):
            batch.parents.append(parent)  # its mtime moved


def _queue_limit() -> int:
    try:
        with open("/proc/sys/fs/inotify/max_queued_events", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 16384


def _join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name
