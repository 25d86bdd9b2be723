"""The filesystem side of a restore: entries made, replaced and removed below a directory
fd, never through a symlink (every path is reached with `O_NOFOLLOW` directory fds), and
the SyncSweep that makes them durable together.

Functions here act on one entry and may run on any thread (they share no state); all of
them block.
"""
from __future__ import annotations

import errno
import itertools
import os
import secrets
import stat as stat_mod

from dwsd.crashpoints import crash_point
from dwsd.errors import CorruptObjectError, RestoreError
from dwsd.store.fsutil import syncfs
from dwsd.store.ids import Hasher, ObjectId, hash_bytes
from dwsd.store.objects import ObjectStore, end_sparse, write_sparse
from dwsd.store.tree import BLOCK, CHAR, DIR, FIFO, FILE, SOCKET, SYMLINK, Entry

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A resource's own directory, as the config names it, may be a symlink to one (followed:
# the owner chose it); everything below it is reached with DIR_FLAGS.
ROOT_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
IS_ROOT = os.geteuid() == 0
# Restore's temp files get their own prefix, unlike the store's: one a crash leaves in a
# resource is recognised and removed by the next restore (and never taken for data).
RESTORE_TEMP_PREFIX = b".dwsd-restore-"
_temp_tag = secrets.token_hex(4).encode()  # a reused pid cannot reuse a leftover's name
_temp_counter = itertools.count()  # next() on it is atomic under the GIL


def restore_temp_name() -> bytes:
    """A fresh name for a restore temp file (unique in this process and across runs)."""
    return b"%s%s-%d" % (RESTORE_TEMP_PREFIX, _temp_tag, next(_temp_counter))


def is_restore_temp(name: bytes) -> bool:
    """True for a name restore gives its temp files (the last component of a path)."""
    return name.rpartition(b"/")[2].startswith(RESTORE_TEMP_PREFIX)


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


def open_dir_path(root_fd: int, head: bytes) -> int:
    """A new fd for directory `head` below `root_fd`, never following a symlink."""
    fd = os.dup(root_fd)
    try:
        for part in head.split(b"/") if head else []:
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_file(objects: ObjectStore, pfd: int, name: bytes, entry: Entry,
               buf: memoryview) -> None:
    """Put regular file `entry` at `name` in directory `pfd`: its blob copied (verified)
    into a temp file, metadata set through the fd, then renamed over whatever stands
    there. `buf` is scratch space owned by the calling thread. Raises
    CorruptObjectError, ObjectMissingError (nothing is left behind) or OSError."""
    assert entry.ref is not None
    tmp = restore_temp_name()
    src = objects.open_blob(entry.ref)
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                      os.O_CLOEXEC, 0o600, dir_fd=pfd)
        try:
            try:
                _copy_verified(src, out, entry, buf)
                set_metadata_fd(out, entry, fresh=True)
            finally:
                os.close(out)
            rename_into_place(pfd, tmp, name)
        except BaseException:
            unlink_quietly(pfd, tmp)
            raise
    finally:
        os.close(src)


def rename_into_place(pfd: int, tmp: bytes, name: bytes) -> None:
    """Rename finished temp file `tmp` over `name`, even when a directory stands there."""
    crash_point("restore-temp-written")
    try:
        os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
    except IsADirectoryError:
        # rename() cannot replace a directory with a file; trying first saves a stat
        # per file in the usual case, where nothing or a file is there.
        clear_dir(pfd, name)
        os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)


# Files up to the kernel's default readahead window gain nothing from a hint.
_HINT_FROM = 256 << 10


def _copy_verified(src: int, out: int, entry: Entry, buf: memoryview) -> None:
    """Copy the `entry.size` bytes of blob fd `src` to `out`, hashing the very bytes
    written: a blob that is short or differs raises CorruptObjectError (the caller
    discards `out`). Reading stops at the size the tree gives, which saves the read
    that would return end-of-file; what was written still has to hash to the id."""
    if entry.size >= _HINT_FROM:
        # Read once, front to back: a larger readahead window.
        os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    n = os.readv(src, [buf[:entry.size]]) if entry.size else 0
    if n == entry.size:
        # All of it in one read (most files): hashed on this thread alone. A streaming
        # Hasher hands each update to blake3's thread pool, whose spinning workers
        # cost more than they save on small inputs while other files are in flight.
        oid = hash_bytes(buf[:n])
        write_sparse(out, buf[:n])
    else:
        oid = _copy_rest(src, out, entry.size, buf, n)
    end_sparse(out, entry.size)
    if oid != entry.ref:
        raise CorruptObjectError(f"blob {entry.ref} is corrupt (content hash differs)")


def _copy_rest(src: int, out: int, size: int, buf: memoryview, n: int) -> ObjectId:
    """Go on copying a blob whose first `n` bytes are in `buf`; the id of what was
    written (short of `size` when the blob ends early)."""
    hasher = Hasher()
    left = size
    while n:
        left -= n
        hasher.update(buf[:n])
        write_sparse(out, buf[:n])
        n = os.readv(src, [buf[:left]]) if left else 0
    return hasher.object_id()


def set_metadata_fd(fd: int, entry: Entry, fresh: bool = False) -> None:
    """Owner, mode, xattrs and mtime of an open regular file (chown first: it clears
    set-uid bits). `fresh`: the file was just created, so it has no user xattrs to
    remove (which saves listing them)."""
    if fresh:
        for key, value in entry.xattrs:
            os.setxattr(fd, key, value)
    else:
        _set_xattrs(fd, entry)
    if IS_ROOT:
        os.fchown(fd, entry.uid, entry.gid)
    os.fchmod(fd, entry.mode)
    os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))


def set_metadata_at(pfd: int, name: bytes, entry: Entry) -> None:
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


def make_special(pfd: int, tmp: bytes, entry: Entry) -> None:
    """Create symlink, FIFO, socket or device `entry` as `tmp`, with its metadata.
    Raises RestoreError when a device cannot be made (not root)."""
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
    set_metadata_at(pfd, tmp, entry)


def replace_with_dir(pfd: int, name: bytes) -> None:
    """Make `name` a directory (kept if it is one; anything else there is unlinked)."""
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if stat_mod.S_ISDIR(st.st_mode):
            return
        os.unlink(name, dir_fd=pfd)
    except FileNotFoundError:
        pass
    os.mkdir(name, 0o700, dir_fd=pfd)


def clear_dir(pfd: int, name: bytes) -> None:
    """Remove the directory standing at `name`, if one does."""
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat_mod.S_ISDIR(st.st_mode):
        remove(pfd, name)


def remove(pfd: int, name: bytes) -> None:
    """Remove a file, symlink or whole directory tree, never following symlinks."""
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat_mod.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=pfd)
        return
    fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
    try:
        for child in os.listdir(fd):
            remove(fd, os.fsencode(child))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=pfd)


def unlink_quietly(pfd: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=pfd)
    except FileNotFoundError:
        pass
