"""`Store`: one store directory: format file, writer lock, objects, catalog, capture state.

Layout::

    <store>/format            "dwsd-store <version>"
    <store>/lock              flock'ed by the single writer, holds its pid
    <store>/catalog.json      every snapshot record (see catalog.py)
    <store>/objects/          blobs/ and trees.db (see objects.py)
    <store>/state/            per-resource capture state (stat cache, last root tree)
    <store>/journal/          unfinished restores

A writer opens with `Store.open(path, create=...)`; readers (the view, `check` on a live
store) use `readonly=True`, take no lock and never write.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Iterator

from dwsd.errors import InvalidIdError, StoreError
from dwsd.store.catalog import Catalog
from dwsd.store.fsutil import atomic_write, clean_temps
from dwsd.store.lock import StoreLock
from dwsd.store.ids import ObjectId, validate_object_id
from dwsd.store.objects import ObjectStore
from dwsd.store.treedb import FILENAME as TREE_DB

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
_FORMAT_TEXT = f"dwsd-store {FORMAT_VERSION}\n"
# Format 1 kept each tree in a file of its own; a writer moves them into trees.db.
_FORMAT_1_TEXT = "dwsd-store 1\n"


class Store:
    def __init__(self, root: Path, lock: StoreLock | None) -> None:
        self.root = root
        self._lock = lock
        self.objects = ObjectStore(root / "objects", readonly=lock is None)
        self.catalog = Catalog.load(root / "catalog.json")
        self.state_dir = root / "state"
        self.journal_dir = root / "journal"

    @property
    def readonly(self) -> bool:
        return self._lock is None

    @classmethod
    def open(cls, root: Path | str, *, create: bool = False, readonly: bool = False
             ) -> "Store":
        """Open a store (blocks). Creates it when `create` and absent. A writer takes the
        lock and clears temp files a crash may have left. Raises StoreError."""
        root = Path(root)
        if not (root / "format").exists():
            if not create or readonly:
                raise StoreError(f"{root} is not a dwsd store (no format file)")
            _initialise(root)
        lock = None
        if not readonly:
            lock = StoreLock(root / "lock")
            lock.acquire()
        try:
            if lock is not None and (root / "format").read_text() == _FORMAT_1_TEXT:
                upgrade_format_1(root)
            _check_format(root)
            store = cls(root, lock)
            if lock is not None:
                store.objects.clean_temps()
                clean_temps(root)
                clean_temps(store.state_dir)
        except BaseException:
            if lock is not None:  # an unreadable catalog must not leave the store locked
                lock.release()
            raise
        return store

    def close(self) -> None:
        self.objects.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reload_catalog(self) -> None:
        self.catalog = Catalog.load(self.root / "catalog.json")

    @contextlib.contextmanager
    def changing_catalog(self) -> Iterator[Catalog]:
        """Change the catalog and commit it; on any error the in-memory catalog is put
        back as it is on disk, so memory and disk never disagree."""
        self._require_writer()
        try:
            yield self.catalog
            self.catalog.commit()
        except BaseException:
            self.reload_catalog()
            raise

    def _require_writer(self) -> None:
        if self._lock is None:
            raise StoreError(f"store {self.root} is open read-only")


def _initialise(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    ObjectStore.create(root / "objects")
    (root / "state").mkdir(exist_ok=True)
    (root / "journal").mkdir(exist_ok=True)
    atomic_write(root / "format", _FORMAT_TEXT.encode())


def upgrade_format_1(root: Path) -> None:
    """Move a format-1 store's tree files into trees.db, then say format 2 (the writer
    holds the lock). Safe to run again after a crash at any point: rows are inserted or
    ignored and committed before any tree file is removed, and the format file changes
    last."""
    objects = root / "objects"
    tree_dir = objects / "trees"
    ObjectStore.create(objects)
    legacy = ObjectStore(objects)
    moved = 0
    try:
        for path in sorted(tree_dir.glob("??/*")):
            oid = path.parent.name + path.name
            if _is_object_name(oid):
                legacy.trees.insert_stored(ObjectId(oid), path.read_bytes())
                moved += 1
        legacy.trees.commit()
    finally:
        legacy.close()
    if tree_dir.exists():
        shutil.rmtree(tree_dir)
    atomic_write(root / "format", _FORMAT_TEXT.encode())
    log.info("store %s upgraded to format %d (%d trees moved into %s)", root,
             FORMAT_VERSION, moved, TREE_DB)


def _is_object_name(name: str) -> bool:
    try:
        validate_object_id(name)
        return True
    except InvalidIdError:
        return False


def _check_format(root: Path) -> None:
    text = (root / "format").read_text()
    if text == _FORMAT_1_TEXT:
        raise StoreError(f"{root} has store format 1; start dwsd on it once to upgrade it "
                         f"to format {FORMAT_VERSION}")
    if text != _FORMAT_TEXT:
        raise StoreError(f"{root} has store format {text.strip()!r}; this dwsd reads "
                         f"{_FORMAT_TEXT.strip()!r}")
