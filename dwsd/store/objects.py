"""Content-addressed objects: blobs as files `objects/blobs/<2 hex>/<62 hex>`, trees as rows
of `objects/trees.db` (see treedb.py).

Blobs (file content) are stored raw so the view and restore can pread them; trees are
stored zstd-compressed. An object is written once: a blob to a temp name in STAGING (one
fan-out directory for all), then linked to its name; a tree inserted in the open
transaction. An existing object is never rewritten. Writes are not made durable one by
one: `make_durable` commits the trees and flushes the blobs in one batch before the
catalog commit that references them. Reads verify the id unless told the caller verifies.

Why one staging directory: cold dirty-path snapshots of the bench set's 1% change were
faster in 8 of 10 alternating rounds, medians 0.114-0.189 s against 0.117-0.223 s
(`bench/ab_incremental.sh OLD 4 dirty cold 3`; the same code on both sides gave the
second side 4 of 6, so this is evidence, not proof), and first snapshots did not change
(8.8-8.9 s against 8.4-9.4 s). The likely reason, not measured on its own: a new file's
inode goes to its directory's block group, and creating it reads (cold) and rewrites the
inode-table block it lands in; staged beside their final names a checkpoint's new blobs
touched a block in each of up to 256 groups, staged together a few blocks of one.
`put_stream` has to stage anyway: it cannot know the final name before the end.

Every method blocks; the daemon calls them from worker threads.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

from dwsd.crashpoints import crash_point
from dwsd.errors import CorruptObjectError, ObjectMissingError, StoreError
from dwsd.store.fsutil import (clean_temps, fsync_dir, open_cached, start_writeback, syncfs,
                               temp_name)
from dwsd.store.ids import Hasher, ObjectId, hash_bytes, validate_object_id
from dwsd.store.treedb import FILENAME as TREE_DB, TreeDB

Kind = Literal["blobs", "trees"]
_FANOUT = [f"{i:02x}" for i in range(256)]
STAGING = "00"  # the fan-out directory new blobs are written in, then linked out of
READ_CHUNK = 1 << 20
_OBJECT_NAME_RE = re.compile(r"[0-9a-f]{62}")
SYNCFS_FROM = 64  # blob files; below this, fsync each (see make_durable)


@dataclass
class WriteLog:
    """What one writer added: used for counting and to roll back a failed snapshot."""

    # (kind, id) -> stored length, in the order written.
    written: dict[tuple[Kind, ObjectId], int] = field(default_factory=dict)
    bytes_written: int = 0

    @property
    def objects_written(self) -> int:
        return len(self.written)

    def add(self, kind: Kind, oid: ObjectId, length: int) -> None:
        self.written[(kind, oid)] = length
        self.bytes_written += length

    def drop(self, kind: Kind, oid: ObjectId) -> None:
        self.bytes_written -= self.written.pop((kind, oid), 0)


class ObjectStore:
    """The object directory of one store."""

    def __init__(self, root: Path, readonly: bool = False) -> None:
        self.root = root
        self._root = str(root)
        self.trees = TreeDB(root / TREE_DB, readonly)
        self.log = WriteLog()
        # Capture workers publish concurrently; the lock keeps the write log whole.
        self._publish_lock = threading.Lock()
        # Objects read, by kind: work counters for tests and `status`.
        self.reads: dict[Kind, int] = {"blobs": 0, "trees": 0}
        # Every object renamed in since the last make_durable, whichever log it was in.
        self._unsynced: set[str] = set()

    @classmethod
    def create(cls, root: Path) -> "ObjectStore":
        for fan in _FANOUT:
            os.makedirs(root / "blobs" / fan, exist_ok=True)
        if not (root / TREE_DB).exists():
            TreeDB.create(root / TREE_DB)
        return cls(root)

    def close(self) -> None:
        """Commit pending tree writes and close the tree database."""
        self.trees.close()

    def path(self, kind: Literal["blobs"], oid: str) -> Path:
        """The file of blob `oid` (trees have no file); the id is validated first."""
        return Path(self._path(kind, oid))

    def _path(self, kind: Kind, oid: str) -> str:
        # str, not Path: this runs for every file of every capture.
        assert kind == "blobs", "trees are rows of the tree database, not files"
        return self.blob_file(validate_object_id(oid))

    def blob_file(self, oid: ObjectId) -> str:
        """The file of blob `oid`, an id known to be valid (computed, or decoded from a
        tree): not validated again."""
        return f"{self._root}/blobs/{oid[:2]}/{oid[2:]}"

    def has(self, kind: Kind, oid: ObjectId) -> bool:
        if kind == "trees":
            return self.trees.has(validate_object_id(oid))
        return os.path.exists(self._path(kind, oid))

    def read_trees_ahead(self) -> None:
        """Have the tree database read into the page cache on a thread (see
        TreeDB.read_ahead; never blocks)."""
        self.trees.read_ahead()

    # -- writing ------------------------------------------------------------------------

    def put(self, kind: Kind, data: bytes) -> ObjectId:
        """Store `data` under its id unless already present; return the id. A tree is
        buffered: it is written (and in the write log) at the latest by `make_durable`,
        and readable here at once."""
        if kind == "trees":
            oid = hash_bytes(data)
            self._log_trees(self.trees.add(oid, data))
            return oid
        return self.store_bytes(kind, data)[0]

    def store_bytes(self, kind: Literal["blobs"], data: bytes) -> tuple[ObjectId, bool]:
        """Store a blob; also says whether it was new (written by this call)."""
        oid = hash_bytes(data)
        target = self.blob_file(oid)
        if os.path.exists(target):
            return oid, False
        tmp = f"{self._root}/blobs/{STAGING}/{temp_name()}"
        self._write_new(tmp, data)
        return oid, self._publish(oid, tmp, len(data), target)

    def put_stream(self, kind: Literal["blobs"], fd: int, buf: bytearray
                   ) -> tuple[ObjectId, int, bool]:
        """Copy everything readable from `fd` into a new object, hashing as it goes.

        Returns (id, length, new). When the content is already stored the copy is
        dropped and `new` is False. `buf` is the caller's reusable read buffer.
        """
        hasher = Hasher()
        tmp = f"{self._root}/blobs/{STAGING}/{temp_name()}"
        out = self._open_new(tmp)
        length = 0
        try:
            view = memoryview(buf)
            while True:
                n = os.readv(fd, [view])  # errors reading the source propagate as they are
                if n == 0:
                    break
                chunk = view[:n]
                hasher.update(chunk)
                try:
                    write_sparse(out, chunk)
                except OSError as exc:
                    raise self._translate(exc, "writing a blob") from exc
                length += n
            try:
                end_sparse(out, length)
            except OSError as exc:
                raise self._translate(exc, "writing a blob") from exc
            oid = hasher.object_id()
            target = self.blob_file(oid)
            exists = os.path.exists(target)
        except BaseException:
            _discard(out, tmp)
            raise
        if exists:
            _discard(out, tmp)  # its pages go unwritten
            return oid, length, False
        start_writeback(out)
        os.close(out)
        return oid, length, self._publish(oid, tmp, length, target)

    def _log_trees(self, written: list[tuple[ObjectId, int]]) -> None:
        if not written:
            return
        with self._publish_lock:
            for oid, length in written:
                self.log.add("trees", oid, length)
        crash_point("objects-written")

    def _open_new(self, tmp: str | Path) -> int:
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        except OSError as exc:
            raise self._translate(exc, "creating an object") from exc

    def _write_new(self, tmp: str, data: bytes) -> None:
        out = self._open_new(tmp)
        try:
            write_sparse(out, memoryview(data))
            end_sparse(out, len(data))
        except OSError as exc:
            _discard(out, tmp)
            raise self._translate(exc, "writing an object") from exc
        except BaseException:
            _discard(out, tmp)
            raise
        start_writeback(out)
        os.close(out)

    def _publish(self, oid: ObjectId, tmp: str | Path, length: int, target: str) -> bool:
        """Give a finished temp file the name `target` of blob `oid`; True if it was new.

        link(2), unlike rename(2), refuses to replace an existing name, so a durable
        object is never swapped for a not-yet-synced copy, and two workers storing the
        same content need no lock: the second one's link fails with EEXIST."""
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        except OSError as exc:
            raise self._translate(exc, "naming an object") from exc
        finally:
            os.unlink(tmp)
        with self._publish_lock:  # only the bookkeeping is shared between workers
            self.log.add("blobs", oid, length)
            self._unsynced.add(target)
        crash_point("objects-written")
        return True

    def adopt_blobs(self, published: Iterable[tuple[ObjectId, int]]) -> None:
        """Take in blobs that a reader process published for this writer (id, length):
        from now on they are counted, made durable and rolled back as its own."""
        for oid, length in published:
            with self._publish_lock:
                self.log.add("blobs", oid, length)
                self._unsynced.add(self._path("blobs", oid))
            crash_point("objects-written")

    def _translate(self, exc: OSError, doing: str) -> StoreError:
        return StoreError(f"store {self.root.parent} failed {doing}: {exc.strerror}")

    def make_durable(self) -> None:
        """Make every object written so far survive a crash (blocks): the blob files
        first, then the tree transaction, so a committed tree never names a blob that a
        power cut could take back (the next snapshot of the same directory reuses the
        tree as it is).

        A few blobs are fsynced one by one on a small pool, with their directories;
        many are flushed by one syncfs. syncfs also flushes other programs' dirty data
        on the same filesystem, which a small snapshot should not have to wait for.
        """
        with self._publish_lock:
            pending, self._unsynced = self._unsynced, set()
        self._flush_blobs(pending)
        self._log_trees(self.trees.commit())

    def sync_filesystem(self) -> None:
        """syncfs the filesystem the objects are on (blocks): every blob written to it,
        in any write log or none, is durable after this."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    def _flush_blobs(self, paths: set[str]) -> None:
        if len(paths) > SYNCFS_FROM:
            self.sync_filesystem()
            return
        dirs = {Path(os.path.dirname(p)) for p in paths}
        with cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync") as pool:
            list(pool.map(_fsync_path, paths))
            list(pool.map(fsync_dir, dirs))

    def roll_back(self, log: WriteLog) -> None:
        """Remove the objects in `log` (they were new, so nothing else refers to them),
        and the trees still buffered (this writer's since its last flush)."""
        self.trees.discard_buffer()
        for kind, oid in list(log.written):
            self.discard_new(kind, oid)

    def discard_new(self, kind: Kind, oid: ObjectId) -> None:
        """Remove an object this writer published and never committed (a torn copy, a
        failed snapshot's objects), and forget it in the write log and the durability
        list: a later `make_durable` must not look for it, nor counts include it."""
        with self._publish_lock:
            if kind == "blobs":
                self._unsynced.discard(self._path(kind, oid))
            self.log.drop(kind, oid)
        self.remove(kind, oid)

    def forget_unsynced(self) -> None:
        """Forget the blobs written so far that `make_durable` would flush: for a
        writer whose blobs another makes durable (a reader process: its parent adopts
        them, see `adopt_blobs`)."""
        with self._publish_lock:
            self._unsynced = set()

    def start_log(self) -> WriteLog:
        """Begin a fresh write log for one snapshot and return it."""
        self.log = WriteLog()
        return self.log

    # -- reading ------------------------------------------------------------------------

    def get(self, kind: Kind, oid: ObjectId) -> bytes:
        """Read and verify a whole object. Raises ObjectMissingError, CorruptObjectError."""
        self.reads[kind] += 1
        try:
            if kind == "trees":
                data = self.trees.get(validate_object_id(oid))
                if data is None:
                    raise FileNotFoundError
            else:
                with open(self._path(kind, oid), "rb") as f:
                    data = f.read()
        except FileNotFoundError:
            raise ObjectMissingError(f"{kind[:-1]} {oid} is missing from the store") from None
        if hash_bytes(data) != oid:
            raise CorruptObjectError(f"{kind[:-1]} {oid} is corrupt (content hash differs)")
        return data

    def get_trees(self, oids: Sequence[ObjectId]) -> list[tuple[ObjectId, bytes | Exception]]:
        """Read and verify trees `oids` (valid ids, in any number) together, as `get`
        would one by one: each with its encoding or the ObjectMissingError or
        CorruptObjectError that `get` would raise for it, in the order given. Raises
        StoreError when the database cannot be read."""
        self.reads["trees"] += len(oids)
        found = self.trees.get_many(oids)
        out: list[tuple[ObjectId, bytes | Exception]] = []
        for oid in oids:
            data = found.get(oid)
            if data is None:
                data = ObjectMissingError(f"tree {oid} is missing from the store")
            elif not isinstance(data, Exception) and hash_bytes(data) != oid:
                data = CorruptObjectError(f"tree {oid} is corrupt (content hash differs)")
            out.append((oid, data))
        return out

    def open_blob(self, oid: ObjectId) -> int:
        """Open a blob for reading; the caller closes the fd. Raises ObjectMissingError."""
        self.reads["blobs"] += 1
        try:
            return os.open(self._path("blobs", oid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _missing_blob(oid) from None

    def open_blob_cached(self, oid: ObjectId) -> int | None:
        """`open_blob` if the kernel can find the blob's file from its caches alone, else
        None: never blocks on the disk, so an event loop may call it. Raises
        ObjectMissingError."""
        try:
            fd = open_cached(self._path("blobs", oid))
        except FileNotFoundError:
            raise _missing_blob(oid) from None
        if fd is not None:
            self.reads["blobs"] += 1
        return fd

    def verify(self, kind: Kind, oid: ObjectId) -> bool:
        """Re-hash an object; False when its content no longer matches its id."""
        if kind == "trees":
            try:
                self.get(kind, oid)
                return True
            except CorruptObjectError:
                return False
        fd = os.open(self._path(kind, oid), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return hash_fd(fd) == oid
        finally:
            os.close(fd)

    def iter_ids(self, kind: Kind) -> Iterator[ObjectId]:
        """Every object id of a kind present on disk (temp files skipped)."""
        if kind == "trees":
            yield from self.trees.ids()
            return
        for fan in _FANOUT:
            for name in os.listdir(self.root / kind / fan):
                # Temp files, and anything else that is not an object name (a stray file
                # someone left), are not objects: gc and check pass over them.
                if _OBJECT_NAME_RE.fullmatch(name):
                    yield ObjectId(fan + name)

    def remove(self, kind: Kind, oid: ObjectId) -> None:
        """Remove an object; a tree's removal is durable at the next `make_durable`. A
        blob still waiting to be made durable (written by a capture that recorded
        nothing, then found unreferenced by gc) is no longer waited for."""
        if kind == "trees":
            self.trees.delete(validate_object_id(oid))
            return
        path = self._path(kind, oid)
        with self._publish_lock:
            self._unsynced.discard(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def move_aside(self, oid: ObjectId) -> bool:
        """Move a corrupt blob out of the store's objects into `<store>/corrupt/`, kept
        for inspection: a capture of the same content then writes a good copy, which
        repairs every snapshot that uses it (blocks). False when it was not there.
        Raises StoreError."""
        aside = self.root.parent / "corrupt"
        path = self._path("blobs", oid)
        with self._publish_lock:
            self._unsynced.discard(path)
        try:
            if not aside.is_dir():
                aside.mkdir(exist_ok=True)
                fsync_dir(aside.parent)
            os.rename(path, aside / oid)
            fsync_dir(aside)
            fsync_dir(Path(os.path.dirname(path)))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._translate(exc, "moving a corrupt blob aside") from exc
        return True

    def clean_temps(self) -> int:
        """Remove temp files left by a crash; only safe while holding the writer lock."""
        return sum(clean_temps(self.root / "blobs" / fan) for fan in _FANOUT)


def _missing_blob(oid: ObjectId) -> ObjectMissingError:
    return ObjectMissingError(f"blob {oid} is missing from the store")


def hash_fd(fd: int) -> ObjectId:
    """The object id of everything readable from `fd`, read with pread from offset 0
    (the fd's own offset stays put). Blocks."""
    hasher = Hasher()
    offset = 0
    while chunk := os.pread(fd, READ_CHUNK, offset):
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.object_id()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Whole blocks of zeros this large are not written but seeked over, leaving holes: a
# sparse file (a VM image, a preallocated array) costs its data, in the store and when
# restored, not its length. Files in the store and restored ones are read back as the
# same bytes, and the hash is over the bytes, so only the space used differs.
SPARSE_BLOCK = 64 << 10
_ZEROS = bytes(SPARSE_BLOCK)


def write_sparse(fd: int, view: memoryview) -> None:
    """Write `view` at `fd`'s offset as `write_all` does, but seek over each whole
    SPARSE_BLOCK of zeros (counted from the start of `view`) instead of writing it. The
    caller ends the file with `end_sparse`."""
    n = len(view)
    if n < SPARSE_BLOCK:
        write_all(fd, view)
        return
    pending = 0  # start of the data not written yet
    for pos in range(0, n - SPARSE_BLOCK + 1, SPARSE_BLOCK):
        end = pos + SPARSE_BLOCK
        # The first and last bytes reject data at once; a block of zeros is compared
        # as bytes (memcmp), not element by element as a memoryview would be.
        if view[pos] or view[end - 1] or view[pos:end].tobytes() != _ZEROS:
            continue
        if pending < pos:
            write_all(fd, view[pending:pos])
        os.lseek(fd, SPARSE_BLOCK, os.SEEK_CUR)
        pending = end
    if pending < n:
        write_all(fd, view[pending:])


def end_sparse(fd: int, length: int) -> None:
    """Give a file written with `write_sparse` its `length`: a hole at its end was not
    written."""
    if length >= SPARSE_BLOCK:
        os.ftruncate(fd, length)


def write_all(fd: int, view: memoryview) -> None:
    """Write all of `view` to `fd` (blocks; os.write may write less than asked)."""
    while view:
        view = view[os.write(fd, view):]


def _discard(fd: int, tmp: str | Path) -> None:
    os.close(fd)
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


