"""Plan and apply a restore of one resource tree onto a directory.

The plan is the diff from the live tree (captured just before) to the snapshot's tree, so
only what differs is touched. Applying never follows a symlink: every path is reached
component by component with `O_NOFOLLOW` directory fds, files are written to a temp name
in their directory (named with RESTORE_TEMP_PREFIX) and renamed over the old entry, and
metadata is set through the new file's fd (the primitives are in restore_fs.py).
Regular files are written by a small thread pool while the calling thread walks the plan
in order, making directories before anything goes in them; directory mtimes are reset
bottom-up at the end, once every file is in place, since creating entries in a directory
moves them. Blob content is verified while it is copied; a corrupt blob skips that one
file and is reported. Nothing is fsynced here: the caller makes everything durable at
once through a SyncSweep.

Restoring is idempotent: applying the plan again after an interruption converges on the
same state, which is what makes the journal (see workspace.py) sufficient. A temp file
an interruption left behind shows up in the live tree and every plan removes it, even
outside the paths asked for.
Everything here blocks.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal

from dwsd.errors import CorruptObjectError, ObjectMissingError, RestoreError
from dwsd.snapshot import restore_fs
from dwsd.snapshot.diff import Change, diff_trees, load_entries
from dwsd.snapshot.restore_fs import IS_ROOT, RESTORE_TEMP_PREFIX, ROOT_DIR_FLAGS, \
    SyncSweep, is_restore_temp, restore_temp_name
from dwsd.store.ids import ObjectId
from dwsd.store.objects import READ_CHUNK, ObjectStore
from dwsd.store.catalog import RootMeta
from dwsd.store.tree import DIR, FILE, Entry

__all__ = ["RESTORE_TEMP_PREFIX", "Action", "ApplyResult", "Plan", "Progress", "ProgressFn",
           "SyncSweep", "apply_plan", "is_restore_temp", "plan_restore", "restore_temp_name",
           "set_root_metadata"]

Op = Literal["create", "meta", "remove"]
# Files written at once. Restoring waits mostly on the disk (cold blob reads, their
# lookups in the store's directories) and on page-cache copies, which release the GIL:
# a few writers keep several requests in flight, as restic does. More than a handful
# only adds contention on a small machine.
_WRITERS = 4
# Files handed to the writers ahead of the oldest unreported one: bounds the directory
# fds held open and how far progress lags behind the disk.
_QUEUED = 4 * _WRITERS


@dataclass(frozen=True)
class Action:
    op: Op
    path: bytes
    entry: Entry | None  # the snapshot's entry (None for removals)


@dataclass
class Progress:
    files_done: int = 0
    files_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    path: bytes = b""


ProgressFn = Callable[[Progress], None]


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    dirs: dict[bytes, Entry] = field(default_factory=dict)  # dirs whose metadata to reset

    @property
    def files(self) -> int:
        return sum(1 for a in self.actions if a.op == "create" and a.entry is not None
                   and a.entry.kind == FILE)

    @property
    def bytes(self) -> int:
        return sum(a.entry.size for a in self.actions if a.op == "create"
                   and a.entry is not None and a.entry.kind == FILE)

    @property
    def removals(self) -> int:
        return sum(1 for a in self.actions if a.op == "remove")


def plan_restore(objects: ObjectStore, live: ObjectId | None, wanted: ObjectId,
                 paths: Iterable[bytes] | None = None) -> Plan:
    """What to do to turn tree `live` into tree `wanted` (blocks: reads trees).

    `paths` limits it to those files or directories (relative to the resource root);
    a non-directory standing on the way to one of them (a symlink, a file) is still
    replaced by the snapshot's directory, or the path could not be restored. Restore
    temp files a crash left anywhere in `live` are removed whatever the limits.
    Into an empty directory (`live` None) with limits, only the trees on the way to and
    below the limits are read.
    """
    planner = _Planner(objects, wanted, paths)
    if live is None and planner.limits is not None:
        changes = _limited_additions(planner.trees, planner.limits)
    else:
        # In place, the whole diff: a temp file may be anywhere, and a diff costs what
        # differs between the live files and the snapshot, not the tree's size.
        changes = diff_trees(objects, live, wanted)
    for change in changes:
        planner.add(change)
    planner.add_link_partners()
    return planner.plan


def has_path(objects: ObjectStore, root: ObjectId, path: bytes) -> bool:
    """Whether tree `root` holds relative `path` (the root itself for an empty one;
    blocks: reads the trees on the way)."""
    path = path.strip(b"/")
    return not path or _Trees(objects, root).lookup(path) is not None


def _limited_additions(trees: "_Trees", limits: list[bytes]) -> Iterator[Change]:
    """What writing the snapshot's `limits` into an empty directory adds, in path order:
    the directories on the way to each limit, then everything below it."""
    seen: set[bytes] = set()
    for top in _outermost(limits):
        for path, entry in trees.dirs_above(top):
            if path not in seen:
                seen.add(path)
                yield Change(path, "added", None, entry)
        found = trees.lookup(top) if top else None
        if top and found is None:
            continue  # not in the snapshot: nothing to restore there
        if found is not None:
            yield Change(top, "added", None, found)
        if found is None or found.kind == DIR:
            tree = found.ref if found is not None else trees.root
            yield from diff_trees(trees.objects, None, tree, top)


def _outermost(limits: list[bytes]) -> list[bytes]:
    """The limits in path order, without those inside another."""
    kept: list[bytes] = []
    for lim in sorted(set(limits), key=lambda p: p.split(b"/")):
        if not any(_under(lim, k) for k in kept):
            kept.append(lim)
    return kept


def _under(path: bytes, top: bytes) -> bool:
    return not top or path == top or path.startswith(top + b"/")


class _Trees:
    """The snapshot's trees, each read and verified once per plan."""

    def __init__(self, objects: ObjectStore, root: ObjectId) -> None:
        self.objects = objects
        self.root = root
        self._loaded: dict[ObjectId, dict[bytes, Entry]] = {}

    def entries(self, tree: ObjectId | None) -> dict[bytes, Entry]:
        if tree is None:
            return {}
        if tree not in self._loaded:
            self._loaded[tree] = {e.name: e for e in load_entries(self.objects, tree)}
        return self._loaded[tree]

    def dirs_above(self, path: bytes) -> list[tuple[bytes, Entry]]:
        """(path, entry) of each directory above `path` in the snapshot, top first;
        stops where the snapshot has no directory."""
        parts = path.split(b"/")[:-1]
        found: list[tuple[bytes, Entry]] = []
        tree: ObjectId | None = self.root
        for i, part in enumerate(parts):
            entry = self.entries(tree).get(part)
            if entry is None or entry.kind != DIR:
                break
            found.append((b"/".join(parts[:i + 1]), entry))
            tree = entry.ref
        return found

    def lookup(self, path: bytes) -> Entry | None:
        """The snapshot's entry at `path` (not the root), or None."""
        above = self.dirs_above(path)
        if len(above) != path.count(b"/"):
            return None
        parent = above[-1][1].ref if above else self.root
        return self.entries(parent).get(path.rpartition(b"/")[2])

    def walk(self, tree: ObjectId | None, prefix: bytes) -> Iterator[tuple[bytes, Entry]]:
        """Every (path, entry) below `tree`, whose path is `prefix`. What it reads is
        not kept: a whole snapshot's trees would not fit in memory."""
        found = self._loaded.get(tree) if tree is not None else None
        listing = found.values() if found is not None else load_entries(self.objects, tree)
        for e in listing:
            path = prefix + b"/" + e.name if prefix else e.name
            yield path, e
            if e.kind == DIR:
                yield from self.walk(e.ref, path)


class _Planner:
    """Turns the changes from the live tree to the snapshot into a Plan."""

    def __init__(self, objects: ObjectStore, wanted: ObjectId,
                 paths: Iterable[bytes] | None) -> None:
        self.plan = Plan()
        self.trees = _Trees(objects, wanted)
        self.limits = None if paths is None else [p.strip(b"/") for p in paths]
        self.removed_dir: bytes | None = None  # the diff lists what it held right after
        # Directories the snapshot has on the way to a limited path: whatever stands
        # there in the live tree must become that directory.
        self.ways = {p for lim in self.limits or () for p, _ in self.trees.dirs_above(lim)}

    def add(self, change: Change) -> None:
        if self.removed_dir is not None and change.path.startswith(self.removed_dir + b"/"):
            return  # removed with its directory
        if change.status == "removed" and is_restore_temp(change.path):
            self.plan.actions.append(Action("remove", change.path, None))
            return
        if not self._wanted(change):
            return
        if change.status == "removed":
            self.plan.actions.append(Action("remove", change.path, None))
            if change.old is not None and change.old.kind == DIR:
                self.removed_dir = change.path
        elif change.status == "metadata" and change.new is not None \
                and change.new.kind == DIR:
            self.plan.dirs[change.path] = change.new
        else:
            self.plan.actions.append(Action(
                "meta" if change.status == "metadata" else "create", change.path,
                change.new))
            if change.new is not None and change.new.kind == DIR:
                self.plan.dirs[change.path] = change.new
        self._note_parents(change.path)

    def _wanted(self, change: Change) -> bool:
        """Inside the limits, or clearing the way to them."""
        if self.limits is None or any(_under(change.path, lim) for lim in self.limits):
            return True
        if change.path not in self.ways:
            return False
        if change.status == "removed":
            return change.old is not None and change.old.kind != DIR
        return change.status == "added"

    def _note_parents(self, path: bytes) -> None:
        """Every directory on `path` gets its snapshot metadata back at the end."""
        head = path.rpartition(b"/")[0]
        if not head or head in self.plan.dirs:
            return  # its ancestors were noted with it
        for rel, entry in self.trees.dirs_above(path):
            self.plan.dirs.setdefault(rel, entry)

    def add_link_partners(self) -> None:
        """A rewritten hard-linked file must take its partners along, or the link
        breaks; a partner only needing metadata is rewritten too, as a link."""
        actions = self.plan.actions
        written = {a.path for a in actions if a.op == "create"}
        groups = {a.entry.ino for a in actions if a.op == "create" and a.entry is not None
                  and a.entry.kind == FILE and a.entry.ino}
        if not groups:
            return
        partners: dict[bytes, Entry] = {}
        for path, entry in self._files_in_limits():
            if entry.ino in groups and path not in written:
                partners[path] = entry
        self.plan.actions = [a for a in actions
                             if not (a.op == "meta" and a.path in partners)]
        self.plan.actions += [Action("create", p, e) for p, e in partners.items()]
        self.plan.actions.sort(key=lambda a: a.path.split(b"/"))

    def _files_in_limits(self) -> Iterator[tuple[bytes, Entry]]:
        """The snapshot's hard-linked files inside the limits (the whole tree: none)."""
        for top in self.limits if self.limits is not None else [b""]:
            entry = self.trees.lookup(top) if top else None
            if top and entry is None:
                continue
            if entry is not None and entry.kind != DIR:
                found: Iterable[tuple[bytes, Entry]] = [(top, entry)]
            else:
                found = self.trees.walk(entry.ref if entry else self.trees.root, top)
            yield from ((p, e) for p, e in found if e.kind == FILE and e.ino)


@dataclass
class ApplyResult:
    files_written: int = 0
    removed: int = 0
    errors: list[tuple[bytes, str]] = field(default_factory=list)


class _DirRef:
    """A directory fd shared by the applying thread and the writes queued in it; closed
    when the last holder lets go. Counted on the applying thread only."""

    def __init__(self, head: bytes, fd: int) -> None:
        self.head = head
        self.fd = fd
        self.holders = 1

    def hold(self) -> "_DirRef":
        self.holders += 1
        return self

    def release(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            os.close(self.fd)


@dataclass
class _Queued:
    """A file being written by the pool, reported when it is reaped."""
    path: bytes
    entry: Entry
    parent: _DirRef
    future: Future[None]


class _Applier:
    """Applies a plan's actions in order on the calling thread, except regular files,
    which a small pool writes (up to _QUEUED ahead) and which are reaped, and reported,
    in plan order. What one action relies on is done before it: its directory exists
    (made on this thread), the first member of its hard-link group is in place."""

    def __init__(self, objects: ObjectStore, root_fd: int, progress: ProgressFn | None,
                 status: Progress, result: ApplyResult,
                 before_each: Callable[[], None] | None, sweep: SyncSweep | None,
                 pool: ThreadPoolExecutor) -> None:
        self.objects = objects
        self.root_fd = root_fd
        self.progress = progress
        self.status = status
        self.result = result
        self.before_each = before_each
        self.sweep = sweep
        self.pool = pool
        self.links: dict[int, bytes] = {}  # hard-link group -> path of its first member
        self.queue: deque[_Queued] = deque()
        self._parent: _DirRef | None = None
        self._buffers = threading.local()

    def apply(self, action: Action) -> None:
        if self.before_each is not None:
            self.before_each()
        parent = self.parent(action.path)
        name = action.path.rpartition(b"/")[2]
        entry = action.entry
        if action.op == "remove":
            restore_fs.remove(parent.fd, name)
            self.result.removed += 1
        elif entry is None:
            raise AssertionError(f"{action.op} without an entry")
        elif action.op == "meta":
            restore_fs.set_metadata_at(parent.fd, name, entry)
        elif entry.kind == DIR:
            restore_fs.replace_with_dir(parent.fd, name)
        elif entry.kind == FILE and self._first_of_group(entry) is not None:
            self._link(parent, action.path, entry)
        elif entry.kind == FILE:
            self._queue(action.path, entry, parent)
        else:
            _make_special(parent.fd, name, entry)

    def parent(self, path: bytes) -> _DirRef:
        """The parent directory of `path`, reached without symlinks (kept while the next
        actions are in the same directory, as they are in plan order)."""
        head = path.rpartition(b"/")[0]
        if self._parent is not None and self._parent.head == head:
            return self._parent
        self.release_parent()
        fd = restore_fs.open_dir_path(self.root_fd, head)
        self._parent = _DirRef(head, fd)
        if self.sweep is not None and head:
            self.sweep.add(fd)  # another filesystem may be mounted below the root
        return self._parent

    def release_parent(self) -> None:
        if self._parent is not None:
            self._parent.release()
            self._parent = None

    def _queue(self, path: bytes, entry: Entry, parent: _DirRef) -> None:
        """Hand regular file `entry` to the pool; reap the oldest when too many wait."""
        if entry.ino:
            self.links[entry.ino] = path  # later members wait for it, then link to it
        future = self.pool.submit(self._write, parent.fd, path.rpartition(b"/")[2], entry)
        self.queue.append(_Queued(path, entry, parent.hold(), future))
        if len(self.queue) > _QUEUED:
            self.reap_one()

    def _write(self, pfd: int, name: bytes, entry: Entry) -> None:
        """On a pool thread: write one file, with that thread's buffer."""
        buf: memoryview | None = getattr(self._buffers, "buf", None)
        if buf is None:
            buf = self._buffers.buf = memoryview(bytearray(READ_CHUNK))
        restore_fs.write_file(self.objects, pfd, name, entry, buf)

    def reap_one(self) -> None:
        """Wait for the oldest queued file and report it. A file whose blob is corrupt or
        missing becomes an error of the result; any other failure is raised."""
        queued = self.queue.popleft()
        try:
            queued.future.result()
        except (CorruptObjectError, ObjectMissingError) as exc:
            self.result.errors.append((queued.path, str(exc)))
            if queued.entry.ino and self.links.get(queued.entry.ino) == queued.path:
                del self.links[queued.entry.ino]  # the next member writes its own copy
            return
        finally:
            queued.parent.release()
        self._file_done(queued.path, queued.entry)

    def reap_all(self) -> None:
        while self.queue:
            self.reap_one()

    def _first_of_group(self, entry: Entry) -> bytes | None:
        """The path of the hard-link group member already written (waited for if still
        queued), or None when `entry` is the first or alone."""
        if not entry.ino or entry.ino not in self.links:
            return None
        first = self.links[entry.ino]
        while any(q.path == first for q in self.queue):
            self.reap_one()
        return self.links.get(entry.ino)

    def _link(self, parent: _DirRef, path: bytes, entry: Entry) -> None:
        """Another name for the group's first member, made as a temp link and renamed;
        reported after the files queued before it."""
        first_head, _, first_name = self.links[entry.ino].rpartition(b"/")
        first_fd = restore_fs.open_dir_path(self.root_fd, first_head)
        tmp = restore_temp_name()
        try:
            os.link(first_name, tmp, src_dir_fd=first_fd, dst_dir_fd=parent.fd,
                    follow_symlinks=False)
            restore_fs.rename_into_place(parent.fd, tmp, path.rpartition(b"/")[2])
        except BaseException:
            restore_fs.unlink_quietly(parent.fd, tmp)
            raise
        finally:
            os.close(first_fd)
        done: Future[None] = Future()
        done.set_result(None)
        self.queue.append(_Queued(path, entry, parent.hold(), done))

    def _file_done(self, path: bytes, entry: Entry) -> None:
        """Count a regular file now in place and report progress (on this thread)."""
        self.result.files_written += 1
        self.status.files_done += 1
        self.status.bytes_done += entry.size
        self.status.path = path
        if self.progress is not None:
            self.progress(self.status)

    def reset_dir(self, path: bytes, entry: Entry) -> None:
        parent = self.parent(path)
        restore_fs.set_metadata_at(parent.fd, path.rpartition(b"/")[2], entry)


def apply_plan(objects: ObjectStore, root: bytes, plan: Plan,
               progress: ProgressFn | None = None, status: Progress | None = None,
               before_each: Callable[[], None] | None = None,
               sweep: SyncSweep | None = None) -> ApplyResult:
    """Carry out `plan` under directory `root` (created when missing); blocks until every
    file is in place. Regular files are written by a pool of _WRITERS threads, the rest
    on the calling thread. `status` is updated and passed to `progress` after each file,
    always on the calling thread, in plan order; `before_each` runs on the calling thread
    before each action (crash points hook in there); the filesystems written to are added
    to `sweep`, whose `sync` the caller runs when it needs them durable. A corrupt or
    missing blob skips that file (listed in the result's errors); any other error is
    raised once the files already handed to the pool are finished."""
    try:
        os.makedirs(root, exist_ok=True)
        root_fd = os.open(root, ROOT_DIR_FLAGS)
    except OSError as exc:  # a dangling symlink, an unwritable or odd target
        raise RestoreError(f"cannot make or open the directory to restore into, "
                           f"{os.fsdecode(root)}: {exc.strerror}") from exc
    result = ApplyResult()
    if status is None:
        status = Progress(files_total=plan.files, bytes_total=plan.bytes)
    pool = ThreadPoolExecutor(_WRITERS, thread_name_prefix="dwsd-restore")
    applier = _Applier(objects, root_fd, progress, status, result, before_each, sweep, pool)
    try:
        if sweep is not None:
            sweep.add(root_fd)
        for action in plan.actions:
            applier.apply(action)
        applier.reap_all()
        for path in sorted(plan.dirs, key=lambda p: -p.count(b"/")):
            applier.reset_dir(path, plan.dirs[path])
    finally:
        # Queued writes use their directory fds: they finish before any fd is closed.
        pool.shutdown(wait=True, cancel_futures=True)
        for queued in applier.queue:
            queued.parent.release()
        applier.release_parent()
        os.close(root_fd)
    return result


def _make_special(pfd: int, name: bytes, entry: Entry) -> None:
    """A symlink, FIFO, socket or device made under a temp name, then renamed."""
    tmp = restore_temp_name()
    try:
        restore_fs.make_special(pfd, tmp, entry)
        restore_fs.rename_into_place(pfd, tmp, name)
    except BaseException:
        restore_fs.unlink_quietly(pfd, tmp)
        raise


def set_root_metadata(root: bytes, meta: RootMeta) -> None:
    """Give a resource's top directory back its mode, owner and mtime."""
    mode, uid, gid, mtime_ns = meta
    fd = os.open(root, ROOT_DIR_FLAGS)
    try:
        if IS_ROOT:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    finally:
        os.close(fd)
