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

One connection per ObjectStore, shared by its threads (capture, view workers) under a
lock; sqlite3 releases the GIL while it works. Every method blocks.
"""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from dwsd.errors import StoreError
from dwsd.store.ids import ObjectId, id_from_raw, raw_id

FILENAME = "trees.db"
_SCHEMA = "CREATE TABLE IF NOT EXISTS trees (id BLOB PRIMARY KEY, data BLOB NOT NULL)"
# Past a checkpoint the log is cut back to this size, so an idle store does not keep a
# large first snapshot's log on disk.
_WAL_LIMIT = 4 << 20
_BUSY_TIMEOUT_S = 30.0


class TreeDB:
    """The tree table of one store."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._lock = threading.Lock()
        self._closed = False
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
        except sqlite3.Error as exc:
            raise self._error(exc, "opening its tree database") from exc

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
        """The stored bytes of tree `oid`, or None when it is not there."""
        with self._lock:
            try:
                row = self._con.execute("SELECT data FROM trees WHERE id = ?",
                                        (raw_id(oid),)).fetchone()
            except sqlite3.Error as exc:
                raise self._error(exc, "reading a tree") from exc
        return None if row is None else bytes(row[0])

    def has(self, oid: ObjectId) -> bool:
        with self._lock:
            try:
                row = self._con.execute("SELECT 1 FROM trees WHERE id = ?",
                                        (raw_id(oid),)).fetchone()
            except sqlite3.Error as exc:
                raise self._error(exc, "looking up a tree") from exc
        return row is not None

    def insert(self, oid: ObjectId, stored: bytes) -> bool:
        """Add a tree in the open transaction (begun here if none is); True if it was
        not there before."""
        with self._lock:
            try:
                if not self._con.in_transaction:
                    self._con.execute("BEGIN")
                cur = self._con.execute("INSERT OR IGNORE INTO trees (id, data) VALUES (?, ?)",
                                        (raw_id(oid), stored))
            except sqlite3.Error as exc:
                raise self._error(exc, "writing a tree") from exc
        return cur.rowcount == 1

    def delete(self, oid: ObjectId) -> None:
        """Remove a tree in the open transaction (no error when it is not there)."""
        with self._lock:
            try:
                if not self._con.in_transaction:
                    self._con.execute("BEGIN")
                self._con.execute("DELETE FROM trees WHERE id = ?", (raw_id(oid),))
            except sqlite3.Error as exc:
                raise self._error(exc, "removing a tree") from exc

    def commit(self) -> None:
        """Make every insert and delete so far durable (blocks on one fsync)."""
        with self._lock:
            if not self._con.in_transaction:
                return
            try:
                self._con.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise self._error(exc, "committing its trees") from exc

    def ids(self) -> list[ObjectId]:
        """Every tree id stored (committed, or written by this connection)."""
        with self._lock:
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
            self._con.close()
            self._closed = True

    def _rollback(self) -> None:
        try:
            self._con.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite already rolled back (after a full disk, for one)

    def _error(self, exc: sqlite3.Error, doing: str) -> StoreError:
        return StoreError(f"store {self.path.parent.parent} failed {doing}: {exc}")
