"""Where a capture's file reads run: on the walking thread, on threads, or in reader
processes.

All take open files (`submit(fd, size)`: the fd is theirs from then on) and give a
`concurrent.futures.Future` of each file's `ReadOutcome`.

- `InlineReaders` read each file at once on the calling thread. A full walk starts with
  them: one that finds little to read is done sooner than reader processes could start
  (about 0.1 s), and its reads come after its lstats, mostly from the page cache.
- `ThreadReaders` read on a few threads of this process. A dirty-path capture whose
  paths turn out not to be cached starts with them: its reads are then mostly waits for
  the disk (the files, the store's fan-out directories), and threads overlap the waits.
  Cached, they cost more than they save, and it reads inline. A full walk's last files
  (opened, not yet read when the walk ends) go to two of them: the walking thread makes
  no more system calls a name from then on, so they take little interpreter lock from it.
- `ReaderProcesses` read in child processes (reader_process.py), a batch of files per
  message. Why processes and not threads: on a 2-core machine, eight reader threads and
  the walker handed the GIL to each other at every system call. The bench set's first
  snapshot (20,204 files, 2.7 GB) took 17.8-18.7 s on threads (user 8 s, system 15-17 s)
  and 12.5-14.5 s with two processes, where `cp -a` + sync took 12.3-13.8 s, in
  alternating runs (`bench/ab_first.sh`). A workspace keeps them from one capture to
  the next (`KeptProcesses`): a full walk then sends them its files from the first.

The children write blob files themselves (temp name, then link: the same code as the
parent's) and report what they published; the parent's write log takes that over, so
counting, `make_durable` and roll-back treat those blobs as its own. If a child dies,
what it published in its unanswered batch is unknown to the log: the filesystem is
synced at once, so no later snapshot can reuse an undurable blob, and the capture
fails.
"""
from __future__ import annotations

import concurrent.futures as cf
import errno
import functools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Protocol

import dwsd
from dwsd.errors import CaptureError
from dwsd.snapshot.fileread import ReadOutcome, read_open_file
from dwsd.snapshot.reader_process import BATCH_HEADER, FRAME_HEADER, MAX_BATCH_FILES, Reply
from dwsd.store.objects import ObjectStore

log = logging.getLogger(__name__)

BATCH_FILES = 32          # files per request...
BATCH_BYTES = 8 << 20     # ...or fewer, once their sizes add up to this
BATCHES_IN_FLIGHT = 3     # per process: one being read, two waiting, so none idles
STOP_TIMEOUT_S = 30.0
READ_THREAD_PREFIX = "capture-read-thread"     # for a process to answer its last batch and end
# Signals for the parent alone: a stop (SIGINT, SIGTERM) or a reload (SIGHUP) sent to
# the whole unit or process group. Kept processes idle for the daemon's whole life.
_PARENTS_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def default_processes() -> int:
    """One reader process per usable core, 2 to 4."""
    return min(4, max(2, len(os.sched_getaffinity(0))))


class Readers(Protocol):
    def submit(self, fd: int, size: int) -> "cf.Future[ReadOutcome]":
        """Read the open file `fd` (theirs to close) of `size` bytes into a blob."""

    def start(self, future: "cf.Future[ReadOutcome]") -> None:
        """Make sure the read `future` stands for is under way (it is about to be
        waited for)."""

    def close(self) -> None:
        """Finish or drop every read not yet done, close every file, stop any process;
        futures not resolved by then are cancelled. Blocks."""


class InlineReaders:
    """Reads each file when it is submitted, on the calling thread."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    def submit(self, fd: int, size: int) -> "cf.Future[ReadOutcome]":
        future: cf.Future[ReadOutcome] = cf.Future()
        try:
            future.set_result(read_open_file(self.objects, fd))
        except Exception as exc:  # raised where the walker settles it
            future.set_exception(exc)
        return future

    def start(self, future: "cf.Future[ReadOutcome]") -> None:
        pass

    def close(self) -> None:
        pass


class ThreadReaders:
    """Reads on up to `threads` threads of this process, each file when a thread is
    free. Meant for the first files of a capture, few and small (and a full walk's last
    ones, once the walk no longer needs the interpreter lock): their reads are mostly
    waits (for a file not in the page cache, for a lookup in the store's fan-out
    directories), and threads overlap the waits. Many reads are for processes: threads
    hand the GIL to each other at every system call."""

    def __init__(self, objects: ObjectStore, threads: int) -> None:
        self.objects = objects
        self._pool = cf.ThreadPoolExecutor(threads, thread_name_prefix=READ_THREAD_PREFIX)

    def submit(self, fd: int, size: int) -> "cf.Future[ReadOutcome]":
        try:
            future = self._pool.submit(read_open_file, self.objects, fd)
        except BaseException:
            os.close(fd)
            raise
        future.add_done_callback(functools.partial(_close_if_cancelled, fd))
        return future

    def start(self, future: "cf.Future[ReadOutcome]") -> None:
        pass

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class ReaderProcesses:
    """`count` reader processes storing into `objects`' directory; see the module doc.
    `start` raises OSError when a process cannot be started."""

    def __init__(self, objects: ObjectStore, count: int) -> None:
        self.objects = objects
        self._cond = threading.Condition()
        self._batch: list[int] = []
        self._batch_futures: list[cf.Future[ReadOutcome]] = []
        self._batch_bytes = 0
        self._next_batch = 0
        self._children: list[_Child] = []
        if not sys.executable:  # an embedded interpreter: nothing to start them with
            raise OSError(errno.ENOENT, "no Python executable to run them with")
        try:
            for _ in range(count):
                self._children.append(_Child(self))
        except BaseException:
            self.close()
            raise

    def submit(self, fd: int, size: int) -> "cf.Future[ReadOutcome]":
        future: cf.Future[ReadOutcome] = cf.Future()
        self._batch.append(fd)
        self._batch_futures.append(future)
        self._batch_bytes += size
        if len(self._batch) >= BATCH_FILES or self._batch_bytes >= BATCH_BYTES:
            self._send_batch()
        return future

    def start(self, future: "cf.Future[ReadOutcome]") -> None:
        if future in self._batch_futures:
            self._send_batch()

    def _send_batch(self) -> None:
        fds, futures = self._batch, self._batch_futures
        self._batch, self._batch_futures, self._batch_bytes = [], [], 0
        try:
            child = self._idlest_child()
            self._next_batch += 1
            child.send(self._next_batch, fds, futures)
        except BaseException as exc:
            _fail(futures, str(exc) or "reading stopped")
            raise
        finally:
            for fd in fds:  # sent: the child has its own; else nobody will read them
                os.close(fd)

    def pids(self) -> list[int]:
        return [child.proc.pid for child in self._children]

    def idle(self) -> bool:
        """Whether every process is alive with nothing sent to it unanswered and nothing
        waiting to be sent: then another capture may use them."""
        with self._cond:
            # poll: a child that has exited but whose reply thread has not seen it yet.
            return not self._batch and bool(self._children) and all(
                c.alive and not c.in_flight and c.proc.poll() is None
                for c in self._children)

    def _idlest_child(self) -> "_Child":
        """The live child with the fewest batches in flight, once it has fewer than
        BATCHES_IN_FLIGHT (waits). Raises CaptureError when none is left."""
        with self._cond:
            while True:
                live = [c for c in self._children if c.alive]
                if not live:
                    raise CaptureError(self._children[0].death if self._children
                                       else "no reader process")
                child = min(live, key=lambda c: len(c.in_flight))
                if len(child.in_flight) < BATCHES_IN_FLIGHT:
                    return child
                self._cond.wait()

    def close(self) -> None:
        for fd in self._batch:
            os.close(fd)
        for future in self._batch_futures:
            future.cancel()
        self._batch, self._batch_futures = [], []
        for child in self._children:
            child.stop()
        for child in self._children:
            child.join()


class KeptProcesses:
    """Reader processes kept from one capture to the next (a workspace keeps one of
    these). A capture that had enough to read to start processes leaves them here when
    it is done with them, and the next one takes them: a full walk then hands them
    every file it opens from its first (see capture._Walker.use_kept_processes), and
    they read on another core while the walk lstats on, where they would have cost
    ~0.1 s to start. A full walk of a large state with none kept starts them ahead
    (`start_ahead`). Each process idles in a blocked read meanwhile (some 25 MB). Safe
    for one capture at a time and a `close` from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._processes: ReaderProcesses | None = None
        self._closed = False
        self._cannot_start = False  # see start_ahead

    def take(self, objects: ObjectStore) -> ReaderProcesses | None:
        """The kept processes, now the caller's (to `keep` or close), when there are
        some storing into `objects` and all still alive; else None (any kept are
        stopped)."""
        with self._lock:
            processes, self._processes = self._processes, None
        if processes is None:
            return None
        if processes.objects is not objects or not processes.idle():
            log.info("reader processes kept: %s; new ones will be started when needed",
                     "for another store" if processes.objects is not objects
                     else "one has ended")
            processes.close()
            return None
        return processes

    def start_ahead(self, objects: ObjectStore, count: int) -> ReaderProcesses | None:
        """`count` new reader processes for a capture that starts them before it knows
        it needs them (a full walk of a large state), or None when they cannot start:
        that is logged once, and they are not started ahead again."""
        if self._cannot_start:
            return None
        try:
            return ReaderProcesses(objects, count)
        except OSError as exc:
            self._cannot_start = True
            log.warning("cannot start reader processes (%s); reading in this process",
                        exc)
            return None

    def keep(self, processes: ReaderProcesses) -> None:
        """Keep `processes` for the next capture when they are idle (the capture read
        every file it sent them) and this is not closed; else stop them (blocks until
        they end)."""
        stop: ReaderProcesses | None = processes
        with self._lock:
            if not self._closed and processes.idle():
                stop, self._processes = self._processes, processes
                self._cannot_start = False  # they could, after all
        if stop is not None:
            stop.close()

    def pids(self) -> list[int]:
        """The kept processes' pids (none kept: [])."""
        with self._lock:
            kept = self._processes
        return [] if kept is None else kept.pids()

    def close(self) -> None:
        """Stop the kept processes, if any, and any given to `keep` from now on (blocks
        until they end)."""
        with self._lock:
            self._closed = True
            processes, self._processes = self._processes, None
        if processes is not None:
            processes.close()


class _Child:
    """One reader process, its request socket, and the thread taking its replies."""

    def __init__(self, owner: ReaderProcesses) -> None:
        self.owner = owner
        self.in_flight: dict[int, list[cf.Future[ReadOutcome]]] = {}
        self.alive = True
        self.death = ""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        reply_r, reply_w = os.pipe()
        # The child is born with _PARENTS_SIGNALS blocked (a mask survives fork and
        # exec): a stop signalled to the whole unit (systemd) or process group (^C) is
        # the parent's to handle, and it finishes the snapshot in flight with this
        # child. Set in the child itself, the mask left a window while Python started.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _PARENTS_SIGNALS)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dwsd.snapshot.reader_process", str(theirs.fileno()),
                 str(reply_w), str(owner.objects.root)],
                pass_fds=(theirs.fileno(), reply_w), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, env=_child_env())
        except BaseException:
            ours.close()
            os.close(reply_r)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            theirs.close()
            os.close(reply_w)
        self.requests = ours
        self.replies = os.fdopen(reply_r, "rb")
        self.thread = threading.Thread(target=self._take_replies, daemon=True,
                                       name=f"capture-reader-{self.proc.pid}")
        self.thread.start()

    def send(self, batch: int, fds: list[int], futures: list[cf.Future[ReadOutcome]]
             ) -> None:
        with self.owner._cond:
            if not self.alive:  # it ended since it was chosen
                _fail(futures, self.death)
                return
            self.in_flight[batch] = futures
        try:
            socket.send_fds(self.requests, [BATCH_HEADER.pack(batch)], fds)
        except OSError as exc:  # the child is gone; its thread fails the futures
            log.debug("reader process %d: %s", self.proc.pid, exc)

    def _take_replies(self) -> None:
        try:
            while (header := self.replies.read(FRAME_HEADER.size)):
                (length,) = FRAME_HEADER.unpack(header)
                reply: Reply = pickle.loads(self.replies.read(length))
                self._settle(reply)
        except Exception as exc:
            self.death = f"reader process {self.proc.pid} failed: {exc}"
            self.proc.kill()  # it may be waiting for requests; none of its work is taken
        finally:
            self._end()

    def _settle(self, reply: Reply) -> None:
        # First the log takes the blobs: by the time a future is done, they are counted.
        self.owner.objects.adopt_blobs(reply.published)
        with self.owner._cond:
            futures = self.in_flight.pop(reply.batch)
            self.owner._cond.notify_all()
        for future, outcome in zip(futures, reply.outcomes):
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _end(self) -> None:
        """The reply pipe ended: the child exited (or is about to)."""
        code = self.proc.wait()
        with self.owner._cond:
            self.death = self.death or f"reader process {self.proc.pid} exited with " \
                                       f"status {code}"
            self.alive = False
            lost, self.in_flight = self.in_flight, {}
            self.owner._cond.notify_all()
        if not lost:
            return
        # Whatever the child published for these batches is in no write log: make it
        # durable, so a later snapshot may reuse it safely.
        self.owner.objects.sync_filesystem()
        for futures in lost.values():
            _fail(futures, self.death)

    def stop(self) -> None:
        """Let the child end after its last batch: no more requests."""
        try:
            self.requests.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def join(self) -> None:
        self.thread.join(STOP_TIMEOUT_S)
        if self.thread.is_alive():
            self.proc.kill()
            self.thread.join()
        self.requests.close()
        self.replies.close()


def _close_if_cancelled(fd: int, future: "cf.Future[ReadOutcome]") -> None:
    """A read cancelled before it started never closes its file (see `close`)."""
    if future.cancelled():
        os.close(fd)


def _fail(futures: list["cf.Future[ReadOutcome]"], why: str) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(CaptureError(why))


def _child_env() -> dict[str, str]:
    """The child's environment: `dwsd` importable as in this process, and no crash
    point (the parent counts its own, also for the blobs a child wrote)."""
    env = dict(os.environ)
    env.pop("DWSD_CRASH_AT", None)
    package_parent = str(Path(dwsd.__file__).resolve().parent.parent)
    paths = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = package_parent + (os.pathsep + paths if paths else "")
    return env
