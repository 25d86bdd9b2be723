"""Plan and apply a restore of one resource tree onto a directory.

The plan is the diff from the live tree (captured just before) to the snapshot's tree, so
only what differs is touched. Applying never follows a symlink: every path is reached
component by component with `O_NOFOLLOW` directory fds, files are written to a temp name
in their directory (named with RESTORE_TEMP_PREFIX) and renamed over the old entry, and
metadata is set through the new file's fd. Directory mtimes are reset bottom-up at the
end, since creating entries in a directory moves them. Blob content is verified while it
is copied; a corrupt blob skips that one file and is reported. Nothing is fsynced here:
the caller makes everything durable at once through a SyncSweep.

Restoring is idempotent: applying the plan again after an interruption converges on the
same state, which is what makes the journal (see workspace.py) sufficient. A temp file
an interruption left behind shows up in the live tree and every plan removes it, even
outside the paths asked for.
Everything here blocks.
"""
from __future__ import annotations

import errno
import itertools
import os
import secrets
import stat as stat_mod
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal

from dwsd.crashpoints import crash_point
from dwsd.errors import CorruptObjectError, ObjectMissingError, RestoreError
from dwsd.snapshot.diff import Change, diff_trees, load_entries
from dwsd.store.fsutil import syncfs
from dwsd.store.ids import Hasher, ObjectId
from dwsd.store.objects import READ_CHUNK, ObjectStore
from dwsd.store.catalog import RootMeta
from dwsd.store.tree import BLOCK, CHAR, DIR, FIFO, FILE, SOCKET, SYMLINK, Entry

Op = Literal["create", "meta", "remove"]
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
IS_ROOT = os.geteuid() == 0
# Restore's temp files get their own prefix, unlike the store's: one a crash leaves in a
# resource is recognised and removed by the next restore (and never taken for data).
RESTORE_TEMP_PREFIX = b".dwsd-restore-"
_temp_tag = secrets.token_hex(4).encode()  # a reused pid cannot reuse a leftover's name
_temp_counter = itertools.count()


def restore_temp_name() -> bytes:
    """A fresh name for a restore temp file (unique in this process and across runs)."""
    return b"%s%s-%d" % (RESTORE_TEMP_PREFIX, _temp_tag, next(_temp_counter))


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
    """
    planner = _Planner(objects, wanted, paths)
    for change in diff_trees(objects, live, wanted):
        planner.add(change)
    planner.add_link_partners()
    return planner.plan


def _under(path: bytes, top: bytes) -> bool:
    return not top or path == top or path.startswith(top + b"/")


def is_restore_temp(name: bytes) -> bool:
    """True for a name restore gives its temp files (the last component of a path)."""
    return name.rpartition(b"/")[2].startswith(RESTORE_TEMP_PREFIX)


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


class SyncSweep:
    """The filesystems a restore wrote to, made durable together at the end: restored
    files are not fsynced one by one (as in the store, durability is batched)."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}  # st_dev -> an fd on that filesystem

    def add(self, fd: int) -> None:
        """Remember the filesystem of directory `fd` (an fstat; a dup the first time)."""
        dev = os.fstat(fd).st_dev
        if dev not in self._fds:
            self._fds[dev] = os.dup(fd)

    def sync(self) -> None:
        """syncfs each filesystem added (blocks). syncfs writes back every dirty inode,
        directories included, so the renames and unlinks are durable too; ext4 and xfs
        commit their journal with it."""
        for fd in self._fds.values():
            syncfs(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "SyncSweep":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Applier:
    def __init__(self, objects: ObjectStore, root_fd: int, progress: ProgressFn | None,
                 status: Progress, result: ApplyResult,
                 before_each: Callable[[], None] | None, sweep: SyncSweep | None) -> None:
        self.objects = objects
        self.root_fd = root_fd
        self.progress = progress
        self.status = status
        self.result = result
        self.before_each = before_each
        self.sweep = sweep
        self.links: dict[int, bytes] = {}
        self._parent: tuple[bytes, int] | None = None

    def close(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def parent(self, path: bytes) -> tuple[int, bytes]:
        """(fd of the parent directory, last name) of `path`, reached without symlinks."""
        head, _, name = path.rpartition(b"/")
        if self._parent is not None and self._parent[0] == head:
            return self._parent[1], name
        self.close()
        fd = _open_dir_path(self.root_fd, head)
        self._parent = (head, fd)
        if self.sweep is not None and head:
            self.sweep.add(fd)  # another filesystem may be mounted below the root
        return fd, name

    def apply(self, action: Action) -> None:
        if self.before_each is not None:
            self.before_each()
        pfd, name = self.parent(action.path)
        if action.op == "remove":
            _remove(pfd, name)
            self.result.removed += 1
            return
        entry = action.entry
        assert entry is not None
        if action.op == "meta":
            _set_metadata_at(pfd, name, entry)
            return
        if entry.kind == DIR:
            _replace_with_dir(pfd, name)
            return
        try:
            self._create(pfd, name, action.path, entry)
        except (CorruptObjectError, ObjectMissingError) as exc:
            self.result.errors.append((action.path, str(exc)))

    def _create(self, pfd: int, name: bytes, path: bytes, entry: Entry) -> None:
        tmp = restore_temp_name()
        try:
            if entry.kind == FILE and entry.ino and entry.ino in self.links:
                first_head, _, first_name = self.links[entry.ino].rpartition(b"/")
                first_fd = _open_dir_path(self.root_fd, first_head)
                try:
                    os.link(first_name, tmp, src_dir_fd=first_fd, dst_dir_fd=pfd,
                            follow_symlinks=False)
                finally:
                    os.close(first_fd)
            elif entry.kind == FILE:
                self._write_file(pfd, tmp, entry)
            else:
                _make_special(pfd, tmp, entry)
            crash_point("restore-temp-written")
            _clear_dir(pfd, name)
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except BaseException:
            _unlink_quietly(pfd, tmp)
            raise
        if entry.kind == FILE:
            if entry.ino:
                self.links.setdefault(entry.ino, path)
            self.result.files_written += 1
            self.status.files_done += 1
            self.status.bytes_done += entry.size
            self.status.path = path
            if self.progress is not None:
                self.progress(self.status)

    def _write_file(self, pfd: int, tmp: bytes, entry: Entry) -> None:
        assert entry.ref is not None
        src = self.objects.open_blob(entry.ref)
        try:
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                          os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                _copy_verified(src, out, entry.ref)
                _set_metadata_fd(out, entry)
            finally:
                os.close(out)
        finally:
            os.close(src)

    def reset_dir(self, path: bytes, entry: Entry) -> None:
        pfd, name = self.parent(path)
        _set_metadata_at(pfd, name, entry)


def apply_plan(objects: ObjectStore, root: bytes, plan: Plan,
               progress: ProgressFn | None = None, status: Progress | None = None,
               before_each: Callable[[], None] | None = None,
               sweep: SyncSweep | None = None) -> ApplyResult:
    """Carry out `plan` under directory `root` (created when missing). `status` is
    updated and passed to `progress` after each file; `before_each` runs before each
    action (crash points hook in there); the filesystems written to are added to
    `sweep`, whose `sync` the caller runs when it needs them durable."""
    os.makedirs(root, exist_ok=True)
    root_fd = os.open(root, _DIR_FLAGS)
    result = ApplyResult()
    if status is None:
        status = Progress(files_total=plan.files, bytes_total=plan.bytes)
    applier = _Applier(objects, root_fd, progress, status, result, before_each, sweep)
    try:
        if sweep is not None:
            sweep.add(root_fd)
        for action in plan.actions:
            applier.apply(action)
        for path in sorted(plan.dirs, key=lambda p: -p.count(b"/")):
            applier.reset_dir(path, plan.dirs[path])
    finally:
        applier.close()
        os.close(root_fd)
    return result


def set_root_metadata(root: bytes, meta: RootMeta) -> None:
    """Give a resource's top directory back its mode, owner and mtime."""
    mode, uid, gid, mtime_ns = meta
    fd = os.open(root, _DIR_FLAGS)
    try:
        if IS_ROOT:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    finally:
        os.close(fd)


def _open_dir_path(root_fd: int, head: bytes) -> int:
    """A new fd for directory `head` below `root_fd`, never following a symlink."""
    fd = os.dup(root_fd)
    try:
        for part in head.split(b"/") if head else []:
            nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _copy_verified(src: int, out: int, oid: ObjectId) -> None:
    hasher = Hasher()
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    while n := os.readv(src, [view]):
        hasher.update(view[:n])
        chunk = view[:n]
        while chunk:
            chunk = chunk[os.write(out, chunk):]
    if hasher.object_id() != oid:
        raise CorruptObjectError(f"blob {oid} is corrupt (content hash differs)")


def _set_metadata_fd(fd: int, entry: Entry) -> None:
    """Owner, mode, xattrs and mtime of an open regular file (chown first: it clears
    set-uid bits)."""
    _set_xattrs(fd, entry)
    if IS_ROOT:
        os.fchown(fd, entry.uid, entry.gid)
    os.fchmod(fd, entry.mode)
    os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))


def _set_metadata_at(pfd: int, name: bytes, entry: Entry) -> None:
    """Metadata of an existing entry, through an O_PATH fd so nothing is followed and
    even a mode-000 file works."""
    if entry.kind == SYMLINK:
        if IS_ROOT:
            os.chown(name, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=pfd,
                 follow_symlinks=False)
        return
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    try:
        proc = f"/proc/self/fd/{fd}"
        if entry.kind in (FILE, DIR):
            _set_xattrs(proc, entry)
        if IS_ROOT:
            os.chown(proc, entry.uid, entry.gid)
        os.chmod(proc, entry.mode)
        os.utime(proc, ns=(entry.mtime_ns, entry.mtime_ns))
    finally:
        os.close(fd)


def _set_xattrs(target: int | str, entry: Entry) -> None:
    wanted = {os.fsdecode(k): v for k, v in entry.xattrs}
    try:
        present = [n for n in os.listxattr(target) if n.startswith("user.")]
    except OSError as exc:
        if exc.errno == errno.ENOTSUP and not wanted:
            return
        raise
    for stale in set(present) - set(wanted):
        os.removexattr(target, stale)
    for key, value in wanted.items():
        os.setxattr(target, key, value)


def _make_special(pfd: int, tmp: bytes, entry: Entry) -> None:
    if entry.kind == SYMLINK:
        os.symlink(entry.target, tmp, dir_fd=pfd)
        if IS_ROOT:
            os.chown(tmp, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=pfd, follow_symlinks=False)
        return
    kind_bits = {FIFO: stat_mod.S_IFIFO, SOCKET: stat_mod.S_IFSOCK, CHAR: stat_mod.S_IFCHR,
                 BLOCK: stat_mod.S_IFBLK}[entry.kind]
    try:
        os.mknod(tmp, kind_bits | 0o600, entry.rdev, dir_fd=pfd)
    except PermissionError as exc:
        raise RestoreError(f"cannot create device {tmp!r}: {exc.strerror}") from exc
    _set_metadata_at(pfd, tmp, entry)


def _replace_with_dir(pfd: int, name: bytes) -> None:
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if stat_mod.S_ISDIR(st.st_mode):
            return
        os.unlink(name, dir_fd=pfd)
    except FileNotFoundError:
        pass
    os.mkdir(name, 0o700, dir_fd=pfd)


def _clear_dir(pfd: int, name: bytes) -> None:
    """rename() cannot replace a directory with a file: remove one standing in the way."""
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat_mod.S_ISDIR(st.st_mode):
        _remove(pfd, name)


def _remove(pfd: int, name: bytes) -> None:
    """Remove a file, symlink or whole directory tree, never following symlinks."""
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat_mod.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=pfd)
        return
    fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
    try:
        for child in os.listdir(fd):
            _remove(fd, os.fsencode(child))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=pfd)


def _unlink_quietly(pfd: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=pfd)
    except FileNotFoundError:
        pass
