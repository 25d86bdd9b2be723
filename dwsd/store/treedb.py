"""Trees live in one SQLite database, `objects/trees.db`, not in a file each.

Why: a snapshot writes one small tree (about 1 KiB compressed) for every directory on the
path of a change. As files, each took a whole 4 KiB block and five system calls (create,
write, close, link, unlink): a quarter of the store growth of a 1% change and most of a
checkpoint's time. As rows they share pages, and a snapshot's trees are one transaction.

The contract is the blob files' (see objects.py):
- a row is keyed by the raw 32-byte id and holds the stored (compressed) bytes; it is
  inserted once (`INSERT OR IGNORE`) and never updated;
- inserts go into one open transaction that `commit` makes durable (WAL with
  `synchronous=FULL`: one fsync of the log) before the catalog entry naming them is
  committed, so a crash loses only trees nothing refers to;
- other processes (`dwsd mount`) open it read-only and see committed rows only.

Writes are buffered: `add` only keeps the encoding; compression and the inserts happen in
`flush` (at `commit`, or once FLUSH_BYTES are waiting). A capture adds its trees while
files are still being read, and every compression or SQLite call gives up the GIL and
then waits to get it back: when reads ran on threads, one call per tree cost a checkpoint
0.1 s; one batch costs a few ms.

Rows are zstd frames (level 3, one compressor reused under the lock): on this store's
trees (about 2 KiB encoded) zstd takes 18 us a tree and keeps 53% of the bytes, where
zlib took 125-160 us and kept 57% (zlib's set-up per call dominates at that size), and it
decompresses in half zlib's time. Rows moved in from a format-1 store stay zlib streams;
`_decompress` tells the two apart by zstd's frame magic.

`read_ahead` has a thread ask the kernel to read the whole database file in (at most
once a READ_AHEAD_EVERY_S), for callers about to make many loads in an order that has
nothing to do with the rows' place in the file (they are keyed by id), which from a cold
cache wait for their own 4 KiB reads one by one:
- the view, at each tree load (`ViewOps._load_tree`). Cold walks of the bench snapshot,
  4 alternating rounds: with 1.3 MB of trees, 0.66-0.76 s without and 0.56-0.64 s with
  it, and the view served it with 0.08 s less CPU; with 7.7 MB (many more snapshots'
  trees), 0.66-0.85 against 0.62-0.70 s. The thread is why the larger file gains at
  all: asked inline, the kernel allocates the pages before the load goes on, and the
  walk was no faster;
- a dirty-path capture that finds its paths not cached, once, for its commit's id
  lookups (see capture.py). A capture's own loads do not ask: they are the few trees on
  its dirty paths, and reading the whole file and its log for those, inline, made a cold
  dirty-path snapshot 0.02-0.04 s slower (3 alternating rounds).
A file over READ_AHEAD_MAX is left to SQLite's own reads: one walk or commit needs a
part of it, and the rest would cost memory and disk time.

Checkpoints (copying the log's pages into the database file, then an fsync of it) run
on a thread of their own, on a connection of their own, after each commit that wrote
(`_checkpoint_soon`), not inside the commit of the snapshot that happens to fill the
log: a 1% change of the bench set writes ~1.4 MB of log, so one commit in three did
one, and took 21-23 ms instead of 8-12 (12 warm snapshots). SQLite's automatic
checkpoint stays as a backstop, at WAL_BACKSTOP_PAGES. The price: a page changed by two
snapshots in a row is copied twice, and the database file has an fsync a snapshot,
both off the snapshot's path.

One connection per ObjectStore, shared by its threads (capture, view workers) under a
lock, plus the checkpoint thread's own. Every method blocks.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import zstandard

from dwsd.errors import CorruptObjectError, StoreError
from dwsd.store.ids import ObjectId, id_from_raw, raw_id

log = logging.getLogger(__name__)

FILENAME = "trees.db"
_SCHEMA = "CREATE TABLE IF NOT EXISTS trees (id BLOB PRIMARY KEY, data BLOB NOT NULL)"
_INSERT = "INSERT OR IGNORE INTO trees (id, data) VALUES (?, ?)"  # a row is never updated
# Past a checkpoint the log is cut back to this size, so an idle store does not keep a
# large first snapshot's log on disk.
_WAL_LIMIT = 4 << 20
_BUSY_TIMEOUT_S = 30.0
WAL_BACKSTOP_PAGES = 16384  # 64 MiB: SQLite checkpoints in the commit past this
FLUSH_BYTES = 8 << 20  # encoded trees held before they are written (a big first walk)
_LOOKUP_BATCH = 500  # ids per `IN (...)` query; SQLite allows 32,766 parameters
_ZSTD_LEVEL = 3
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A tree's encoding is about 100 bytes an entry: far above any real directory, and low
# enough that a corrupt frame header cannot make a reader allocate without bound.
_MAX_TREE_BYTES = 1 << 30
_decompressors = threading.local()
READ_AHEAD_EVERY_S = 1.0
READ_AHEAD_MAX = 16 << 20  # about 13,000 trees


class TreeDB:
    """The tree table of one store."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._lock = threading.Lock()
        self._closed = False
        self._next_read_ahead = 0.0  # time.monotonic() from which a load reads ahead
        # Trees added and not yet flushed: id -> uncompressed encoding.
        self._buffer: dict[ObjectId, bytes] = {}
        self._buffered_bytes = 0
        self._compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)  # under the lock
        try:
            if readonly:
                self._con = sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                            isolation_level=None, check_same_thread=False,
                                            timeout=_BUSY_TIMEOUT_S)
            else:
                if not path.exists():
                    raise StoreError(f"store {path.parent.parent} has no {FILENAME}")
                self._con = sqlite3.connect(path, isolation_level=None,
                                            check_same_thread=False,
                                            timeout=_BUSY_TIMEOUT_S)
                self._con.execute("PRAGMA synchronous=FULL")
                self._con.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
                self._con.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
        except sqlite3.Error as exc:
            raise self._error(exc, "opening its tree database") from exc
        # See the module doc: the checkpoint thread and its connection (opened by it).
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_con: sqlite3.Connection | None = None

    @classmethod
    def create(cls, path: Path) -> None:
        """Create an empty tree database (WAL mode is a property of the file)."""
        try:
            con = sqlite3.connect(path, isolation_level=None)
            try:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute(_SCHEMA)
            finally:
                con.close()
        except sqlite3.Error as exc:
            raise StoreError(f"store {path.parent.parent} failed creating its tree "
                             f"database: {exc}") from exc

    def get(self, oid: ObjectId) -> bytes | None:
        """The encoding of tree `oid` (uncompressed, not verified), or None."""
        stored = self._lookup(oid, "SELECT data FROM trees WHERE id = ?", "reading a tree")
        if stored is None or isinstance(stored, bytes):
            return stored  # absent, or still in the buffer (uncompressed)
        plain = self._decompressed(oid, stored[0])
        if isinstance(plain, Exception):
            raise plain
        return plain

    def get_many(self, oids: Sequence[ObjectId]) -> dict[ObjectId, bytes | Exception]:
        """The encodings of the trees `oids` that are stored (uncompressed, not
        verified), by id, in one query per _LOOKUP_BATCH ids (a read transaction each:
        one lookup a tree took a transaction each); a tree that does not decompress
        maps to its CorruptObjectError. Absent trees are absent from the result."""
        found: dict[ObjectId, bytes | Exception] = {}
        with self._lock:
            for oid in oids:
                if (plain := self._buffer.get(oid)) is not None:
                    found[oid] = plain
            wanted = {raw_id(oid): oid for oid in oids if oid not in found}
            try:
                rows = self._select_in("id, data", list(wanted))
            except sqlite3.Error as exc:
                raise self._error(exc, "reading trees") from exc
        for raw, stored in rows:  # outside the lock, as `get` does: a lookup need not wait
            oid = wanted[bytes(raw)]
            found[oid] = self._decompressed(oid, stored)
        return found

    def _decompressed(self, oid: ObjectId, stored: bytes) -> bytes | Exception:
        try:
            return _decompress(stored)
        except (zlib.error, zstandard.ZstdError, ValueError):
            return CorruptObjectError(f"tree {oid} is corrupt (does not decompress)")

    def read_ahead(self) -> None:
        """Start a thread that asks the kernel to read the database and its log into
        the page cache, unless one was started less than READ_AHEAD_EVERY_S ago. Two
        threads may both start one: that costs a lookup of cached pages, nothing more.
        Never blocks."""
        now = time.monotonic()
        if now < self._next_read_ahead:
            return
        self._next_read_ahead = now + READ_AHEAD_EVERY_S
        try:
            threading.Thread(target=self._advise_will_need, name="trees read ahead",
                             daemon=True).start()
        except RuntimeError:  # no thread to be had: the load reads as it would have
            pass

    def _advise_will_need(self) -> None:
        """POSIX_FADV_WILLNEED on the database and its log, each unless it is over
        READ_AHEAD_MAX (blocks while the kernel allocates the pages). Advice only: a
        failure changes nothing."""
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # no log: nothing to read
            try:
                if os.fstat(fd).st_size <= READ_AHEAD_MAX:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def has(self, oid: ObjectId) -> bool:
        return self._lookup(oid, "SELECT 1 FROM trees WHERE id = ?",
                            "looking up a tree") is not None

    def _lookup(self, oid: ObjectId, sql: str, doing: str) -> bytes | tuple[Any, ...] | None:
        """The buffered encoding of `oid`, else the row `sql` finds for it, else None."""
        with self._lock:
            if (plain := self._buffer.get(oid)) is not None:
                return plain
            try:
                row: tuple[Any, ...] | None = self._con.execute(sql, (raw_id(oid),)).fetchone()
            except sqlite3.Error as exc:
                raise self._error(exc, doing) from exc
        return row

    def add(self, oid: ObjectId, plain: bytes) -> list[tuple[ObjectId, int]]:
        """Buffer tree `oid` (its uncompressed encoding) for the next flush. Returns what
        a flush it set off wrote (see `_flush`), usually nothing."""
        with self._lock:
            if oid in self._buffer:
                return []
            self._buffer[oid] = plain
            self._buffered_bytes += len(plain)
            if self._buffered_bytes < FLUSH_BYTES:
                return []
            return self._flush()

    def _flush(self) -> list[tuple[ObjectId, int]]:
        """Write the buffered trees that are not stored yet into the open transaction
        (begun here if none is); the lock is held. Returns (id, stored length) of each
        tree written."""
        buffered, self._buffer, self._buffered_bytes = self._buffer, {}, 0
        if not buffered:
            return []
        raw = {raw_id(oid): oid for oid in buffered}
        try:
            self._begin()
            stored = self._existing(list(raw))
            compress = self._compressor.compress
            rows = [(r, compress(buffered[oid])) for r, oid in raw.items()
                    if r not in stored]
            self._con.executemany(_INSERT, rows)
        except sqlite3.Error as exc:
            raise self._error(exc, "writing its trees") from exc
        return [(raw[r], len(data)) for r, data in rows]

    def _existing(self, raws: list[bytes]) -> set[bytes]:
        return {bytes(row[0]) for row in self._select_in("id", raws)}

    def _select_in(self, columns: str, raws: list[bytes]) -> list[tuple[Any, ...]]:
        """`columns` of the stored trees among the raw ids `raws`, one query per
        _LOOKUP_BATCH of them; the lock is held."""
        rows: list[tuple[Any, ...]] = []
        for i in range(0, len(raws), _LOOKUP_BATCH):
            batch = raws[i:i + _LOOKUP_BATCH]
            marks = ",".join("?" * len(batch))
            rows += self._con.execute(
                f"SELECT {columns} FROM trees WHERE id IN ({marks})", batch).fetchall()
        return rows

    def insert_stored(self, oid: ObjectId, stored: bytes) -> None:
        """Insert a tree as stored (compressed) into the open transaction: for moving
        format-1 tree files in (zlib streams, which `get` still reads)."""
        with self._lock:
            try:
                self._begin()
                self._con.execute(_INSERT, (raw_id(oid), stored))
            except sqlite3.Error as exc:
                raise self._error(exc, "writing a tree") from exc

    def discard_buffer(self) -> None:
        """Forget the trees added since the last flush (a failed snapshot's)."""
        with self._lock:
            self._buffer, self._buffered_bytes = {}, 0

    def delete(self, oid: ObjectId) -> None:
        """Remove a tree in the open transaction (no error when it is not there)."""
        with self._lock:
            if self._buffer.pop(oid, None) is not None:
                return
            try:
                self._begin()
                self._con.execute("DELETE FROM trees WHERE id = ?", (raw_id(oid),))
            except sqlite3.Error as exc:
                raise self._error(exc, "removing a tree") from exc

    def commit(self) -> list[tuple[ObjectId, int]]:
        """Flush, then make every insert and delete so far durable (blocks on one
        fsync), and have a checkpoint follow on its thread. Returns what the flush
        wrote."""
        with self._lock:
            written = self._flush()
            if not self._con.in_transaction:
                return written
            try:
                self._con.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise self._error(exc, "committing its trees") from exc
            self._checkpoint_soon()
            return written

    def _checkpoint_soon(self) -> None:
        """Start a checkpoint thread unless one is running (it then misses this commit's
        pages; the next commit's checkpoint takes them). The lock is held."""
        if self._closed or (self._checkpointer is not None
                            and self._checkpointer.is_alive()):
            return
        self._checkpointer = threading.Thread(target=self._checkpoint, daemon=True,
                                              name="trees checkpoint")
        try:
            self._checkpointer.start()
        except RuntimeError:  # no thread to be had: the backstop checkpoints in time
            self._checkpointer = None

    def _checkpoint(self) -> None:
        """Copy the committed log into the database file (PASSIVE: never waits for a
        reader or the writer). A failure only leaves the log longer."""
        try:
            if self._checkpoint_con is None:
                self._checkpoint_con = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False,
                    timeout=_BUSY_TIMEOUT_S)
                # FULL: the database file is fsynced before the log may be reused.
                self._checkpoint_con.execute("PRAGMA synchronous=FULL")
            self._checkpoint_con.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            log.warning("checkpoint of %s left for later: %s", self.path, exc)

    def wait_checkpointed(self) -> None:
        """Wait for the checkpoint thread, if one is running."""
        with self._lock:  # set and started together, under the lock
            checkpointer = self._checkpointer
        if checkpointer is not None:
            checkpointer.join()

    def ids(self) -> list[ObjectId]:
        """Every tree id stored (committed, or written by this connection)."""
        with self._lock:
            self._flush()
            try:
                rows = self._con.execute("SELECT id FROM trees").fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc, "listing its trees") from exc
        return [id_from_raw(bytes(r[0])) for r in rows]

    def close(self) -> None:
        """Commit what is pending and close (again: no-op); unusable afterwards."""
        if self._closed:
            return
        if not self.readonly:
            self.commit()
        with self._lock:
            self._closed = True  # no checkpoint starts after this
        self.wait_checkpointed()
        with self._lock:
            if self._checkpoint_con is not None:
                self._checkpoint_con.close()
            self._con.close()

    def _begin(self) -> None:
        """Open the write transaction unless it is open (the lock is held)."""
        if not self._con.in_transaction:
            self._con.execute("BEGIN")

    def _rollback(self) -> None:
        try:
            self._con.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite already rolled back (after a full disk, for one)

    def _error(self, exc: sqlite3.Error, doing: str) -> StoreError:
        return StoreError(f"store {self.path.parent.parent} failed {doing}: {exc}")


def _decompress(stored: bytes) -> bytes:
    """A row's tree encoding: a zstd frame, or a zlib stream moved in from format 1.
    Raises zstandard.ZstdError, zlib.error or ValueError when it does not decompress."""
    if not stored.startswith(_ZSTD_MAGIC):
        return zlib.decompress(stored)
    size = zstandard.frame_content_size(stored)
    if not 0 <= size <= _MAX_TREE_BYTES:
        raise ValueError(f"frame claims {size} bytes")
    decompressor: zstandard.ZstdDecompressor | None = getattr(_decompressors, "d", None)
    if decompressor is None:  # not thread-safe: one per thread
        decompressor = _decompressors.d = zstandard.ZstdDecompressor()
    return decompressor.decompress(stored)
