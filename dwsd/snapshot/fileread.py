"""Read one open file into a blob, never storing a torn mix of two versions.

The file's fstat before and after the read must agree (size, mtime, ctime, inode) and
the length read must be its size; if not, it is read again, up to READ_ATTEMPTS times.
A torn copy that was stored new is removed at once, so no later snapshot reuses it.

Runs wherever capture reads: on its walking thread or in a reader process (readers.py),
so everything here is plain blocking code on an `ObjectStore` and an fd, and the outcome
pickles.
"""
from __future__ import annotations

import errno
import os
import stat as stat_mod
import threading
import time
from dataclasses import dataclass

from dwsd.snapshot.statcache import RACY_WINDOW_NS
from dwsd.store.ids import ObjectId
from dwsd.store.objects import ObjectStore
from dwsd.store.tree import Xattrs

READ_ATTEMPTS = 3
SMALL_FILE = 1 << 20  # read whole in one go; larger files are streamed in pieces this big


@dataclass(slots=True)
class ReadOutcome:
    """What reading one file gave. `blob` None: it never held still (`attempts` ==
    READ_ATTEMPTS), or it could not be read (`error`). `trusted`: its ctime is old
    enough that a later write cannot share it (see statcache.RACY_WINDOW_NS)."""

    blob: ObjectId | None
    length: int
    stat: os.stat_result | None
    xattrs: Xattrs
    attempts: int
    trusted: bool
    error: str | None = None


def read_open_file(objects: ObjectStore, fd: int) -> ReadOutcome:
    """Read `fd` into a blob of `objects` and close it. An OSError on the source is an
    outcome (the file is reported unreadable); a StoreError (the store is full, say)
    is raised."""
    try:
        return read_stable(objects, fd)
    except OSError as exc:
        return ReadOutcome(None, 0, None, (), 0, False, exc.strerror or str(exc))
    finally:
        os.close(fd)


def read_stable(objects: ObjectStore, fd: int) -> ReadOutcome:
    """Read `fd` until one read happens with no change to its stat key."""
    length = 0
    for attempt in range(1, READ_ATTEMPTS + 1):
        started = time.time_ns()
        before = os.fstat(fd)
        if not stat_mod.S_ISREG(before.st_mode):
            return ReadOutcome(None, 0, None, (), attempt, False, "not a regular file")
        xattrs = read_xattrs(fd)
        os.lseek(fd, 0, os.SEEK_SET)
        if before.st_size <= SMALL_FILE:
            data = _read_small(fd, before.st_size)
            blob, new = objects.store_bytes("blobs", data)
            length = len(data)
        else:
            blob, length, new = objects.put_stream("blobs", fd, _stream_buffer())
        after = os.fstat(fd)
        if stat_key(before) == stat_key(after) and length == after.st_size:
            trusted = after.st_ctime_ns < started - RACY_WINDOW_NS
            return ReadOutcome(blob, length, after, xattrs, attempt, trusted)
        if new:  # a torn copy: never leave it where a later snapshot could reuse it
            objects.discard_new("blobs", blob)
    return ReadOutcome(None, length, None, (), READ_ATTEMPTS, False)


def stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def read_xattrs(fd: int) -> Xattrs:
    """The `user.*` extended attributes of an open file or directory, sorted."""
    try:
        names = [n for n in os.listxattr(fd) if n.startswith("user.")]
        return tuple(sorted((os.fsencode(n), os.getxattr(fd, n)) for n in names))
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return ()
        raise


def _read_small(fd: int, expected: int) -> bytes:
    chunks = []
    want = expected + 1  # one byte more, to notice growth
    while chunk := os.read(fd, max(want, 65536)):
        chunks.append(chunk)
    return b"".join(chunks)


_buffers = threading.local()


def _stream_buffer() -> bytearray:
    """This thread's 1 MiB buffer for streaming large files (allocated once per thread,
    not per file: that showed up in profiles)."""
    buf: bytearray | None = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(SMALL_FILE)
    return buf
