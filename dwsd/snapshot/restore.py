"""Plan and apply a restore of one resource tree onto a directory.

The plan is the diff from the live tree (captured just before) to the snapshot's tree, so
only what differs is touched. Applying never follows a symlink: every path is reached
component by component with `O_NOFOLLOW` directory fds, files are written to a temp name
in their directory and renamed over the old entry, and metadata is set through the new
file's fd. Directory mtimes are reset bottom-up at the end, since creating entries in a
directory moves them. Blob content is verified while it is copied; a corrupt blob skips
that one file and is reported.

Restoring is idempotent: applying the plan again after an interruption converges on the
same state, which is what makes the journal (see workspace.py) sufficient.
Everything here blocks.
"""
from __future__ import annotations

import errno
import os
import stat as stat_mod
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

from dwsd.errors import CorruptObjectError, ObjectMissingError, RestoreError
from dwsd.snapshot.diff import diff_trees, load_entries
from dwsd.store.fsutil import temp_name
from dwsd.store.ids import Hasher, ObjectId
from dwsd.store.objects import READ_CHUNK, ObjectStore
from dwsd.store.catalog import RootMeta
from dwsd.store.tree import BLOCK, CHAR, DIR, FIFO, FILE, SOCKET, SYMLINK, Entry

Op = Literal["create", "meta", "remove"]
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
IS_ROOT = os.geteuid() == 0


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
    """What to do to turn tree `live` into tree `wanted`; `paths` limits it to those
    files or directories (relative to the resource root)."""
    plan = Plan()
    limits = None if paths is None else [p.strip(b"/") for p in paths]
    removed_dirs: list[bytes] = []
    for change in diff_trees(objects, live, wanted):
        if limits is not None and not any(_under(change.path, lim) for lim in limits):
            continue
        if any(change.path.startswith(d + b"/") for d in removed_dirs):
            continue  # removed with its directory
        if change.status == "removed":
            plan.actions.append(Action("remove", change.path, None))
            if change.old is not None and change.old.kind == DIR:
                removed_dirs.append(change.path)
        elif change.status == "metadata" and change.new is not None \
                and change.new.kind == DIR:
            plan.dirs[change.path] = change.new
        else:
            plan.actions.append(Action("meta" if change.status == "metadata" else "create",
                                       change.path, change.new))
            if change.new is not None and change.new.kind == DIR:
                plan.dirs[change.path] = change.new
        _note_parents(objects, wanted, change.path, plan)
    _add_link_partners(objects, wanted, plan, limits)
    return plan


def _under(path: bytes, top: bytes) -> bool:
    return not top or path == top or path.startswith(top + b"/")


def _note_parents(objects: ObjectStore, wanted: ObjectId, path: bytes, plan: Plan) -> None:
    """Every directory on `path` gets its snapshot metadata back at the end."""
    parts = path.split(b"/")[:-1]
    tree: ObjectId | None = wanted
    for i, part in enumerate(parts):
        rel = b"/".join(parts[:i + 1])
        entry = next((e for e in load_entries(objects, tree) if e.name == part), None)
        if entry is None or entry.kind != DIR:
            return
        plan.dirs.setdefault(rel, entry)
        tree = entry.ref


def _add_link_partners(objects: ObjectStore, wanted: ObjectId, plan: Plan,
                       limits: list[bytes] | None) -> None:
    """A rewritten hard-linked file must take its partners along, or the link breaks."""
    groups = {a.entry.ino for a in plan.actions
              if a.entry is not None and a.entry.kind == FILE and a.entry.ino}
    if not groups:
        return
    planned = {a.path for a in plan.actions}
    for path, entry in _walk(objects, wanted, b""):
        if entry.kind == FILE and entry.ino in groups and path not in planned:
            if limits is None or any(_under(path, lim) for lim in limits):
                plan.actions.append(Action("create", path, entry))
    plan.actions.sort(key=lambda a: a.path.split(b"/"))


def _walk(objects: ObjectStore, tree: ObjectId | None, prefix: bytes
          ) -> Iterable[tuple[bytes, Entry]]:
    for e in load_entries(objects, tree):
        path = prefix + b"/" + e.name if prefix else e.name
        yield path, e
        if e.kind == DIR:
            yield from _walk(objects, e.ref, path)


@dataclass
class ApplyResult:
    files_written: int = 0
    removed: int = 0
    errors: list[tuple[bytes, str]] = field(default_factory=list)


class _Applier:
    def __init__(self, objects: ObjectStore, root_fd: int, progress: ProgressFn | None,
                 status: Progress, result: ApplyResult,
                 before_each: Callable[[], None] | None) -> None:
        self.objects = objects
        self.root_fd = root_fd
        self.progress = progress
        self.status = status
        self.result = result
        self.before_each = before_each
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
        tmp = temp_name().encode()
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
               before_each: Callable[[], None] | None = None) -> ApplyResult:
    """Carry out `plan` under directory `root` (created when missing). `status` is
    updated and passed to `progress` after each file; `before_each` runs before each
    action (crash points hook in there)."""
    os.makedirs(root, exist_ok=True)
    root_fd = os.open(root, _DIR_FLAGS)
    result = ApplyResult()
    if status is None:
        status = Progress(files_total=plan.files, bytes_total=plan.bytes)
    applier = _Applier(objects, root_fd, progress, status, result, before_each)
    try:
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
