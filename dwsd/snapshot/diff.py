"""Differences between two trees of one resource.

Equal tree ids mean equal subtrees, so only the directories on changed paths are read and
no file content is ever read: blobs are compared by id. A file whose content is the same
but whose mode, owner, mtime or xattrs differ is `metadata`; different content (or a
different kind of entry) is `modified`. Added or removed directories are reported with
every entry below them, like `diff -r`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

from dwsd.store.ids import ObjectId
from dwsd.store.objects import ObjectStore
from dwsd.store.tree import DIR, Entry, decode_tree

# "unavailable": the live files of a resource could not be read (its directory is
# missing), so nothing of it was compared; the change has no path and no entries.
Status = Literal["added", "removed", "modified", "metadata", "unavailable"]


@dataclass(frozen=True)
class Change:
    path: bytes          # relative to the resource root
    status: Status
    old: Entry | None
    new: Entry | None

    @property
    def size_delta(self) -> int:
        return (self.new.size if self.new else 0) - (self.old.size if self.old else 0)


def load_entries(objects: ObjectStore, tree: ObjectId | None) -> list[Entry]:
    """Entries of a tree (verified); None is the empty tree."""
    return [] if tree is None else decode_tree(objects.get("trees", tree), tree)


def diff_trees(objects: ObjectStore, old: ObjectId | None, new: ObjectId | None,
               prefix: bytes = b"") -> Iterator[Change]:
    """Changes from tree `old` to tree `new`, in path order (blocks: reads trees)."""
    if old == new:
        return
    olds = {e.name: e for e in load_entries(objects, old)}
    news = {e.name: e for e in load_entries(objects, new)}
    for name in sorted(olds.keys() | news.keys()):
        path = prefix + b"/" + name if prefix else name
        yield from _diff_entry(objects, path, olds.get(name), news.get(name))


def _diff_entry(objects: ObjectStore, path: bytes, old: Entry | None, new: Entry | None
                ) -> Iterator[Change]:
    if old is not None and new is not None and old.kind == new.kind == DIR:
        if not same_metadata(old, new):
            yield Change(path, "metadata", old, new)
        yield from diff_trees(objects, old.ref, new.ref, path)
        return
    if old is not None and new is not None and old.kind == new.kind:
        if same_content(old, new):
            if not same_metadata(old, new):
                yield Change(path, "metadata", old, new)
            return
        yield Change(path, "modified", old, new)
        return
    if old is not None:
        yield from _whole(objects, path, old, "removed")
    if new is not None:
        yield from _whole(objects, path, new, "added")


def _whole(objects: ObjectStore, path: bytes, entry: Entry, status: Status
           ) -> Iterator[Change]:
    yield Change(path, status, entry if status == "removed" else None,
                 entry if status == "added" else None)
    if entry.kind == DIR:
        old, new = (entry.ref, None) if status == "removed" else (None, entry.ref)
        yield from diff_trees(objects, old, new, path)


def same_content(a: Entry, b: Entry) -> bool:
    """Same kind and payload: blob, link target or device number (dirs: same tree)."""
    return (a.kind, a.ref, a.target, a.rdev, a.size) == (b.kind, b.ref, b.target, b.rdev,
                                                         b.size)


def same_metadata(a: Entry, b: Entry) -> bool:
    """Same mode, owner, mtime and xattrs (hard-link grouping is compared elsewhere)."""
    return (a.mode, a.uid, a.gid, a.mtime_ns, a.xattrs) == (b.mode, b.uid, b.gid,
                                                            b.mtime_ns, b.xattrs)
