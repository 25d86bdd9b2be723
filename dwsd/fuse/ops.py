"""The pyfuse3 adapter: kernel requests -> `vfs.View` and the object store.

Every handler goes through `_fuse_errors`, the one place where errors become errnos:
a ViewError gives its errno (not found -> ENOENT...), a missing or corrupt object gives
EIO and one log line naming the object, anything unexpected gives EIO and a traceback in
the log. Nothing but FUSEError leaves a handler: another exception would end
`pyfuse3.main()` and the daemon with it.

Blocking work goes to worker threads, each kind through its own CapacityLimiter (a
shared pool could fill with slow verifications and starve reads): tree loads, blob opens,
statfs and catalog reloads through `meta`; blob verification through `verify`; file
reads through `read`. Everything else runs on the trio thread and never blocks; see
docs/concurrency.md for the places that rely on there being no await between two lines.

Content is immutable, so below the snapshots the kernel may cache it all: files open with
`keep_cache`, entries and attributes carry long timeouts. The root's names change with
the catalog: they get short timeouts, and `show_catalog` invalidates the ones that
changed, so new snapshots, moved tags and `latest` show at once.

A small file's open pushes its verified content into the kernel's page cache
(`store_pages`), so reading it needs no further request. A small blob whose pages are
cached (read before, or just written by a snapshot) is read, and verified if new, at open
on the trio thread: no worker-thread round trip. So the next small files of a sequential
reader are put in the page cache by a helper process (`warm`, `warmer.py`), which shares
no GIL with this one; without it, a worker thread reads and verifies them ahead. The same
process lists a directory whose names a reader looks up one by one (`list_ahead`): the
kernel gets them all from a few READDIRPLUS replies instead of a LOOKUP each.

What the view serves is cached once: in the kernel's pages of the view's inode, not
also in the blob file's. A small blob's file pages are dropped once its content is read
at open, a larger blob's once a READ has served them (`drop_cached_pages`). Caching
every byte twice made the page cache grow by twice the bytes read, and every new page
costs the kernel an allocation: on the bench machine, whose pages beyond about 3 GB
touched cost 37 us each instead of 3 us (a host fault under the VM), a cold read of
the bench set went from 13-22 s to 8.5-10 s with the drop, small files from 11-15 s to
6-7.6 s (6 alternating runs). Dropped pages are free for the next pages the view
allocates; a re-read after the kernel dropped the view's own pages reads the disk. So
a file whose content was pushed opens without reading anything while the kernel keeps
its inode (`Node.content_pushed`): its pages are there, and a read of one the kernel
dropped opens the blob then. (A new mount finds the blobs it served before uncached.)
"""
from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Concatenate, Container, Coroutine, \
    NoReturn, ParamSpec, Sequence, TypeVar, cast

import pyfuse3
import trio

from dwsd.errors import CorruptObjectError, ObjectMissingError, StoreError
from dwsd.fuse.vfs import ROOT, Attributes, Inode, Listed, RootChange, View, ViewError
from dwsd.store.catalog import Catalog
from dwsd.store.ids import ObjectId, hash_bytes
from dwsd.store.objects import hash_fd
from dwsd.store.store import Store
from dwsd.store.tree import TYPE_BITS, Entry, decode_tree

log = logging.getLogger(__name__)

ROOT_TIMEOUT = 1.0          # the root's names follow the catalog
SNAPSHOT_TIMEOUT = 86400.0  # everything below a snapshot is immutable
BLOCK_SIZE = 128 * 1024     # st_blksize: the largest read FUSE sends by default
READ_THREADS = 16
VERIFY_THREADS = 2
META_THREADS = 4
PREFETCH_THREADS = 2        # read-ahead batches of blobs in flight; more are skipped
VERIFIED_IDS_KEPT = 65536
# A blob up to SMALL_BLOB is read and verified whole at open, pushed to the page cache
# and served from memory. At 1 MiB, the bench set's 200 files of 1-8 MiB, read cold
# after its 256 MB ones, took 2.9-5.3 s: verified by one read, then served by 1 MiB
# reads from the page cache, each byte was copied three times on a machine short of
# memory bandwidth. Read whole and pushed, they take 1.9-2.2 s (3 alternating rounds of
# cold reads of large/, then medium/, through `dwsd mount`). Open handles hold at most
# OPEN_CONTENT_MAX bytes of content; past that, opens take the larger blobs' path.
SMALL_BLOB = 8 << 20
OPEN_CONTENT_MAX = 128 << 20
INLINE_HASH_MAX = 128 << 10  # a cached blob up to this size is hashed on the trio thread
                             # (~50 µs at most here, less than a worker-thread hop)
REPORTED_KEPT = 1024
SUBTREES_AHEAD = 256        # child trees queued when a directory is opened or entered
TREES_BATCH = 16            # trees loaded ahead per thread hop (one batch in flight)
TREES_QUEUED = 4096         # trees waiting to be loaded ahead; more are dropped
FILES_AHEAD = 16            # small files verified ahead of a sequential reader...
FILES_BATCH = 8             # ...this many per thread hop
READY_KEPT = 64             # small blobs read and verified ahead, waiting for their open...
READY_BYTES = 16 << 20      # ...and at most this many bytes of them
WARMED_KEPT = 4096          # blobs remembered as handed to the warmer (not sent again)
# A reader that opens or stats the names of a directory it has not listed (paths from a
# manifest or a file list, a shuffled data loader) costs a LOOKUP round trip a name.
# Once a tree directory of LIST_AHEAD_MIN to LIST_AHEAD_MAX names had as many names
# looked up as a listing of it costs requests, and at least 1/LIST_SHARE of them
# (`listing_threshold`), the warmer process lists it through the mount: the kernel then
# has every name's entry from a few READDIRPLUS replies, and the reader's next names
# need no request. A listing costs an opendir, a reply for each page of entries (about
# NAMES_PER_REPLY short names; more on kernels that fill the reader's larger buffer), a
# last empty reply and a releasedir. So a listing never costs more than the lookups
# before it, and a reader that takes a few names of each directory (a sample) lists
# nothing. The count lives as long as the kernel holds the directory
# (`Node.looked_up`). The bench set's 20,000 small files (1,000 directories of about
# 20, listed at the 4th name), read cold in path order: 5.19-5.42 s without, 4.54-5.19 s
# with (`bench/ab_read.sh c524c12 3 small`). Listing after the 2nd name gained more
# there (6.1-6.8 s against 5.1-5.6 s in whole-set reads), but made a reader of 2 random
# names in each of 2,000 directories of 40 slower (4.1-4.4 s against 3.1-3.7 s) and
# had the kernel hold 5 times the inodes.
NAMES_PER_REPLY = 25
LIST_SHARE = 16
LIST_AHEAD_MIN = 16
# Larger directories are left to lookups: a listing would have the kernel hold an inode
# for each of their names (about 1 KB each) for a reader that may want a few.
LIST_AHEAD_MAX = 1 << 16


def listing_threshold(names: int) -> int:
    """Names looked up one by one in a directory of `names` names after which it is
    listed ahead (see NAMES_PER_REPLY)."""
    return max(3 + -(-names // NAMES_PER_REPLY), names // LIST_SHARE)

P = ParamSpec("P")
T = TypeVar("T")
Invalidate = Callable[[Inode, bytes], None]
StorePages = Callable[[int, int, bytes], None]
Warm = Callable[[Sequence[str]], bool]
ListAhead = Callable[[bytes], bool]
ReaddirReply = Callable[[Any, bytes, pyfuse3.EntryAttributes, int], bool]


def _fuse_errors(handler: Callable[Concatenate["ViewOps", P], Awaitable[T]]
                 ) -> Callable[Concatenate["ViewOps", P], Coroutine[Any, Any, T]]:
    """Map every exception of a handler to FUSEError (the one place that does)."""
    async def wrapper(self: "ViewOps", /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ViewError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except (ObjectMissingError, CorruptObjectError) as exc:
            self.report_bad_object(exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("view: unexpected error in %s%r", handler.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None
    functools.update_wrapper(wrapper, handler)
    return wrapper


@dataclass
class ViewCounters:
    """Work the view did, for tests and the bench (counting, not timing)."""

    pushed: int = 0          # small files whose content open pushed to the page cache
    opened_inline: int = 0   # small blobs read at open on the trio thread (cached)
    opened_in_thread: int = 0  # small blobs read at open in a worker thread
    listed_ahead: int = 0    # directories handed to `list_ahead`


@dataclass
class _OpenFile:
    """An open blob: a small one's verified content, or a larger one's fd, or neither
    (its content was pushed to the kernel's cache before: the blob is opened by the
    first read, if any). The fd is closed by whichever comes last: release or the last
    read in flight (so a released fd number is never reused under a running pread)."""

    fd: int | None
    inode: int
    blob: ObjectId
    size: int
    content: bytes | None = None
    reads: int = 0
    released: bool = False

    def close_if_idle(self) -> None:
        if self.fd is not None and self.released and self.reads == 0:
            fd, self.fd = self.fd, None  # closed once, whoever calls again
            os.close(fd)


@dataclass
class _OpenDir:
    inode: Inode
    names: list[bytes]   # frozen at opendir: offsets index into it, so restart works


class ViewOps(pyfuse3.Operations):
    """pyfuse3 Operations over a read-only `Store`.

    `invalidate` is called as (parent inode, name) for every kernel entry a catalog
    change made stale, from `init` on: `mount.py` passes pyfuse3's asynchronous
    invalidation; tests calling handlers directly (no mount) pass a recorder or None.
    `store_pages(inode, offset, data)` puts data in the kernel's page cache of an inode:
    `mount.py` passes pyfuse3.notify_store; tests pass a recorder or None.
    `readdir_reply` is a seam for the same tests (a real ReaddirToken exists only inside
    a mount).
    `warm(paths)` queues store files to be read into the page cache by another process
    without blocking (False: not queued, its queue is full; OSError: it is gone or
    cannot start, and the view reads ahead in threads from then on): `mount.py` passes
    `Warmer.warm`; with None (tests) the view reads ahead in threads.
    `list_ahead(path)` likewise queues a directory (its path below the mount) to be
    listed through the mount by another process: `mount.py` passes `Warmer.list_dir`
    under the mountpoint; with None nothing is listed ahead.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, store: Store, *, invalidate: Invalidate | None = None,
                 store_pages: StorePages | None = None,
                 readdir_reply: ReaddirReply = pyfuse3.readdir_reply,
                 warm: Warm | None = None, list_ahead: ListAhead | None = None,
                 tree_cache_entries: int | None = None) -> None:
        super().__init__()
        self.store = store
        kwargs = {} if tree_cache_entries is None else {"tree_cache_entries":
                                                        tree_cache_entries}
        self.vfs = View(uid=os.getuid(), gid=os.getgid(), **kwargs)
        self._notify = invalidate
        self._invalidate: Invalidate | None = None  # set by init(): see there
        self._store_pages = store_pages
        self._warm = warm
        # Blobs handed to `warm` -> whether opening it should send the next batch.
        self._warmed: OrderedDict[ObjectId, bool] = OrderedDict()
        self._list_ahead = list_ahead
        self.counters = ViewCounters()
        self._inode_handles: dict[int, int] = {}  # open file handles per inode
        self._open_content = 0  # bytes of content the open handles hold
        self._readdir_reply = readdir_reply
        self._handles = itertools.count(1)
        self._files: dict[int, _OpenFile] = {}
        self._dirs: dict[int, _OpenDir] = {}
        self._verified: OrderedDict[ObjectId, None] = OrderedDict()
        self._verifying: dict[ObjectId, trio.Event] = {}
        self._loading: dict[ObjectId, trio.Event] = {}
        # Trees a request waits for while a batch loads them ahead: read by that batch's
        # thread (set membership is atomic under the GIL), to hand them over at once.
        self._awaited: set[ObjectId] = set()
        self._ready: OrderedDict[ObjectId, bytes] = OrderedDict()
        self._ready_bytes = 0
        self._prefetches = 0
        self._trees_ahead: deque[ObjectId] = deque()
        self._loading_ahead = False
        self._large_first_uses = 0  # larger blobs being read for their first open
        self._closed = False
        self._corrupt: set[ObjectId] = set()
        self._reported: set[str] = set()
        self._reload_lock = trio.Lock()
        self.read_limiter = trio.CapacityLimiter(READ_THREADS)
        self.verify_limiter = trio.CapacityLimiter(VERIFY_THREADS)
        self.meta_limiter = trio.CapacityLimiter(META_THREADS)
        self.prefetch_limiter = trio.CapacityLimiter(PREFETCH_THREADS)
        self.tree_ahead_limiter = trio.CapacityLimiter(1)
        self.initialized = trio.Event()

    def init(self) -> None:
        """pyfuse3 calls this on the kernel's INIT, just before answering it; invalidations
        sent before that fail with ENOSYS (and are pointless: the kernel has cached
        nothing). `initialized` is set: a task waiting on it runs once the answer is sent
        (pyfuse3 sends it before its task awaits), when the kernel has applied the
        mount's settings from it."""
        self._invalidate = self._notify
        self.initialized.set()

    # -- the catalog --------------------------------------------------------------------

    def show_catalog(self, catalog: Catalog, mtime_ns: int | None = None) -> RootChange:
        """Show `catalog` in the root and invalidate the kernel's stale root entries.
        Never blocks (invalidations are queued)."""
        change = self.vfs.refresh(catalog, mtime_ns)
        if self._invalidate is not None:
            for name in change.names:
                self._invalidate(ROOT, name)
        if change:
            log.debug("view: root changed: %s", change)
        return change

    async def reload_catalog(self) -> RootChange:
        """Re-read the store's catalog (in a thread) and show it. Reloads are serialised,
        so an older catalog is never shown after a newer one. Raises StoreError."""
        async with self._reload_lock:
            mtime_ns = await trio.to_thread.run_sync(self._read_catalog,
                                                     limiter=self.meta_limiter)
            return self.show_catalog(self.store.catalog, mtime_ns)

    def _read_catalog(self) -> int | None:
        """Reload the catalog (blocks); return catalog.json's mtime, None if absent."""
        self.store.reload_catalog()
        try:
            return os.stat(self.store.catalog.path).st_mtime_ns
        except FileNotFoundError:
            return None

    # -- errors -------------------------------------------------------------------------

    def report_bad_object(self, exc: Exception) -> None:
        """Log a missing or corrupt object once (later requests hitting it stay quiet)."""
        message = str(exc)
        if message in self._reported:
            log.debug("view: %s", message)
            return
        if len(self._reported) >= REPORTED_KEPT:
            self._reported.clear()
        self._reported.add(message)
        log.error("view: %s; reads of it fail with EIO", message)

    # -- names and attributes -----------------------------------------------------------

    def entry_attributes(self, attrs: Attributes, timeout: float | None = None
                         ) -> pyfuse3.EntryAttributes:
        """pyfuse3 attributes with timeouts: short for the root and its names, long below
        (an inode's attributes never change; see vfs). `timeout`, when given, is
        the one for every name in the inode's directory."""
        if timeout is None:
            timeout = ROOT_TIMEOUT if self.vfs.volatile(attrs.inode) else SNAPSHOT_TIMEOUT
        return fuse_attributes(attrs.inode, attrs.mode, attrs.nlink, attrs.uid, attrs.gid,
                               attrs.rdev, attrs.size, attrs.mtime_ns, timeout)

    async def _ensure_tree(self, inode: int) -> None:
        """Load the tree of directory `inode` into the cache if it is not there, or wait
        for the load already under way. After this returns, the caller must use the tree
        before its next await (a later load may evict it)."""
        while (oid := self.vfs.tree_needed(inode)) is not None:
            pending = self._loading.get(oid)
            if pending is not None:
                self._awaited.add(oid)
                try:
                    await pending.wait()  # then look again: that load may have failed
                finally:
                    self._awaited.discard(oid)
                continue
            done = self._loading[oid] = trio.Event()
            try:
                entries = await trio.to_thread.run_sync(self._load_tree, oid,
                                                        limiter=self.meta_limiter)
            finally:
                del self._loading[oid]
                done.set()
            self.vfs.add_tree(oid, entries)
            self._want_subtrees(oid, urgent=True)

    def _load_tree(self, oid: ObjectId) -> list[Entry]:
        """Read, verify and decode a tree (blocks). A walk loads trees in no order of
        their place in the tree database: it is read in ahead (at most once a second,
        on a thread; see treedb.py)."""
        self.store.objects.read_trees_ahead()
        return decode_tree(self.store.objects.get("trees", oid), oid)

    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if name in (b".", b".."):
            inode = self.vfs.dot_lookup(parent_inode, name)
            return self.entry_attributes(self.vfs.getattr(inode))
        await self._ensure_tree(parent_inode)
        reply = self.entry_attributes(self.vfs.lookup(parent_inode, name))
        if self._list_ahead is not None:
            # Speculative: must not fail the lookup, whose reference is counted.
            try:
                self._count_lookup(Inode(parent_inode))
            except Exception:
                log.exception("view: listing ahead failed; not listing ahead from now on")
                self._list_ahead = None
        return reply

    def _count_lookup(self, directory: Inode) -> None:
        """Count a name looked up in `directory` (its tree cached); have a tree
        directory listed ahead when the count reaches `listing_threshold`. Never
        blocks."""
        node = self.vfs.node(directory)
        if node.tree is None:
            return  # the root or a snapshot: their names come from the catalog
        node.looked_up += 1
        names = len(self.vfs.trees.get(node.tree))
        if not (LIST_AHEAD_MIN <= names <= LIST_AHEAD_MAX and
                node.looked_up == listing_threshold(names)):
            return
        path = self.vfs.path(directory)
        assert self._list_ahead is not None
        try:
            queued = path is not None and self._list_ahead(path)
        except OSError as exc:
            log.warning("view: no warmer process (%s); directories are not listed "
                        "ahead from now on", exc.strerror)
            self._list_ahead = None
            return
        if queued:
            self.counters.listed_ahead += 1
        else:  # its queue is full (or a directory on the way is gone): at the next name
            node.looked_up -= 1

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.vfs.forget(inode, count)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        return self.entry_attributes(self.vfs.getattr(inode))

    @_fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                       ) -> bytes:
        return self.vfs.readlink(inode)

    # -- directories --------------------------------------------------------------------

    @_fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        await self._ensure_tree(inode)
        names = self.vfs.listdir(inode)
        fh = next(self._handles)
        self._dirs[fh] = _OpenDir(Inode(inode), names)
        tree = self.vfs.node(inode).tree
        if tree is not None:
            self._want_subtrees(tree, urgent=True)
        return fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dir(fh)
        await self._ensure_tree(handle.inode)
        listed = None
        if self.vfs.node(handle.inode).tree is not None:
            listed = self.vfs.listed(handle.inode)
            if not listed.links:
                self._reply_listed(listed, start_id, token)
                return
        try:
            self._reply_children(handle, start_id, token)
        finally:
            if listed is not None:  # made above, maybe with nothing counted in it
                self.vfs.release_if_unused(listed)

    def _reply_children(self, handle: _OpenDir, start: int, token: pyfuse3.ReaddirToken
                        ) -> None:
        """Answer a readdir through vfs.children: the root, snapshot directories, and
        tree directories with hard links. children counts a reference for each name it
        gives; the kernel holds none for a name it did not take, and none at all when
        the handler fails (pyfuse3 then answers with an error, dropping the buffer)."""
        # One timeout for all the names of a directory: the root's follow the catalog,
        # the rest are below a snapshot (vfs.volatile).
        timeout = ROOT_TIMEOUT if handle.inode == ROOT else SNAPSHOT_TIMEOUT
        reply, attributes = self._readdir_reply, self.entry_attributes
        given: list[int] = []
        try:
            # A root name gone since opendir is skipped: "may or may not be returned".
            for index, name, attrs in self.vfs.children(handle.inode, handle.names, start):
                given.append(attrs.inode)
                if not reply(token, name, attributes(attrs, timeout), index + 1):
                    self.vfs.refused(given.pop())
                    return
        except BaseException:
            for inode in given:
                self.vfs.refused(inode)
            raise

    def _reply_listed(self, listed: Listed, start: int, token: pyfuse3.ReaddirToken
                      ) -> None:
        """Answer a readdir of a tree directory with no hard links, counting a kernel
        reference for each name taken. A walk meets every name here, so the loop makes
        no object a name: it fills one pyfuse3 attributes object in turn (the reply
        copies it), from the entry itself, as vfs.entry_attributes would."""
        entries, base, reply = listed.entries, listed.base, self._readdir_reply
        attrs = fuse_attributes(0, 0, 1, 0, 0, 0, 0, 0, SNAPSHOT_TIMEOUT)
        type_bits = TYPE_BITS
        taken = start
        try:
            for i in range(start, len(entries)):
                entry = entries[i]
                attrs.st_ino = base + i
                attrs.st_mode = type_bits[entry.kind] | entry.mode
                attrs.st_uid = entry.uid
                attrs.st_gid = entry.gid
                attrs.st_rdev = entry.rdev
                attrs.st_size = size = entry.size
                attrs.st_blocks = (size + 511) >> 9
                attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = entry.mtime_ns
                if not reply(token, entry.name, attrs, i + 1):
                    break
                taken = i + 1
            # Counted only now: after a failure the kernel gets none of them (see
            # _reply_children).
            self.vfs.count_listed(listed, start, taken)
        finally:
            self.vfs.release_if_unused(listed)

    @_fuse_errors
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    def _dir(self, fh: int) -> _OpenDir:
        try:
            return self._dirs[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    # -- files --------------------------------------------------------------------------

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
                   ) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        blob = self.vfs.blob(inode)
        node = self.vfs.node(inode)
        size = node.attrs.size
        if node.content_pushed:
            # Pushed at an earlier open: the kernel likely still has every page, and a
            # read of one it dropped opens the blob then. Nothing to read or warm now.
            return self._new_handle(_OpenFile(None, inode, blob, size))
        cached = False
        if size <= SMALL_BLOB and self._open_content + size <= OPEN_CONTENT_MAX:
            # Counted before the read's await, so concurrent opens see it; release
            # takes it back (`size` of a handle holding content).
            self._open_content += size
            try:
                content, cached = await self._small_content(blob, size)
            except BaseException:
                self._open_content -= size
                raise
            handle = _OpenFile(None, inode, blob, size, content)
            self._push_pages(handle)
        else:
            handle = _OpenFile(await self._open_blob(blob, size), inode, blob, size)
        info = self._new_handle(handle)  # no await since the fd was opened: nothing leaks it
        if self._warm is not None:
            # Found in the page cache by chance, the next files likely are too; put
            # there by the warmer, the next batch is due at the middle of this one.
            if not cached or self._warmed.get(blob):
                self._warm_ahead(inode)
        elif not cached:
            # Found in the page cache, the next files likely are too: reading them
            # ahead in a thread would cost more than it saves.
            self._read_ahead(inode)
        return info

    def _new_handle(self, handle: _OpenFile) -> pyfuse3.FileInfo:
        fh = next(self._handles)
        self._files[fh] = handle
        self._inode_handles[handle.inode] = self._inode_handles.get(handle.inode, 0) + 1
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    def _push_pages(self, handle: _OpenFile) -> None:
        """Put a small file's content in the kernel's page cache before its open is
        answered: its reads then need no request (one round trip less per file). Only
        when no other handle of the inode is open: the kernel holds a page locked while
        it waits for our answer to a read of it, and storing into that page from the
        trio thread, which must answer, would deadlock. With no handle, no read of the
        inode can be in flight. Never blocks; a failed push only costs the reads."""
        if self._store_pages is None or self._inode_handles.get(handle.inode) \
                or not handle.content:
            return
        try:
            self._store_pages(handle.inode, 0, handle.content)
        except OSError as exc:
            log.debug("view: pushing inode %d's pages: %s", handle.inode, exc)
            return
        self.vfs.node(handle.inode).content_pushed = True
        self.counters.pushed += 1

    async def _small_content(self, blob: ObjectId, size: int) -> tuple[bytes, bool]:
        """The verified content of a small blob, and whether the page cache had it: taken
        from what the read-ahead holds, or from the page cache on this thread (hashed
        here on its first use in this process if it is small enough), or else read
        whole (and hashed on its first use) in one thread hop. Concurrent first reads
        of one blob wait for one. Raises ObjectMissingError, CorruptObjectError."""
        while True:
            content = self._ready.pop(blob, None)
            if content is not None:
                self._ready_bytes -= len(content)
                return content, False
            if not await self._waited_for_first_use(blob):
                break
        verified = blob in self._verified
        if verified or size <= INLINE_HASH_MAX:
            content = self._read_small_cached(blob, size)
            if content is not None and (verified or hash_bytes(content) == blob):
                self._remember_verified(blob)
                self.counters.opened_inline += 1
                return content, True
            # Not cached, or corrupt: a worker thread reads it (and marks it corrupt).
        self.counters.opened_in_thread += 1
        return await self._first_use(blob, functools.partial(
            self._read_small, blob, size, blob not in self._verified)), False

    def _read_small_cached(self, blob: ObjectId, size: int) -> bytes | None:
        """A small blob's content (not verified here) if the kernel's caches hold its
        file and all its pages, else None; never blocks on the disk. Raises
        ObjectMissingError."""
        fd = self.store.objects.open_blob_cached(blob)
        if fd is None:
            return None
        try:
            content = read_if_cached(fd, 0, size)
            if content is not None:
                drop_cached_pages(fd)
            return content
        finally:
            os.close(fd)

    def _read_small(self, blob: ObjectId, size: int, verify: bool = True) -> bytes | None:
        """Read a small blob whole (blocks); None when `verify` finds its hash wrong. One
        pread of size + 1 bytes, so a blob grown on disk fails the hash too."""
        fd = self.store.objects.open_blob(blob)
        try:
            content = os.pread(fd, size + 1, 0)
            drop_cached_pages(fd)
        finally:
            os.close(fd)
        if verify and hash_bytes(content) != blob:
            return None
        return content

    async def _open_blob(self, blob: ObjectId, size: int) -> int:
        """Open a larger blob, hashing it first on its first open in this process; one
        thread hop either way. Concurrent first opens of one blob wait for one
        verification. Raises ObjectMissingError, CorruptObjectError."""
        while True:
            if blob in self._verified:
                self._verified.move_to_end(blob)
                return await trio.to_thread.run_sync(self.store.objects.open_blob, blob,
                                                     limiter=self.meta_limiter)
            if not await self._waited_for_first_use(blob):
                break
        # A reader waits on this whole-blob read: trees are not loaded ahead meanwhile
        # (on a fresh mount that took the disk and doubled a 256 MB file's open).
        self._large_first_uses += 1
        try:
            return await self._first_use(blob, functools.partial(self._open_verified,
                                                                 blob))
        finally:
            self._large_first_uses -= 1
            self._load_trees_ahead()

    async def _waited_for_first_use(self, blob: ObjectId) -> bool:
        """Raise CorruptObjectError if `blob` is known to be corrupt. If another task is
        reading it for the first time, wait for that and return True (look again: it may
        have failed); else return False without awaiting, so the caller may start the
        first use itself with nothing slipping in between."""
        if blob in self._corrupt:
            raise _corrupt_blob(blob)
        pending = self._verifying.get(blob)
        if pending is None:
            return False
        await pending.wait()
        return True

    async def _first_use(self, blob: ObjectId, work: Callable[[], T | None]) -> T:
        """Run `work` (blocking: reads and verifies `blob`; None when its hash is wrong)
        in a thread of the verify limiter, while concurrent users of `blob` wait on one
        Event; a wrong hash marks the blob corrupt for good. The Event is in place
        before the first await."""
        done = self._verifying[blob] = trio.Event()
        try:
            result = await trio.to_thread.run_sync(work, limiter=self.verify_limiter)
        finally:
            del self._verifying[blob]
            done.set()
        if result is None:
            self._corrupt.add(blob)
            raise _corrupt_blob(blob)
        self._remember_verified(blob)
        return result

    def _remember_verified(self, blob: ObjectId) -> None:
        self._verified[blob] = None
        self._verified.move_to_end(blob)
        if len(self._verified) > VERIFIED_IDS_KEPT:
            self._verified.popitem(last=False)

    def _open_verified(self, blob: ObjectId) -> int | None:
        """Open a blob and check its hash in 1 MiB preads (blocks); None (fd closed)
        when corrupt."""
        fd = self.store.objects.open_blob(blob)
        try:
            # From this fd: the object may be unlinked (gc) once it is open.
            good = hash_fd(fd) == blob
        except BaseException:
            os.close(fd)
            raise
        if not good:
            os.close(fd)
            return None
        return fd

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._file(fh)
        if handle.content is not None:
            return _part(handle.content, off, size)
        handle.reads += 1
        try:
            if handle.fd is None:  # pushed before, and the kernel dropped this page
                fd = await self._open_blob(handle.blob, handle.size)
                if handle.fd is None:
                    handle.fd = fd
                else:  # a concurrent read opened it first
                    os.close(fd)
            cached = read_if_cached(handle.fd, off, min(size, handle.size - off))
            if cached is not None:
                drop_cached_pages(handle.fd, off, len(cached))
                return cached
            return await trio.to_thread.run_sync(_pread_served, handle.fd, size, off,
                                                 limiter=self.read_limiter)
        finally:
            handle.reads -= 1
            handle.close_if_idle()

    @_fuse_errors
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is not None:
            if handle.content is not None:
                self._open_content -= handle.size
            left = self._inode_handles.pop(handle.inode) - 1
            if left:
                self._inode_handles[handle.inode] = left
            handle.released = True
            handle.close_if_idle()

    def _file(self, fh: int) -> _OpenFile:
        try:
            return self._files[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def shutdown(self) -> None:
        """Stop invalidating (the session is going) and close every open blob (after
        an unmount the kernel sends no release) and every blob opened ahead. Handlers
        must not run after this."""
        self._invalidate = None
        self._store_pages = None
        self._closed = True
        for handle in self._files.values():
            handle.released = True
            handle.close_if_idle()
        self._files.clear()
        self._open_content = 0
        self._inode_handles.clear()
        self._ready.clear()
        self._ready_bytes = 0

    # -- prefetch -----------------------------------------------------------------------
    #
    # A walk enters the subdirectories of what it just listed, and a reader of a
    # directory's files (cp, tar, rsync) opens them in name order: both would wait for
    # one cold load per step. Loading the next ones ahead, several per thread hop,
    # takes the disk wait and the hop off the path of the request.
    #
    # Trees: a directory a request opens or entered cold puts its subdirectories' trees
    # first in a queue; every tree loaded from the queue puts its own at the end, so
    # loading runs breadth-first ahead of a walk, one batch in flight. That continuation
    # stops while the cache is half full (what is loaded ahead must not push out what
    # is in use), and the queue is bounded.
    #
    # Blobs: PREFETCH_THREADS batches in flight; a trigger beyond that is skipped, not
    # queued, so a request never waits behind a long queue. Speculative work is only
    # started from plain code after a request got what it needed.

    def _want_subtrees(self, oid: ObjectId, urgent: bool) -> None:
        """Queue the uncached subdirectory trees of cached tree `oid` to be loaded
        ahead: first in line when `urgent` (a request is in that directory), else last
        and only while the tree cache is less than half full. Never blocks."""
        if self._closed:
            return
        cache = self.vfs.trees
        if not urgent and cache.entries * 2 > cache.max_entries:
            return
        oids = self.vfs.uncached_subtrees(oid, SUBTREES_AHEAD)
        if urgent:
            self._trees_ahead.extendleft(reversed(oids))
        else:
            self._trees_ahead.extend(oids)
        while len(self._trees_ahead) > TREES_QUEUED:
            self._trees_ahead.pop()
        self._load_trees_ahead()

    def _load_trees_ahead(self) -> None:
        """Start loading the next batch of queued trees, unless a batch is in flight or
        a larger blob is being read for its first open. Never blocks."""
        if self._loading_ahead or self._closed or self._large_first_uses:
            return
        batch: list[ObjectId] = []
        while self._trees_ahead and len(batch) < TREES_BATCH:
            oid = self._trees_ahead.popleft()
            if oid not in self.vfs.trees and oid not in self._loading and oid not in batch:
                batch.append(oid)
        if batch:
            self._loading_ahead = True
            self._start_prefetch(self._loading, batch, self._load_trees, batch,
                                 self.tree_ahead_limiter, self._trees_batch_done)

    def _trees_batch_done(self) -> None:
        self._loading_ahead = False
        self._load_trees_ahead()

    def _read_ahead(self, file_inode: int) -> None:
        """After the open of `file_inode` by a sequential reader: start reading and
        verifying the small files after it in a thread, a batch at a time. Never
        blocks."""
        if self._prefetches >= PREFETCH_THREADS or self._closed:
            return
        wanted = self._wanted_ahead(file_inode, self._verifying, self._ready)
        if wanted:
            self._prefetches += 1
            self._start_prefetch(self._verifying, [blob for blob, _ in wanted],
                                 self._read_blobs, wanted, self.prefetch_limiter,
                                 self._blob_batch_done)

    def _warm_ahead(self, file_inode: int) -> None:
        """After the open of `file_inode` by a sequential reader: have the helper
        process read the next small files into the page cache, a batch at a time, so
        their opens find them there. Never blocks."""
        assert self._warm is not None
        wanted = [blob for blob, _ in self._wanted_ahead(file_inode, self._warmed)]
        if not wanted:
            return
        try:
            queued = self._warm([self.store.objects.blob_file(blob) for blob in wanted])
        except OSError as exc:
            log.warning("view: no warmer process (%s); reading ahead in threads from "
                        "now on", exc.strerror)
            self._warm = None
            self._read_ahead(file_inode)
            return
        if queued:
            for blob in wanted:
                self._warmed[blob] = False
            self._warmed[wanted[len(wanted) // 2]] = True
            while len(self._warmed) > WARMED_KEPT:
                self._warmed.popitem(last=False)

    def _wanted_ahead(self, file_inode: int, *taken: Container[ObjectId]
                      ) -> list[tuple[ObjectId, int]]:
        """(blob, size) of the small files after `file_inode` to read ahead, none of
        them verified, corrupt or in `taken`. Empty unless the reader is sequential
        (the file before it was opened too, or there is none: where a reader entering
        the directory starts), and until there is a full batch: one hand-off per file
        would cost more than it saves."""
        previous, following = self.vfs.neighbour_files(file_inode, FILES_AHEAD)
        if previous is not None and previous not in self._verified:
            return []
        wanted = [(blob, size) for blob, size in following if size <= SMALL_BLOB
                  and blob not in self._verified and blob not in self._corrupt
                  and not any(blob in t for t in taken)]
        if len(wanted) < FILES_BATCH and len(following) == FILES_AHEAD:
            return []
        return wanted

    def _blob_batch_done(self) -> None:
        self._prefetches -= 1

    def _start_prefetch(self, pending: dict[ObjectId, trio.Event], oids: list[ObjectId],
                        work: Callable[[Any, Callable[..., None]], None], items: Any,
                        limiter: trio.CapacityLimiter, done: Callable[[], None]) -> None:
        """Mark `oids` as pending in `pending` (requests for them wait there instead of
        loading them again), run `work(items, deliver)` in a thread through `limiter`,
        then call `done()` on the trio thread. No nursery reaches the handlers
        (pyfuse3's is private), so this is a trio system task: it lets no exception out
        and is cancelled, thread awaited, when the run ends."""
        events = {oid: trio.Event() for oid in oids}
        pending.update(events)
        trio.lowlevel.spawn_system_task(self._prefetch, pending, events, work, items,
                                        limiter, done, name="dwsd.fuse.prefetch")

    async def _prefetch(self, pending: dict[ObjectId, trio.Event],
                        events: dict[ObjectId, trio.Event],
                        work: Callable[[Any, Callable[..., None]], None], items: Any,
                        limiter: trio.CapacityLimiter, done: Callable[[], None]) -> None:
        token = trio.lowlevel.current_trio_token()

        def deliver(callback: Callable[..., None], *args: Any) -> None:
            # Each result reaches the trio thread as soon as it is ready (a request
            # may be waiting for it), queued before the thread's return.
            token.run_sync_soon(_call_safely, callback, *args)

        try:
            await trio.to_thread.run_sync(work, items, deliver, limiter=limiter)
        except Exception:
            log.exception("view: prefetch failed")
        finally:
            # Whatever was not delivered: requests load it themselves. Only this batch's
            # events: once a result was delivered, a request may have put its own.
            for oid, event in events.items():
                if pending.get(oid) is event:
                    del pending[oid]
                    event.set()
            _call_safely(done)

    def _load_trees(self, oids: list[ObjectId], deliver: Callable[..., None]) -> None:
        """Load trees for the cache (blocks), read together (see
        ObjectStore.get_trees); errors are left to the requests. The trees go to the
        trio thread together at the end, or at once when a request waits for one of
        them: each hand-over wakes that thread, and one per tree cost a walk more than
        the trees' decoding."""
        self.store.objects.read_trees_ahead()
        try:
            read = self.store.objects.get_trees(oids)
        except StoreError as exc:
            log.debug("view: prefetch of %d trees: %s", len(oids), exc)
            return
        loaded: list[tuple[ObjectId, list[Entry] | None]] = []
        for oid, data in read:
            entries: list[Entry] | None = None
            try:
                if isinstance(data, Exception):
                    raise data
                entries = decode_tree(data, oid)
            except (ObjectMissingError, CorruptObjectError) as exc:
                log.debug("view: prefetch of tree %s: %s", oid, exc)
            loaded.append((oid, entries))
            if oid in self._awaited:
                deliver(self._trees_loaded, loaded)
                loaded = []
        if loaded:
            deliver(self._trees_loaded, loaded)

    def _trees_loaded(self, loaded: list[tuple[ObjectId, list[Entry] | None]]) -> None:
        for oid, entries in loaded:
            event = self._loading.pop(oid, None)
            if event is not None:
                event.set()
            if entries is not None:
                self.vfs.add_tree(oid, entries)
                self._want_subtrees(oid, urgent=False)

    def _read_blobs(self, blobs: list[tuple[ObjectId, int]],
                    deliver: Callable[..., None]) -> None:
        """Read and verify small blobs for opens to come (blocks); errors other than a
        wrong hash are left to the requests."""
        for blob, size in blobs:
            content: bytes | None = None
            try:
                content = self._read_small(blob, size)
                corrupt = content is None
            except Exception as exc:
                log.debug("view: read-ahead of blob %s: %s", blob, exc)
                corrupt = False
            deliver(self._blob_read, blob, content, corrupt)

    def _blob_read(self, blob: ObjectId, content: bytes | None, corrupt: bool) -> None:
        if content is not None and not self._closed:
            self._remember_verified(blob)
            self._ready[blob] = content
            self._ready_bytes += len(content)
            while len(self._ready) > READY_KEPT or self._ready_bytes > READY_BYTES:
                self._ready_bytes -= len(self._ready.popitem(last=False)[1])
        elif corrupt:
            self._corrupt.add(blob)
        event = self._verifying.pop(blob, None)
        if event is not None:
            event.set()

    # -- xattrs and statfs --------------------------------------------------------------

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes,
                       ctx: pyfuse3.RequestContext | None = None) -> bytes:
        return self.vfs.getxattr(inode, name)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                        ) -> Sequence[bytes]:
        return [name for name, _ in self.vfs.xattrs(inode)]

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext | None = None
                     ) -> pyfuse3.StatvfsData:
        """The store's filesystem size, nothing free (the view is read-only)."""
        st = await trio.to_thread.run_sync(os.statvfs, self.store.root,
                                           limiter=self.meta_limiter)
        out = pyfuse3.StatvfsData()
        out.f_bsize = BLOCK_SIZE
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = out.f_bavail = 0
        out.f_files = len(self.vfs)
        out.f_ffree = out.f_favail = 0
        out.f_namemax = 255
        return out

    # -- writes: all refused --------------------------------------------------------------

    async def _read_only(self, *args: object, **kwargs: object) -> NoReturn:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    write = create = setxattr = removexattr = _read_only


def fuse_attributes(inode: int, mode: int, nlink: int, uid: int, gid: int, rdev: int,
                    size: int, mtime_ns: int, timeout: float) -> pyfuse3.EntryAttributes:
    """pyfuse3's attributes of one inode; atime and ctime are shown equal to mtime."""
    out = pyfuse3.EntryAttributes()
    out.st_ino = inode
    out.generation = 0
    out.entry_timeout = timeout
    out.attr_timeout = timeout
    out.st_mode = mode
    out.st_nlink = nlink
    out.st_uid = uid
    out.st_gid = gid
    out.st_rdev = rdev
    out.st_size = size
    out.st_blksize = BLOCK_SIZE
    out.st_blocks = (size + 511) // 512
    out.st_atime_ns = out.st_mtime_ns = out.st_ctime_ns = mtime_ns
    return out


def _part(content: bytes, offset: int, length: int) -> bytes:
    """`length` bytes of `content` from `offset`, without a copy (pyfuse3 takes any
    buffer; a memoryview is typed as bytes)."""
    if offset == 0 and length >= len(content):
        return content
    return cast(bytes, memoryview(content)[offset:offset + length])


def read_if_cached(fd: int, offset: int, length: int) -> bytes | None:
    """Read `length` bytes at `offset` if the page cache holds them all, else None.
    Never blocks on I/O (RWF_NOWAIT), so the trio thread may call it: a read of cached
    content skips the worker-thread round trip, which costs more than the read."""
    if length <= 0:
        return b""
    buf = bytearray(length)
    try:
        got = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL):
            return None  # not cached (or RWF_NOWAIT unsupported here): use a thread
        raise
    # The bytearray itself: pyfuse3 copies from any buffer, and a bytes copy of 128 KiB
    # costs more than the read (typed as bytes, like pyfuse3's Operations.read).
    return cast(bytes, buf) if got == length else None


def drop_cached_pages(fd: int, offset: int = 0, length: int = 0) -> None:
    """Drop the page cache of `fd`'s range (length 0: to the end) once the view has
    served it: its bytes are then cached once, in the view's own pages, not also in
    the blob file's (see the module docstring). Only clean pages go, and the store's
    are clean once a snapshot names them (made durable first), so this never waits
    for writeback. Advice only: a failure changes nothing."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def _pread_served(fd: int, size: int, offset: int) -> bytes:
    """pread for a READ reply (blocks), then drop what it read from the blob's cache."""
    data = os.pread(fd, size, offset)
    drop_cached_pages(fd, offset, len(data))
    return data


def _corrupt_blob(blob: ObjectId) -> CorruptObjectError:
    return CorruptObjectError(f"blob {blob} is corrupt (content hash differs)")


def _call_safely(callback: Callable[..., None], *args: Any) -> None:
    """Run a prefetch result's callback on the trio thread: an exception escaping a
    `run_sync_soon` callback would end the run, and with it the daemon."""
    try:
        callback(*args)
    except Exception:
        log.exception("view: prefetch result %s failed", callback.__name__)

