"""Capture a resource directory into trees and blobs.

Two modes, one walker:
- full: every directory is listed and every entry lstat'ed; files whose stat key matches
  the stat cache are not opened; directories whose entries did not change get their old
  tree id back (the encoding is canonical), so nothing new is written for them. When the
  inodes are not cached, the files the last capture saw are lstat'ed on threads ahead of
  the walk;
- dirty: only the given paths (relative, bytes) are looked at; everything else is taken
  from the previous root tree. Cost follows the number of dirty paths, not the tree.
  A dirty directory is re-listed (new and vanished names are found) but its unchanged
  children are reused; a dirty path ending in `/` is walked fully (a directory that was
  moved in may carry a known name with other content).

Everything is relative to directory fds (`dir_fd=`, `O_NOFOLLOW`), so no path is ever
followed through a symlink and paths longer than PATH_MAX work. Names stay bytes. The
resource directory itself may be a symlink to one (`data -> /mnt/disk/data`): it is
followed, as the config names it.

Files are opened `O_NOFOLLOW|O_NONBLOCK` on the walking thread, with a WILLNEED hint so
the kernel fetches them while the walk goes on, and read on that thread (or, in a
dirty-path capture whose paths are not cached, on threads, after its paths are lstat'ed
on threads; and the last batch of a full walk, on threads once the walk is over) until
the walk has found PROCESSES_AFTER files to read, then in reader processes
(readers.py); a full walk given reader processes an earlier capture kept sends them
every file from its first, and so does a dirty-path capture of DIRTY_KEPT_MIN paths
or more. A file's fstat before and after the read must agree; if
not, it is read again (up to READ_ATTEMPTS times) and flagged as `unstable` (see
fileread.py). If it never holds still, its previous version is kept (or it is left out
when there is none): a torn mix of two versions is never stored. Unreadable entries
are reported, never fatal.

`capture_resource` blocks; the daemon runs it in a worker thread.
"""
from __future__ import annotations

import concurrent.futures as cf
import errno
import itertools
import logging
import os
import stat as stat_mod
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Union

from dwsd.errors import CaptureError, ResourceMissingError
from dwsd.memory import rare_gc
from dwsd.snapshot.exclude import ExcludeMatcher
from dwsd.snapshot.fileread import SMALL_FILE, ReadOutcome, read_xattrs
from dwsd.snapshot.readers import (InlineReaders, KeptProcesses, Readers, ReaderProcesses,
                                   ThreadReaders, default_processes)
from dwsd.snapshot.statcache import UNTRUSTED, CachedFile, CaptureState
from dwsd.store.catalog import RootMeta
from dwsd.store.ids import ObjectId
from dwsd.store.objects import ObjectStore
from dwsd.store.tree import DIR, FILE, SYMLINK, Entry, decode_tree, encode_tree, kind_of_mode

log = logging.getLogger(__name__)

# Reads submitted and not yet settled before the walker settles the oldest: a walk of
# 100,000 files must not keep a future and an outcome per file until its end. They took
# ~1.5 KB a file, and freed at the end they left the heap fragmented: a daemon that had
# taken a first snapshot of 20,000 files kept 40 MB of it.
SETTLE_AFTER = 256
# Files opened before their reads are handed on, together, while they are read on this
# thread: after the lstats of their batch, not between them. At most SETTLE_AFTER, so a
# job settled is always one submitted. Reader processes get each file as it is opened
# (they batch them themselves): held back here, they ran out of work while this thread
# walked on.
SUBMIT_BATCH = 256
# Files, or bytes, to read before the reads go to reader processes: a 1% change of the
# bench set (202 files, 13 MB) is read here in 70 ms, sooner than processes start; a
# first snapshot of it is read in half the time by two processes (readers.py).
PROCESSES_AFTER = 512
PROCESSES_AFTER_BYTES = 64 << 20
# A dirty-path capture of at least WARM_AHEAD_MIN paths that finds COLD_SAMPLE of them
# slower than COLD_LSTAT_S an lstat lstats them all on WARM_THREADS threads, then reads
# on DIRTY_READ_THREADS threads (until processes take over). Warm (what a daemon mostly
# sees: files just written) threads cost more than they save, so the sample decides.
# Figures: bench/ab_dirty.py and the stop-10 note.
WARM_AHEAD_MIN = 8
COLD_SAMPLE = 4
COLD_LSTAT_S = 30e-6
WARM_THREADS = 8
# A full walk that finds the inodes not cached lstats the files the last one saw ahead of
# it on WALK_WARM_THREADS threads, WARM_CHUNK paths a task. The bench set's walk that
# finds nothing changed, caches dropped: 0.52-0.65 s without, 0.40-0.58 with 4 threads,
# 0.48-0.61 with 8 (alternating runs).
WALK_WARM_THREADS = 4
WARM_CHUNK = 64
WARM_THREAD_PREFIX = "capture-warm"
DIRTY_READ_THREADS = 8
# A dirty-path capture of at least DIRTY_KEPT_MIN paths hands its reads to the reader
# processes an earlier capture kept, if any, as the files are opened: on threads here,
# the reads of the bench set's 1% change (202 files, 13 MB), not cached, spent much of
# their time waiting for the interpreter lock. Snapshots with caches dropped, medians
# of 3 in 4 alternating rounds: 0.137-0.148 s instead of 0.145-0.157
# (`bench/ab_incremental.sh OLD 4 dirty cold 3`). At 16 paths it makes no difference
# either way; below, one round trip to a process costs more than the read.
DIRTY_KEPT_MIN = 16
# A full walk ends with the files of its last batch (fewer than SUBMIT_BATCH) opened and
# not read; from then on this thread only settles their outcomes and writes the trees,
# so when there are at least READ_AFTER_WALK_MIN of them, READ_AFTER_WALK_THREADS
# threads read them (while the walk lstats, threads would take the interpreter lock
# from it at every system call).
# The bench set's 1% change, warm: the reads and trees took 37-45 ms instead of 58-66
# (alternating runs; 3 threads were no faster and noisier).
READ_AFTER_WALK_MIN = 16
READ_AFTER_WALK_THREADS = 2
# A full walk over a state of at least START_KEPT_FROM files, with none kept, starts
# reader processes for `kept` as it begins (their ~0.1 s start overlaps the walk on
# another core; the bench set's walk takes 0.1 s warm), so that a daemon restarted
# does not have to wait for a capture with much to read to have them.
START_KEPT_FROM = 5000
TREE_CACHE_ENTRIES = 50_000  # about 15 MB
_FS_ENCODING = sys.getfilesystemencoding()
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# The resource directory itself, as the config names it, may be a symlink to one.
_OPEN_ROOT = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_S_IFMT, _S_IFREG = 0o170000, stat_mod.S_IFREG  # the file-type bits of st_mode; a file


@dataclass
class CaptureCounters:
    """Work done, for tests and `status`: cost must follow the change, not the tree."""

    lstats: int = 0
    files_opened: int = 0
    bytes_read: int = 0
    dirs_listed: int = 0
    warmed: int = 0  # dirty paths lstat'ed ahead only to fill the caches (a sample, or all)


@dataclass
class CaptureResult:
    root: ObjectId
    state: CaptureState
    counters: CaptureCounters
    root_meta: RootMeta
    changed_files: int = 0  # new or changed content
    removed_files: int = 0  # the previous capture's files no longer there
    unreadable: list[tuple[bytes, str]] = field(default_factory=list)
    unstable: list[bytes] = field(default_factory=list)
    walked_all: bool = True  # False: only the dirty paths were looked at
    # A full walk's: the files whose stat cache entry it changed from the previous
    # state's (None: dropped); see _Walker.changes. None for a dirty-path capture.
    changes: dict[bytes, CachedFile | None] | None = field(default=None, repr=False)
    # Nothing was captured: the resource could not be opened and its tree of the latest
    # snapshot stands in (see Workspace._capture_or_keep); `state` is the old one.
    kept: bool = False


@dataclass(slots=True)
class _FileJob:
    """A file being read; once settled, `result` is its entry (None: left out) and the
    future is dropped, unless another name links to it."""

    relpath: bytes
    entry: Entry
    future: "cf.Future[ReadOutcome] | None"
    settled: bool = False
    result: Entry | None = None
    fd: int = -1  # opened by the walker, handed to the readers (or closed by close)
    twin: "_FileJob | None" = None  # another name of the same file, read once for both


@dataclass
class _DirJob:
    entry: Entry | None  # None for the resource root
    children: list["_Pending"]
    relpath: bytes


_Pending = Union[Entry, _FileJob, _DirJob]


def capture_resource(objects: ObjectStore, root: Path, prev: CaptureState,
                     excludes: ExcludeMatcher, dirty: Collection[bytes] | None = None,
                     on_file: Callable[[int], None] | None = None,
                     trees: "TreeCache | None" = None, processes: int | None = None,
                     processes_after: int | None = None,
                     kept: KeptProcesses | None = None) -> CaptureResult:
    """Capture the directory `root`. `dirty=None` walks everything; otherwise only the
    given relative paths are examined (falling back to a full walk when there is no
    previous tree). `on_file(size)` is called on this thread as each file is settled.
    `trees` carries decoded trees from one capture to the next (the trees a dirty-path
    capture writes are the ones the next one reads). Once more than `processes_after`
    files (default PROCESSES_AFTER) or PROCESSES_AFTER_BYTES are to be read, they are
    read by `processes` reader processes (default: one a core, 2 to 4), all gone when
    this returns, unless `kept` is given: then they are left there when idle, and the
    processes found there are used instead of new ones (`processes` then does not
    apply), by a full walk from its first file, as by a dirty-path capture of
    DIRTY_KEPT_MIN paths or more; `processes_after=0` sends every read there. Raises
    CaptureError when the root itself cannot be read."""
    # A walk makes some 100,000 tuples and no reference cycles (see memory.py). The
    # block ends once the walker and its jobs are freed, with the call below.
    with rare_gc():
        return _capture(objects, root, prev, excludes, dirty, on_file, trees,
                        processes or default_processes(),
                        PROCESSES_AFTER if processes_after is None else processes_after,
                        kept)


def _capture(objects: ObjectStore, root: Path, prev: CaptureState, excludes: ExcludeMatcher,
             dirty: Collection[bytes] | None, on_file: Callable[[int], None] | None,
             trees: "TreeCache | None", processes: int, processes_after: int,
             kept: KeptProcesses | None) -> CaptureResult:
    try:
        root_fd = os.open(root, _OPEN_ROOT)
    except OSError as exc:
        raise ResourceMissingError(f"cannot read resource directory {root}: "
                                   f"{exc.strerror}") from exc
    walker = _Walker(objects, prev, excludes, on_file, os.fstat(root_fd).st_dev, trees,
                     processes, processes_after, kept)
    try:
        walked_all = not (dirty is not None and prev.root is not None
                          and objects.has("trees", prev.root))
        if not walked_all:
            assert dirty is not None and prev.root is not None
            job = walker.update(root_fd, prev.root, dirty)
        else:
            walker.warm_ahead_if_cold(root_fd)
            walker.use_kept_processes(
                start_ahead=len(prev.files) >= START_KEPT_FROM)
            job = walker.walk_full(root_fd)
            walker.stop_warming()  # what it has not lstat'ed yet is behind the walk
            walker.read_rest_on_threads()
        tree_id = walker.finish(job)
        top = os.fstat(root_fd)
    finally:
        try:
            walker.close()
        finally:
            os.close(root_fd)  # after close: warming threads use it
    walker.state.root = tree_id
    root_meta = (stat_mod.S_IMODE(top.st_mode), top.st_uid, top.st_gid, top.st_mtime_ns)
    if not walked_all:
        return CaptureResult(tree_id, walker.state, walker.counters, root_meta,
                             walker.changed, walker.state.removed(), walker.unreadable,
                             walker.unstable, walked_all)
    changes = walker.changes()  # None: a previous file dropped
    return CaptureResult(tree_id, walker.state, walker.counters, root_meta, walker.changed,
                         sum(v is None for v in changes.values()), walker.unreadable,
                         walker.unstable, walked_all, changes)


class _Walker:
    def __init__(self, objects: ObjectStore, prev: CaptureState,
                 excludes: ExcludeMatcher, on_file: Callable[[int], None] | None = None,
                 root_dev: int | None = None, trees: "TreeCache | None" = None,
                 processes: int = 2, processes_after: int = PROCESSES_AFTER,
                 kept: KeptProcesses | None = None) -> None:
        self.objects = objects
        self.on_file = on_file
        self.prev = prev
        self.excludes = excludes
        self._any_excludes = bool(excludes)  # asked per name: no __bool__ call each time
        self.readers: Readers = InlineReaders(objects)
        self._retired: list[Readers] = []
        self._processes = processes
        self._kept = kept
        self._to_read = processes_after  # files still read here; then processes...
        self._bytes_to_read = PROCESSES_AFTER_BYTES  # ...or bytes
        self.state = CaptureState()
        self.counters = CaptureCounters()
        self.changed = 0
        self.unreadable: list[tuple[bytes, str]] = []
        self.unstable: list[bytes] = []
        # Hard links met in this walk, by (device, inode): a resource may hold a mount.
        self._inodes: dict[tuple[int, int], _FileJob | Entry] = {}
        self._read_paths: list[bytes] = []  # of the files read, settled (see changes)
        self._jobs: deque[_FileJob] = deque()  # oldest first, not settled
        self._queued: deque[_FileJob] = deque()  # opened, waiting for _submit_batch
        self._submit_batch = SUBMIT_BATCH
        self.root_dev = root_dev
        # Decoded trees: the previous ones a dirty-path update reads, the new ones it
        # writes (the next capture's previous ones).
        self._trees = trees if trees is not None else TreeCache()
        self._warming: cf.ThreadPoolExecutor | None = None  # see warm_ahead_if_cold

    # -- full walk ----------------------------------------------------------------------

    def warm_ahead_if_cold(self, root_fd: int) -> None:
        """Before a full walk: when a sample of the files the last capture saw lstats
        slowly (their inodes are not cached: after a restart, on a busy machine), lstat
        them all on WALK_WARM_THREADS threads ahead of the walk, in its order,
        WARM_CHUNK a task, so the kernel's work for them (mostly reading metadata in)
        runs on every core and its waits overlap. The walk does not wait for them;
        `stop_warming` drops what has not started."""
        paths = list(self.prev.files)  # the last walk's order is this one's
        if len(paths) < WARM_AHEAD_MIN or not self._looks_cold(root_fd, paths):
            return
        self._warming = _lstat_ahead(root_fd, paths, WALK_WARM_THREADS, WARM_CHUNK)
        self.counters.warmed += len(paths)

    def use_kept_processes(self, start_ahead: bool = False) -> bool:
        """Before a walk: hand every file to the reader processes an earlier capture
        kept, if any (else, when `start_ahead`, to new ones), as it is opened; whether
        it did. They read on other cores while this thread walks on (threads here
        would take the interpreter lock from it at every system call), so the walk's
        reads cost it little more than the opens. The bench set's 1% change, warm:
        the reads and trees after a full walk took 20-36 ms instead of 61-88
        (figures: docs/performance.md)."""
        if self._kept is None:
            return False
        processes = self._kept.take(self.objects)
        if processes is None and start_ahead:
            processes = self._kept.start_ahead(self.objects, self._processes)
        if processes is None:
            return False
        self._read_in(processes)
        return True

    def stop_warming(self) -> None:
        """Drop the warming tasks not started, and wait for those running (a chunk each
        at most): none outlives the root fd it lstats from."""
        if self._warming is not None:
            self._warming.shutdown(wait=True, cancel_futures=True)
            self._warming = None

    def walk_full(self, dfd: int, rel: bytes = b"", entry: Entry | None = None) -> _DirJob:
        """List `dfd` and capture every entry below it."""
        self.counters.dirs_listed += 1
        # Listing an fd gives str names (surrogate-escaped); encoding restores the bytes.
        names = sorted([n.encode(_FS_ENCODING, "surrogateescape") for n in os.listdir(dfd)])
        self.counters.lstats += len(names)
        prefix = rel + b"/" if rel else b""
        children: list[_Pending] = []
        # The hot loop of a full walk, run for every name: one lstat, and a file whose
        # stat key matches the cache is kept as it was and becomes its entry right here,
        # with no call per name (a few percent of a walk that finds nothing changed).
        lstat, cached_file, keep = os.stat, self.prev.files.get, self.state.put
        excluded = self.excludes.excluded if self._any_excludes else None
        on_file = self.on_file
        # Its entry in this directory's previous tree, when that is cached and holds
        # what a new entry would (blob, mtime, mode, owner; not a hard link: a file
        # whose other name went between the walk's lstat and its read keeps a stale
        # link id there; mode and owner, for filesystems whose chmod leaves the ctime)
        # is taken as it is: a dict lookup and a few comparisons instead of a new Entry
        # built in Python, and the directory's entries then compare to the old tree's
        # by identity. A warm walk of the bench set that finds nothing changed:
        # 0.108-0.119 s instead of 0.118-0.123 (3 alternating processes, 8 each).
        old_tree = self.prev.dirs.get(rel)
        old = self._trees.get(old_tree) if old_tree is not None else None
        old_entry = (old or {}).get
        for name in names:
            relpath = prefix + name
            try:
                st = lstat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                self._unstatable(relpath, exc)
                continue
            if (st.st_nlink == 1 and st.st_mode & _S_IFMT == _S_IFREG
                    and (cached := cached_file(relpath)) is not None
                    and cached[0] == st.st_size and cached[1] == st.st_mtime_ns
                    and cached[2] == st.st_ctime_ns and cached[3] == st.st_ino
                    and (excluded is None or not excluded(relpath, False))):
                keep(relpath, cached)
                if on_file is not None:
                    on_file(cached.size)
                if ((same := old_entry(name)) is not None and same[7] == cached[4]
                        and same[5] == st.st_mtime_ns and same[10] == 0
                        and same[2] == st.st_mode & 0o7777 and same[3] == st.st_uid
                        and same[4] == st.st_gid):
                    children.append(same)
                    continue
                children.append(Entry(name, FILE, st.st_mode & 0o7777, st.st_uid, st.st_gid,
                                      st.st_mtime_ns, st.st_size, cached.blob, b"", 0, 0,
                                      cached.xattrs))
                continue
            child = self._capture_entry(dfd, name, relpath, st)
            if child is not None:
                children.append(child)
        return _DirJob(entry, children, rel)

    def read_rest_on_threads(self) -> None:
        """After a full walk: read the files it left queued on READ_AFTER_WALK_THREADS
        threads, when there are enough of them and they were to be read on this thread
        (reader processes, once started, keep them)."""
        queued = len(self._queued)
        if (type(self.readers) is InlineReaders and queued >= READ_AFTER_WALK_MIN
                # ...and not so many that reader processes take them over.
                and queued <= self._to_read
                and sum(job.entry.size for job in self._queued) <= self._bytes_to_read):
            self._retired.append(self.readers)
            self.readers = ThreadReaders(self.objects, READ_AFTER_WALK_THREADS)

    def _reuse_if_unchanged(self, relpath: bytes, st: os.stat_result) -> CachedFile | None:
        """The cached file at `relpath` if its stat key still matches `st`, then kept in
        the new state (and reported to `on_file`); else None: it must be read. (The full
        walk's loop does the same for the files it meets.)"""
        cached = self.prev.files.get(relpath)
        if cached is None or cached[:4] != (st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                            st.st_ino):
            return None
        self.state.put(relpath, cached)
        if self.on_file is not None:
            self.on_file(cached.size)
        return cached

    def _capture_entry(self, dfd: int, name: bytes, relpath: bytes,
                       st: os.stat_result | None = None) -> _Pending | None:
        """Capture one name (lstat'ed here unless `st` is given); None when it vanished,
        is excluded or unreadable."""
        if st is None and (st := self._lstat(dfd, name, relpath)) is None:
            return None
        kind = kind_of_mode(st.st_mode)
        if self._any_excludes and self.excludes.excluded(relpath, kind == DIR):
            return None
        base = _entry_from_stat(name, kind, st)
        try:
            if kind == DIR:
                return self._directory(dfd, name, relpath, base, None, None)
            if kind == FILE:
                return self._file(dfd, name, relpath, base, st)
            if kind == SYMLINK:
                target = os.readlink(name, dir_fd=dfd)
                return base._replace(target=target, size=len(target))
            return base  # FIFOs, sockets, devices: metadata only, never opened
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            self.unreadable.append((relpath, exc.strerror or str(exc)))
            return None

    def _lstat(self, dfd: int, name: bytes, relpath: bytes) -> os.stat_result | None:
        """lstat one name (counted); None when it vanished or cannot be stat'ed (then
        reported as unreadable)."""
        self.counters.lstats += 1
        try:
            return os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            self._unstatable(relpath, exc)
            return None

    def _unstatable(self, relpath: bytes, exc: OSError) -> None:
        """An lstat failed: a name that vanished is left out, any other is unreadable."""
        if not isinstance(exc, FileNotFoundError):
            self.unreadable.append((relpath, exc.strerror or str(exc)))

    def _directory(self, dfd: int, name: bytes, relpath: bytes, base: Entry,
                   prev_tree: ObjectId | None, dirty: "_Trie | None",
                   same_meta: bool = False) -> _DirJob:
        """Capture a directory; `same_meta` says `base` is its previous entry and is
        still right (its own xattrs are not read again)."""
        sub = os.open(name, _OPEN_DIR, dir_fd=dfd)
        try:
            entry = base if same_meta else base._replace(xattrs=read_xattrs(sub))
            if prev_tree is not None and dirty is not None:
                return self._update_dir(sub, relpath, entry, prev_tree, dirty)
            return self.walk_full(sub, relpath, entry)
        finally:
            os.close(sub)

    def _file(self, dfd: int, name: bytes, relpath: bytes, base: Entry,
              st: os.stat_result) -> _Pending:
        if st.st_nlink > 1:
            base = base._replace(ino=self._link_id(st))
            if (twin := self._inodes.get((st.st_dev, st.st_ino))) is not None:
                if isinstance(twin, Entry):
                    self._keep_twin(relpath, st, twin)
                return _same_content(twin, base, relpath)
        cached = self._reuse_if_unchanged(relpath, st)
        if cached is not None:
            # Build the entry once, no _replace().
            done = Entry(name, FILE, base.mode, base.uid, base.gid, base.mtime_ns,
                         base.size, cached.blob, b"", 0, base.ino, cached.xattrs)
            self._remember_inode(st, done)
            return done
        fd = os.open(name, _OPEN_FILE, dir_fd=dfd)
        self.counters.files_opened += 1
        # Start the kernel reading now: by the time a reader reads this file, its
        # pages are on their way, so cold reads of many small files overlap.
        os.posix_fadvise(fd, 0, min(st.st_size, SMALL_FILE), os.POSIX_FADV_WILLNEED)
        job = _FileJob(relpath, base, None, fd=fd)
        self._queued.append(job)
        self._jobs.append(job)
        self._remember_inode(st, job)
        if len(self._queued) >= self._submit_batch:
            self._submit_queued()
        while len(self._jobs) > SETTLE_AFTER:
            self._settle(self._jobs.popleft())
        return job

    def _keep_twin(self, relpath: bytes, st: os.stat_result, twin: Entry) -> None:
        """Another name of a file this walk kept unchanged from the cache: into the
        stat cache too, or a dirty-path capture writing through the first name would
        not find this one among its partners (see _link_partners)."""
        if self._reuse_if_unchanged(relpath, st) is None:
            assert twin.ref is not None
            self.state.put(relpath, CachedFile(st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                               st.st_ino, twin.ref, twin.xattrs))
            self._read_paths.append(relpath)  # a change the walk reports (see changes)

    def _submit_queued(self) -> None:
        """Hand the opened files to the readers (each fd is theirs once submitted)."""
        if not isinstance(self.readers, ReaderProcesses):
            self._to_read -= len(self._queued)
            self._bytes_to_read -= sum(job.entry.size for job in self._queued)
            if self._to_read < 0 or self._bytes_to_read < 0:
                self._start_processes()
        while self._queued:
            job = self._queued.popleft()
            job.future = self.readers.submit(job.fd, job.entry.size)

    def _start_processes(self) -> None:
        """Hand the reads to the reader processes kept, or to new ones."""
        processes = self._kept.take(self.objects) if self._kept is not None else None
        if processes is None:
            try:
                processes = ReaderProcesses(self.objects, self._processes)
            except OSError as exc:
                log.warning("cannot start reader processes (%s); reading in this process",
                            exc)
                self._to_read = self._bytes_to_read = sys.maxsize
                return
        self._read_in(processes)

    def _read_in(self, processes: ReaderProcesses) -> None:
        """Hand every file from now on to `processes`, as it is opened."""
        self._retired.append(self.readers)
        self.readers = processes
        self._submit_batch = 1

    def _link_id(self, st: os.stat_result) -> int:
        """The tree's hard-link group id: the inode number, or, on another filesystem
        mounted inside the resource, a number mixed from device and inode, so unrelated
        files with equal inode numbers never look like one file."""
        if self.root_dev is None or st.st_dev == self.root_dev:
            return st.st_ino
        return (hash((st.st_dev, st.st_ino)) & (2**63 - 1)) | 2**63

    def _remember_inode(self, st: os.stat_result, done: Entry | _FileJob) -> None:
        if st.st_nlink > 1:
            self._inodes[(st.st_dev, st.st_ino)] = done

    # -- dirty-path update --------------------------------------------------------------

    def update(self, root_fd: int, prev_root: ObjectId, dirty: Collection[bytes]) -> _DirJob:
        """Capture only `dirty` paths on top of the previous root tree."""
        self.state = self.prev.derive()
        paths = set(dirty) | self._link_partners(root_fd, prev_root, dirty)
        kept = len(paths) >= DIRTY_KEPT_MIN and self.use_kept_processes()
        if len(paths) >= WARM_AHEAD_MIN and self._looks_cold(root_fd, paths):
            # Not cached (a change made before a restart, a busy machine): the paths'
            # inodes, the files' pages and the store's fan-out directories the new blobs
            # go to are waits for the disk, and threads overlap them. So is the tree
            # database, whose pages the commit of the new trees looks their ids up in:
            # read in meanwhile, cold snapshots of the bench set's 1% change took
            # 0.089-0.153 s against 0.099-0.201 s (7 of 8 alternating rounds faster).
            self.objects.read_trees_ahead()
            self.counters.warmed += _warm_inodes(root_fd, paths)
            if not kept:
                self.readers = ThreadReaders(self.objects, DIRTY_READ_THREADS)
        return self._update_dir(root_fd, b"", None, prev_root, _Trie.build(paths))

    def _looks_cold(self, dfd: int, paths: Collection[bytes]) -> bool:
        """Whether lstats of `paths` wait for the disk, judged from COLD_SAMPLE of them
        timed here (counted as warmed): from the caches an lstat takes a few µs, from
        the disk 100 µs or more."""
        sample = list(itertools.islice(paths, COLD_SAMPLE))
        self.counters.warmed += len(sample)
        started = time.perf_counter()
        for path in sample:
            _lstat_quietly(dfd, path)
        return time.perf_counter() - started > COLD_LSTAT_S * len(sample)

    def _link_partners(self, root_fd: int, prev_root: ObjectId, dirty: Collection[bytes]
                       ) -> set[bytes]:
        """The other names of hard-linked files among `dirty`: a write through one name
        changes them all, but inotify reports only the name written through; and a new
        name linked to a file (`ln a b`) makes that file a hard link, which inotify does
        not report for it either. Costs the trees on the dirty paths (read anyway), an
        lstat of each new name (the capture's, ahead), and, only when one of them is a
        hard link, one scan of the stat cache."""
        linked = set()
        for path in dirty:
            prev = self._prev_entry(prev_root, path)
            if prev is not None and prev.kind == FILE and prev.ino:
                linked.add(prev.ino)
            elif prev is None and not path.endswith(b"/"):
                try:
                    st = os.stat(path, dir_fd=root_fd, follow_symlinks=False)
                except OSError:
                    continue  # gone, or below something that is not a directory
                if st.st_nlink > 1 and stat_mod.S_ISREG(st.st_mode):
                    linked.add(st.st_ino)  # as the stat cache keeps it
        if not linked:
            return set()
        return {p for p, f in self.prev.files.items() if f.ino in linked}

    def _prev_entry(self, tree: ObjectId, path: bytes) -> Entry | None:
        """The entry at relative `path` in the previous trees, if there was one."""
        parts = [p for p in path.strip(b"/").split(b"/") if p not in (b"", b".")]
        entry = None
        for i, name in enumerate(parts):
            entry = self._tree(tree).get(name)
            if entry is None or (i < len(parts) - 1 and entry.kind != DIR):
                return None
            if entry.kind == DIR:
                assert entry.ref is not None
                tree = entry.ref
        return entry

    def _tree(self, tree: ObjectId) -> dict[bytes, Entry]:
        """A previous tree's entries by name (read and decoded at most once)."""
        entries = self._trees.get(tree)
        if entries is None:
            decoded = decode_tree(self.objects.get("trees", tree), tree)
            entries = self._trees.put(tree, {e.name: e for e in decoded})
        return entries

    def _update_dir(self, dfd: int, rel: bytes, entry: Entry | None, prev_tree: ObjectId,
                    node: "_Trie") -> _DirJob:
        by_name: dict[bytes, _Pending] = dict(self._tree(prev_tree))
        children = dict(node.children)
        if node.marked:  # the listing itself may have changed: look for new/vanished names
            self.counters.dirs_listed += 1
            names = {os.fsencode(n) for n in os.listdir(dfd)}  # str for an fd
            for gone in set(by_name) - names:
                children.setdefault(gone, _Trie(marked=True))
            for new in names - set(by_name):
                children.setdefault(new, _Trie(marked=True))
        for name in sorted(children):
            child_node = children[name]
            relpath = _join(rel, name)
            prev = by_name.pop(name, None)
            captured = self._update_child(dfd, name, relpath, prev, child_node)
            if captured is not None:
                by_name[name] = captured
        return _DirJob(entry, list(by_name.values()), rel)

    def _update_child(self, dfd: int, name: bytes, relpath: bytes,
                      prev: _Pending | None, node: "_Trie") -> _Pending | None:
        if node.full:
            self._forget(relpath, prev)
            return self._capture_entry(dfd, name, relpath)
        if not node.marked and isinstance(prev, Entry) and prev.kind == DIR:
            # Only something below changed: keep this directory's own metadata. (A change
            # to its names, mode or xattrs would have marked it: the watcher reports the
            # directory of every create, delete and move, and attribute changes.)
            try:
                assert prev.ref is not None
                return self._directory(dfd, name, relpath, prev, prev.ref, node,
                                       same_meta=True)
            except OSError:
                pass  # it moved or changed type after all: look at it properly
        st = self._lstat(dfd, name, relpath)
        if st is None:
            self._forget(relpath, prev)
            return None
        if (stat_mod.S_ISDIR(st.st_mode) and isinstance(prev, Entry) and prev.kind == DIR
                and not (self.excludes and self.excludes.excluded(relpath, True))):
            assert prev.ref is not None
            try:
                base = _entry_from_stat(name, DIR, st)
                return self._directory(dfd, name, relpath, base, prev.ref, node)
            except FileNotFoundError:
                self._forget(relpath, prev)
                return None
        self._forget(relpath, prev)
        return self._capture_entry(dfd, name, relpath, st)

    def _forget(self, relpath: bytes, prev: _Pending | None) -> None:
        """Drop what the stat cache knew at `relpath` before it is captured afresh: a
        whole subtree when it was a directory (a scan of the cache), else one key."""
        if isinstance(prev, _DirJob) or (isinstance(prev, Entry) and prev.kind == DIR):
            self.state.drop_under(relpath)
        else:
            self.state.drop(relpath)

    # -- finishing ----------------------------------------------------------------------

    def finish(self, job: _DirJob) -> ObjectId:
        """Wait for the reads, then write trees bottom-up; return the root tree id."""
        resolve = self._resolve
        # Most children are entries already (unchanged files): no call for them.
        entries = [e for c in job.children
                   if (e := c if type(c) is Entry else resolve(c)) is not None]
        tree = self._unchanged_tree(job.relpath, entries)
        if tree is None:
            tree = self.objects.put("trees", encode_tree(entries))
            self._trees.put(tree, {e.name: e for e in entries})
        self.state.dirs[job.relpath] = tree
        return tree

    def _unchanged_tree(self, relpath: bytes, entries: list[Entry]) -> ObjectId | None:
        """The id this directory had at the last capture, when its entries are equal to
        that tree's (then its encoding, and so its id, is the same); else None. Spares a
        full walk encoding and hashing every directory again: a third of its time."""
        tree = self.prev.dirs.get(relpath)
        if tree is None:
            return None
        known = self._trees.get(tree)
        if known is None or len(known) != len(entries) or list(known.values()) != entries:
            return None
        return tree

    def _resolve(self, item: _Pending) -> Entry | None:
        if isinstance(item, Entry):
            return item
        if isinstance(item, _DirJob):
            assert item.entry is not None
            return item.entry._replace(ref=self.finish(item))
        return self._settle(item)

    def _settle(self, job: _FileJob) -> Entry | None:
        """Wait for a file's read and take its outcome in, once (see SETTLE_AFTER)."""
        if self._queued:  # the walk is over, or this job came up before its batch did
            self._submit_queued()
        if not job.settled:
            job.result = self._resolve_file(job)
            job.settled = True
            if not job.entry.ino:  # hard-link partners still to come share the future
                job.future = None
        return job.result

    def _resolve_file(self, job: _FileJob) -> Entry | None:
        future = (job.twin or job).future
        assert future is not None
        self.readers.start(future)
        out = future.result()
        self.counters.bytes_read += out.length * max(out.attempts, 1)
        if self.on_file is not None:
            self.on_file(out.length)
        cached = self.prev.files.get(job.relpath)
        self._read_paths.append(job.relpath)
        if out.error is not None:
            self.unreadable.append((job.relpath, out.error))
            self.state.drop(job.relpath)
            return None
        if out.attempts > 1:
            self.unstable.append(job.relpath)
        if out.blob is None or out.stat is None:  # never held still
            if cached is None:
                self.state.drop(job.relpath)
                return None
            self.state.put(job.relpath, cached._replace(ctime_ns=UNTRUSTED))
            return job.entry._replace(ref=cached.blob, size=cached.size,
                                      mtime_ns=cached.mtime_ns, xattrs=cached.xattrs)
        st = out.stat
        if cached is None or cached.blob != out.blob:
            self.changed += 1
        ctime = st.st_ctime_ns if out.trusted else UNTRUSTED
        self.state.put(job.relpath, CachedFile(st.st_size, st.st_mtime_ns, ctime,
                                               st.st_ino, out.blob, out.xattrs))
        return job.entry._replace(ref=out.blob, size=out.length, mtime_ns=st.st_mtime_ns,
                                  mode=stat_mod.S_IMODE(st.st_mode), uid=st.st_uid,
                                  gid=st.st_gid, xattrs=out.xattrs)

    def changes(self) -> dict[bytes, CachedFile | None]:
        """After a full walk: the files whose stat cache entry it changed from `prev`'s
        (None: dropped). A full walk keeps an unchanged file's entry, the same object;
        only the files it read get new ones (or are dropped), and the previous files
        it did not meet are gone. O(changes) but for one set difference in C: comparing
        the two caches took 7 ms of a warm walk of 20,000 files."""
        files, before = self.state.files, self.prev.files
        # A file read that is neither cached now nor was before (new, and unreadable or
        # never still) changes nothing.
        changes = {k: v for k in self._read_paths
                   if (v := files.get(k)) is not None or k in before}
        gone = (before.keys() - files.keys() if isinstance(before, dict)
                else [k for k in before if k not in files])
        changes.update(dict.fromkeys(gone))
        return changes

    def close(self) -> None:
        """Close the files not handed on, and let the readers finish or drop what they
        hold (after an error: no file stays open, and no process outlives the capture
        but idle ones left to `kept`)."""
        self.stop_warming()
        for job in self._queued:
            os.close(job.fd)
        self._queued.clear()
        for readers in [*self._retired, self.readers]:
            if self._kept is not None and isinstance(readers, ReaderProcesses):
                self._kept.keep(readers)  # stopped unless idle
            else:
                readers.close()


def _warm_inodes(dfd: int, paths: Collection[bytes]) -> int:
    """lstat `paths` (relative to `dfd`) on WARM_THREADS threads, for the dentries and
    inodes of each path and its directories to be cached before the walk needs them, in
    the order it needs them; returns how many were lstat'ed. Failures do not matter here:
    the walk meets them again."""
    _lstat_ahead(dfd, list(paths), WARM_THREADS, 1).shutdown(wait=True)
    return len(paths)


def _lstat_ahead(dfd: int, paths: list[bytes], threads: int, chunk: int
                 ) -> cf.ThreadPoolExecutor:
    """Start lstat'ing `paths` (relative to `dfd`) on `threads` threads, in order,
    `chunk` paths a task, only to fill the caches; the caller shuts the pool down (and
    keeps `dfd` open until then)."""
    pool = cf.ThreadPoolExecutor(threads, thread_name_prefix=WARM_THREAD_PREFIX)
    for start in range(0, len(paths), chunk):
        pool.submit(_lstat_all_quietly, dfd, paths[start:start + chunk])
    return pool


def _lstat_all_quietly(dfd: int, paths: list[bytes]) -> None:
    for path in paths:
        _lstat_quietly(dfd, path)


def _lstat_quietly(dfd: int, path: bytes) -> None:
    """lstat only to fill the caches: a failure is the walk's to meet and report."""
    try:
        os.stat(path, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        pass


def _entry_from_stat(name: bytes, kind: bytes, st: os.stat_result) -> Entry:
    special = kind not in (FILE, DIR, SYMLINK)
    return Entry(name=name, kind=kind, mode=stat_mod.S_IMODE(st.st_mode), uid=st.st_uid,
                 gid=st.st_gid, mtime_ns=st.st_mtime_ns,
                 size=st.st_size if kind == FILE else 0,
                 rdev=st.st_rdev if special else 0)


def _same_content(twin: Entry | _FileJob, base: Entry, relpath: bytes) -> _Pending:
    """A further hard link to an inode already captured in this walk."""
    if isinstance(twin, Entry):
        return base._replace(ref=twin.ref, xattrs=twin.xattrs, size=twin.size)
    return _FileJob(relpath, base, None, twin=twin)


class TreeCache:
    """Decoded trees by id, the most recently used kept. Trees are immutable, so an
    entry never goes stale; the bound, on entries rather than trees (a directory may
    hold 100,000 files), keeps memory flat. One capture at a time uses it (not
    thread-safe)."""

    def __init__(self, limit: int = TREE_CACHE_ENTRIES) -> None:
        self.limit = limit
        self._trees: OrderedDict[ObjectId, dict[bytes, Entry]] = OrderedDict()
        self._entries = 0

    def get(self, tree: ObjectId) -> dict[bytes, Entry] | None:
        entries = self._trees.get(tree)
        if entries is not None:
            self._trees.move_to_end(tree)
        return entries

    def put(self, tree: ObjectId, entries: dict[bytes, Entry]) -> dict[bytes, Entry]:
        """Remember `entries` (by name) as tree `tree`'s; returns them."""
        if tree not in self._trees:
            self._entries += len(entries)
        self._trees[tree] = entries
        self._trees.move_to_end(tree)
        while self._entries > self.limit and len(self._trees) > 1:
            self._entries -= len(self._trees.popitem(last=False)[1])
        return entries


def _join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


@dataclass
class _Trie:
    """Dirty paths as a tree of names; `marked` = this path itself changed, `full` = walk
    everything below it."""

    marked: bool = False
    full: bool = False
    children: dict[bytes, "_Trie"] = field(default_factory=dict)

    @classmethod
    def build(cls, paths: Collection[bytes]) -> "_Trie":
        root = cls()
        for path in paths:
            node = root
            for part in path.strip(b"/").split(b"/"):
                if part in (b"", b"."):
                    continue
                if part == b"..":
                    raise CaptureError(f"dirty path {path!r} leaves the resource")
                node = node.children.setdefault(part, cls())
            node.marked = True
            node.full = node.full or path.endswith(b"/")
        return root
