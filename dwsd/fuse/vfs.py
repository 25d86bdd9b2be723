"""The view as a model: names -> catalog entries and trees, with an inode table.

No pyfuse3 and no I/O here: every method is plain, never blocks and never awaits, so the
adapter (`ops.py`) can rely on "no await between these lines" around any of them. Trees
are decoded elsewhere (in a worker thread) and handed in with `add_tree`; a method that
needs a tree that is not in the cache raises `TreeNotLoaded` (a bug in the caller: it
must ask `tree_needed` first and load what it names).

Layout::

    /                       ROOT: one directory per tag and per snapshot id, `latest`
    /<tag or id>/           SNAPSHOT: one directory per resource; mtime = snapshot time
    /<tag or id>/<res>/     RESOURCE: the resource's root tree
    /latest -> <id>         LATEST: a symlink to the newest snapshot's directory

Inodes. A node is identified by a key that fixes its content for good, so an inode's
attributes and children never change: a snapshot directory is keyed by (name, snapshot
id), so a tag moved to another snapshot gets a new inode; `latest` is keyed by its
target; a resource directory by (snapshot directory name, snapshot id, resource). These
keep their inode number even after the kernel forgets the node.

Below a resource, the names of a tree directory get their inodes together (`Listed`):
the name at position i of the directory's tree is inode base + i, numbered when the
directory is first listed or looked in, and its Node is made only when a request names
the inode (a walk lists every name and asks about almost none). The directory keeps its
base after the kernel forgets its names, so a path keeps its inode number (the
directory's own is kept by its parent's base, up to the resource's keyed one) as long as
the view runs, for the last KNOWN_DIRECTORIES directories numbered: `find`, `git status`
and the like see the same file between two visits. Hard links (entries with the same
non-zero `ino` in one resource of one snapshot directory) are the exception: they share
the key (resource key, ino), so one inode, kept after a forget like the keys above. A
node lives while the kernel holds a lookup count on it (`lookup` and `children` raise
it, `forget` and `refused` lower it); a directory's block of references lives while any
of its names does. Nodes of a deleted snapshot keep working until forgotten, as long as
their objects exist.
"""
from __future__ import annotations

import bisect
import datetime as dt
import enum
import errno
import itertools
import os
import stat
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Iterator, NamedTuple, NewType, Sequence

from dwsd.store.catalog import Catalog, SnapshotRecord
from dwsd.store.ids import ObjectId
from dwsd.store.tree import DIR, FILE, SYMLINK, Entry, Xattrs, entry_name

Inode = NewType("Inode", int)
ROOT = Inode(1)
LATEST = b"latest"
NAME_MAX = 255
DIR_MODE = 0o755
DEFAULT_TREE_CACHE_ENTRIES = 65536
AHEAD_ENTRIES_VISITED = 256  # entries `neighbour_files` looks at past a file, at most
KNOWN_DIRECTORIES = 1 << 18  # directories whose numbers are kept after a forget (~30 MB)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


# -- errors -----------------------------------------------------------------------------

class ViewError(Exception):
    """A request the view answers with an error; `errno` is what the caller sees."""

    errno = errno.EIO


class NoEntry(ViewError):
    errno = errno.ENOENT


class NotADirectory(ViewError):
    errno = errno.ENOTDIR


class WrongKind(ViewError):
    """Reading a link target of a non-link, opening a non-file, and the like."""

    errno = errno.EINVAL


class NoAttribute(ViewError):
    errno = errno.ENODATA  # ENOATTR on Linux


class TreeNotLoaded(Exception):
    """A method needed tree `oid` and it is not cached: the caller skipped `tree_needed`."""

    def __init__(self, oid: ObjectId) -> None:
        super().__init__(f"tree {oid} is not loaded")
        self.oid = oid


# -- plain data ---------------------------------------------------------------------------

class NodeKind(enum.Enum):
    ROOT = "root"
    SNAPSHOT = "snapshot"
    RESOURCE = "resource"
    LATEST = "latest"
    ENTRY = "entry"


class Attributes(NamedTuple):
    """What stat shows for one inode. atime and ctime are reported equal to mtime.
    (A tuple: one is made for every entry a listing shows, and a frozen dataclass
    costs several times as much to build.)"""

    inode: Inode
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class RootItem(NamedTuple):
    """A name in the root: the snapshot it shows, and whether it is the `latest` link."""

    snapshot_id: str
    is_latest: bool = False


@dataclass(frozen=True)
class RootChange:
    """Root names that appeared, disappeared, or now show another snapshot."""

    appeared: tuple[bytes, ...] = ()
    disappeared: tuple[bytes, ...] = ()
    changed: tuple[bytes, ...] = ()

    @property
    def names(self) -> tuple[bytes, ...]:
        """Every name whose cached kernel entry is now wrong."""
        return self.appeared + self.disappeared + self.changed

    def __bool__(self) -> bool:
        return bool(self.names)


class Neighbours(NamedTuple):
    """A file's neighbours in its directory, for read-ahead: the blob of the regular
    file just before it (None if none) and (blob, size) of those after it."""

    previous: ObjectId | None
    following: list[tuple[ObjectId, int]]


NodeKey = Hashable


@dataclass(slots=True, eq=False)
class Node:
    inode: Inode
    kind: NodeKind
    key: NodeKey
    parent: Inode
    name: bytes
    attrs: Attributes
    record: SnapshotRecord | None = None   # SNAPSHOT, RESOURCE, LATEST
    tree: ObjectId | None = None           # RESOURCE and directory entries
    entry: Entry | None = None             # ENTRY
    resource: NodeKey = None               # key of the resource directory it is in
    target: bytes = b""                    # LATEST
    lookups: int = 0
    # The file's whole content was given to the kernel's page cache (ops: pushed at an
    # open). Its pages go at the latest with the kernel's inode, and so does this node.
    content_pushed: bool = False
    # Names of this directory the kernel looked up one by one (ops lists it ahead).
    looked_up: int = 0


@dataclass(slots=True, eq=False)
class Listed:
    """The inodes of the names in one tree directory: the name at position i is inode
    `base + i` (a hard-linked file's position is unused: it has its keyed inode, see
    `links`), with the kernel's references to it in `counts[i]`. `live` counts the
    positions referenced; at zero the block goes. `directory` is the directory's inode,
    `record` and `resource` what its nodes inherit."""

    base: int
    entries: Sequence[Entry]
    directory: Inode
    record: SnapshotRecord | None
    resource: NodeKey
    links: bool  # some entry is a hard-linked file
    counts: array[int]
    live: int = 0


# -- root names ---------------------------------------------------------------------------

def root_items(catalog: Catalog) -> dict[bytes, RootItem]:
    """The root listing of `catalog`: name -> item. Names are made file-name safe and
    unique (restic-style); ids and `latest` are claimed first so they never change, then
    tags in sorted order get a `-2`, `-3`... suffix on a collision (catalog rules make
    collisions impossible today; this keeps the view sound if the rules ever loosen)."""
    items: dict[bytes, RootItem] = {}
    latest = catalog.latest()
    if latest is not None:
        items[LATEST] = RootItem(latest.id, True)
    for rec in sorted(catalog.snapshots.values(), key=lambda r: r.id):
        items[_unique(items, safe_name(rec.id))] = RootItem(rec.id)
    for tag, snapshot_id in sorted(catalog.tags().items()):
        items[_unique(items, safe_name(tag))] = RootItem(snapshot_id)
    return items


def safe_name(text: str) -> bytes:
    """`text` as one path component: no `/` or NUL, not `.`/`..`/empty, <= NAME_MAX."""
    name = os.fsencode(text).replace(b"/", b"_").replace(b"\0", b"_")
    if name in (b"", b".", b".."):
        name = b"_" + name
    return name[:NAME_MAX]


def _unique(taken: dict[bytes, RootItem], name: bytes) -> bytes:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        suffix = b"-%d" % n
        candidate = name[:NAME_MAX - len(suffix)] + suffix
    return candidate


def time_ns(t: dt.datetime) -> int:
    """An aware datetime as integer nanoseconds since the epoch, exactly."""
    return (t - _EPOCH) // dt.timedelta(microseconds=1) * 1000


# -- tree cache ---------------------------------------------------------------------------

class TreeCache:
    """Decoded trees by id, least recently used first out, bounded by the total number
    of entries (the most recent tree stays even when it alone is larger)."""

    def __init__(self, max_entries: int = DEFAULT_TREE_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._trees: OrderedDict[ObjectId, Sequence[Entry]] = OrderedDict()
        self._size = 0

    def __contains__(self, oid: ObjectId) -> bool:
        return oid in self._trees

    def __len__(self) -> int:
        return len(self._trees)

    @property
    def entries(self) -> int:
        """The number of entries of all cached trees (what `max_entries` bounds)."""
        return self._size

    def get(self, oid: ObjectId) -> Sequence[Entry]:
        """The entries of tree `oid`; raises TreeNotLoaded when it is not cached."""
        try:
            entries = self._trees[oid]
        except KeyError:
            raise TreeNotLoaded(oid) from None
        self._trees.move_to_end(oid)
        return entries

    def put(self, oid: ObjectId, entries: Sequence[Entry]) -> None:
        """Cache a tree's entries (sorted by name, as decoded) and evict the oldest."""
        if oid in self._trees:
            self._trees.move_to_end(oid)
            return
        self._trees[oid] = entries
        self._size += len(entries)
        while self._size > self.max_entries and len(self._trees) > 1:
            _, old = self._trees.popitem(last=False)
            self._size -= len(old)


# -- the view -----------------------------------------------------------------------------

@dataclass
class _Root:
    items: dict[bytes, RootItem] = field(default_factory=dict)
    records: dict[str, SnapshotRecord] = field(default_factory=dict)
    mtime_ns: int = 0


class View:
    """The inode table and name resolution of the read-only view.

    Synthetic directories (root, snapshots, resources) belong to `uid`/`gid` with mode
    0755; everything below a resource has the captured metadata. Raises ViewError
    subclasses for requests the view refuses, TreeNotLoaded for caller bugs.
    """

    def __init__(self, *, uid: int, gid: int,
                 tree_cache_entries: int = DEFAULT_TREE_CACHE_ENTRIES) -> None:
        self.uid = uid
        self.gid = gid
        self.trees = TreeCache(tree_cache_entries)
        self._root = _Root()
        root = Node(ROOT, NodeKind.ROOT, "root", ROOT, b"", self._root_attrs(), lookups=1)
        self._nodes: dict[Inode, Node] = {ROOT: root}
        self._by_key: dict[NodeKey, Inode] = {"root": ROOT}
        self._next_inode = ROOT + 1
        # Blocks of inodes of tree directories' names: the live ones by directory inode
        # and by base, and the nodes made of their positions. A directory keeps its base
        # when its block goes (`_known_bases`; past KNOWN_DIRECTORIES, the least recently
        # listed are forgotten), so its names get the same numbers when the kernel looks
        # them up again. `_bases` holds every base known or live, sorted (numbers only
        # grow).
        self._listed: dict[Inode, Listed] = {}
        self._by_base: dict[int, Listed] = {}
        self._known_bases: dict[Inode, int] = {}
        self._bases: list[int] = []
        self._listed_nodes: dict[Inode, Node] = {}
        self._listed_live = 0  # positions referenced, in all blocks

    # -- catalog ------------------------------------------------------------------------

    def refresh(self, catalog: Catalog, mtime_ns: int | None = None) -> RootChange:
        """Show `catalog` from now on; return which root names changed. `mtime_ns` is the
        root's new mtime (default: the newest snapshot's time)."""
        old = self._root.items
        new = root_items(catalog)
        latest = catalog.latest()
        if mtime_ns is None:
            mtime_ns = time_ns(latest.time) if latest is not None else 0
        self._root = _Root(new, dict(catalog.snapshots), mtime_ns)
        self._nodes[ROOT].attrs = self._root_attrs()
        return RootChange(
            appeared=tuple(sorted(n for n in new if n not in old)),
            disappeared=tuple(sorted(n for n in old if n not in new)),
            changed=tuple(sorted(n for n in new if n in old and new[n] != old[n])))

    def _root_attrs(self) -> Attributes:
        dirs = sum(1 for item in self._root.items.values() if not item.is_latest)
        return Attributes(ROOT, stat.S_IFDIR | DIR_MODE, 2 + dirs, self.uid, self.gid, 0,
                          self._root.mtime_ns)

    # -- the inode table ----------------------------------------------------------------

    def node(self, inode: int) -> Node:
        """The node of a live inode; raises NoEntry for an unknown (forgotten) one."""
        node = self._live(Inode(inode))
        if node is None:
            raise NoEntry(f"no inode {inode}")
        return node

    def _live(self, inode: Inode) -> Node | None:
        """The node of a live inode, made now if it is a listed name's; else None."""
        node = self._nodes.get(inode)
        if node is not None:
            return node
        node = self._listed_nodes.get(inode)
        if node is not None:
            return node
        listed = self._listed_at(inode)
        if listed is None or not listed.counts[inode - listed.base]:
            return None
        entry = listed.entries[inode - listed.base]
        node = self._listed_nodes[inode] = Node(
            inode, NodeKind.ENTRY, None, listed.directory, entry.name,
            entry_attributes(inode, entry), listed.record,
            entry.ref if entry.kind == DIR else None, entry, listed.resource)
        return node

    def _listed_at(self, inode: int) -> Listed | None:
        """The block that numbers `inode`, if any."""
        i = bisect.bisect_right(self._bases, inode) - 1
        if i < 0:
            return None
        listed = self._by_base.get(self._bases[i])  # None: that block is gone
        return listed if listed is not None and inode < listed.base + len(listed.entries) \
            else None

    def lookups(self, inode: int) -> int:
        """The kernel's references to `inode` as counted here (0 if unknown)."""
        listed = self._listed_at(inode) if inode not in self._nodes else None
        if listed is not None:
            return int(listed.counts[inode - listed.base])
        node = self._nodes.get(Inode(inode))
        return node.lookups if node is not None else 0

    def getattr(self, inode: int) -> Attributes:
        return self.node(inode).attrs

    def lookup(self, parent: int, name: bytes) -> Attributes:
        """Resolve `name` in directory `parent` and count one kernel reference to it."""
        node = self.node(parent)
        if node.tree is not None:
            entries = self.trees.get(node.tree)
            i = bisect.bisect_left(entries, name, key=entry_name)
            if i == len(entries) or entries[i].name != name:
                raise NoEntry(name)
            return self._take(node, entries, i)
        child = self._child(node, name)
        child.lookups += 1
        return child.attrs

    def _take(self, directory: Node, entries: Sequence[Entry], i: int) -> Attributes:
        """Count a kernel reference to the name at position `i` of tree directory
        `directory` and return its attributes."""
        entry = entries[i]
        if entry.ino and entry.kind == FILE:
            node = self._entry_node(directory, entry)
            node.lookups += 1
            return node.attrs
        listed = self.listed(directory.inode)
        inode = Inode(listed.base + i)
        self.count_listed(listed, i, i + 1)
        made = self._listed_nodes.get(inode)
        return made.attrs if made is not None else entry_attributes(inode, entry)

    def dot_lookup(self, parent: int, name: bytes) -> Inode:
        """`.` or `..` of directory `parent` (counted like `lookup`). `..` of a node
        whose parent was forgotten is refused with NoEntry."""
        node = self.node(parent)
        target = self.node(node.inode if name == b"." else node.parent)
        listed = self._listed_at(target.inode) if target.inode in self._listed_nodes else None
        if listed is not None:
            position = target.inode - listed.base
            self.count_listed(listed, position, position + 1)
        else:
            target.lookups += 1
        return target.inode

    def volatile(self, inode: int) -> bool:
        """True for the root and its names, which follow the catalog; everything below
        a snapshot directory is immutable."""
        node = self._nodes.get(Inode(inode))
        if node is None:
            return self._listed_at(inode) is None
        return node.inode == ROOT or node.parent == ROOT

    def refused(self, inode: int) -> None:
        """Take back the reference `children` counted for an entry the kernel did not
        take (its reply buffer was full); the node goes if nothing else holds it."""
        self.forget(inode, 1)

    def forget(self, inode: int, count: int) -> None:
        """Lower a node's lookup count; at zero the node goes. Never raises."""
        node = self._nodes.get(Inode(inode))
        if node is None:
            self._forget_listed(inode, count)
            return
        if node.inode == ROOT:
            return
        node.lookups -= count
        if node.lookups <= 0:
            self._drop(node)

    def _forget_listed(self, inode: int, count: int) -> None:
        listed = self._listed_at(inode)
        if listed is None:
            return
        i = inode - listed.base
        held = listed.counts[i]
        if not held:
            return
        listed.counts[i] = max(0, held - count)
        if listed.counts[i]:
            return
        self._listed_nodes.pop(Inode(inode), None)
        listed.live -= 1
        self._listed_live -= 1
        self.release_if_unused(listed)

    def count_listed(self, listed: Listed, start: int, stop: int) -> None:
        """One kernel reference for each position in [start, stop) of block `listed`
        (names the kernel took; none is a hard link)."""
        counts, before = listed.counts, listed.live
        for i in range(start, stop):
            if not counts[i]:
                listed.live += 1
            counts[i] += 1
        self._listed_live += listed.live - before

    def listed(self, inode: int) -> Listed:
        """The block of inodes of tree directory `inode`'s names, numbered now if it has
        none (its tree must be cached). A caller that counts no reference in a new block
        hands it to `release_if_unused`."""
        listed = self._listed.get(Inode(inode))
        if listed is not None:
            return listed
        directory = self.node(inode)
        assert directory.tree is not None
        entries = self.trees.get(directory.tree)
        base = self._known_bases.pop(directory.inode, None)
        if base is not None:
            self._known_bases[directory.inode] = base  # listed again: newest
        else:
            base = self._known_bases[directory.inode] = self._next_inode
            self._next_inode += max(1, len(entries))
            self._bases.append(base)
            if len(self._known_bases) > KNOWN_DIRECTORIES:
                self._forget_oldest_bases()
        listed = Listed(base, entries, directory.inode, directory.record,
                        directory.resource, any(e.ino and e.kind == FILE for e in entries),
                        array("I", bytes(4 * len(entries))))
        self._listed[directory.inode] = listed
        self._by_base[base] = listed
        return listed

    def _forget_oldest_bases(self) -> None:
        """Forget the bases of the eighth of the directories known that were listed
        longest ago (their names get new numbers when listed again), bounding the
        memory of numbers."""
        for directory in list(itertools.islice(self._known_bases, KNOWN_DIRECTORIES // 8)):
            del self._known_bases[directory]
        self._bases = sorted(set(self._known_bases.values()) | set(self._by_base))

    def release_if_unused(self, listed: Listed) -> None:
        """Drop a block none of whose names the kernel holds (again: nothing); its
        directory keeps its base (see `_known_bases`)."""
        if listed.live or self._by_base.get(listed.base) is not listed:
            return
        if self._listed.get(listed.directory) is listed:
            del self._listed[listed.directory]
        del self._by_base[listed.base]

    def _drop(self, node: Node) -> None:
        # Keyed nodes (snapshot and resource directories, `latest`, hard-link groups)
        # keep their numbers in `_by_key`: the kernel may forget an inode between a
        # client's visits to two names of one hard-linked file (memory pressure,
        # drop_caches), and tar or rsync -H would then see two files. They are few, so
        # the map stays small.
        del self._nodes[node.inode]

    def __len__(self) -> int:
        """Number of live inodes (the root included)."""
        return len(self._nodes) + self._listed_live

    # -- directories --------------------------------------------------------------------

    def tree_needed(self, inode: int) -> ObjectId | None:
        """The tree to load before listing or looking up in `inode`, or None when nothing
        needs loading (not a tree directory, or already cached)."""
        node = self.node(inode)
        if node.tree is not None and node.tree not in self.trees:
            return node.tree
        return None

    def add_tree(self, oid: ObjectId, entries: Sequence[Entry]) -> None:
        """Cache a decoded tree (from `decode_tree`)."""
        self.trees.put(oid, entries)

    def uncached_subtrees(self, oid: ObjectId, limit: int) -> list[ObjectId]:
        """Up to `limit` trees of the subdirectories in tree `oid` that are not cached,
        in name order: what a walk entering them would load next. Empty when tree `oid`
        is not cached."""
        if oid not in self.trees:
            return []
        needed: list[ObjectId] = []
        for entry in self.trees.get(oid):
            if len(needed) == limit:
                break
            if entry.kind == DIR and entry.ref is not None and entry.ref not in self.trees:
                needed.append(entry.ref)
        return needed

    def neighbour_files(self, inode: int, ahead: int) -> Neighbours:
        """The regular files next to file `inode`: the blob of the one before it in its
        directory, and (blob, size) of up to `ahead` after it in the order a reader
        copying the resource meets them (depth first, by name: `cp -r`, `tar`, sorted
        paths), into the subdirectories after it and on past its directory's end. Trees
        not cached are passed over. Nothing when its directory's tree is not cached."""
        node = self.node(inode)
        parent = self._live(node.parent)
        if parent is None or parent.tree is None or parent.tree not in self.trees:
            return Neighbours(None, [])
        entries = self.trees.get(parent.tree)
        i = bisect.bisect_left(entries, node.name, key=entry_name)
        previous = next((e.ref for e in reversed(entries[max(0, i - 8):i])
                         if e.kind == FILE and e.ref is not None), None)
        after = self._files_after(parent, i + 1)
        return Neighbours(previous, list(itertools.islice(after, ahead)))

    def _files_after(self, directory: Node, start: int) -> Iterator[tuple[ObjectId, int]]:
        """(blob, size) of the files from position `start` of tree directory
        `directory` on, depth first, then of those after it in its parents' trees up to
        its resource's root. Looks at AHEAD_ENTRIES_VISITED entries at most: a tree of
        empty directories must not make one open scan thousands."""
        visited = 0
        while True:
            assert directory.tree is not None
            stack: list[Iterator[Entry]] = [
                itertools.islice(self.trees.get(directory.tree), start, None)]
            while stack:
                entry = next(stack[-1], None)
                if entry is None:
                    stack.pop()
                    continue
                visited += 1
                if visited > AHEAD_ENTRIES_VISITED:
                    return
                if entry.ref is None:
                    continue
                if entry.kind == FILE:
                    yield entry.ref, entry.size
                elif entry.kind == DIR and entry.ref in self.trees:
                    stack.append(iter(self.trees.get(entry.ref)))
            parent = self._live(directory.parent)
            if parent is None or parent.tree is None or parent.tree not in self.trees:
                return
            start = bisect.bisect_right(self.trees.get(parent.tree), directory.name,
                                        key=entry_name)
            directory = parent

    def listdir(self, inode: int) -> list[bytes]:
        """The names in directory `inode`, sorted (a new list: callers may keep it)."""
        node = self.node(inode)
        if node.kind is NodeKind.ROOT:
            return sorted(self._root.items)
        if node.kind is NodeKind.SNAPSHOT:
            assert node.record is not None
            return sorted(safe_name(r) for r in node.record.resources)
        if node.tree is not None:
            return [e.name for e in self.trees.get(node.tree)]
        raise NotADirectory(f"inode {inode} is not a directory")

    def children(self, inode: int, names: Sequence[bytes], start: int
                 ) -> Iterator[tuple[int, bytes, Attributes]]:
        """(position, name, attributes) for `names[start:]`, where `names` is a listing
        of directory `inode` from `listdir`. Counts one kernel reference for each entry
        as it is yielded, as `lookup` does (READDIRPLUS gives the kernel one): readdir
        calls `refused` for an entry the kernel did not take. Names gone since the
        listing was taken (root names only) are skipped. A tree directory is listed by
        position, with no search per name: its listing is its tree's names in order, and
        a tree never changes. (A walk meets every name here: keep the loop lean.)"""
        parent = self.node(inode)
        if parent.tree is None:
            for index in range(start, len(names)):
                try:
                    node = self._child(parent, names[index])
                except NoEntry:
                    continue
                node.lookups += 1
                yield index, names[index], node.attrs
            return
        entries = self.trees.get(parent.tree)
        for index in range(start, len(entries)):
            yield index, entries[index].name, self._take(parent, entries, index)

    def _child(self, parent: Node, name: bytes) -> Node:
        """The node of `name` in a root or snapshot directory (tree directories number
        their names in blocks: see `_take`)."""
        if parent.kind is NodeKind.ROOT:
            return self._root_child(name)
        if parent.kind is NodeKind.SNAPSHOT:
            return self._resource_child(parent, name)
        raise NotADirectory(f"{self.describe(parent.inode)} is not a directory")

    def _root_child(self, name: bytes) -> Node:
        item = self._root.items.get(name)
        if item is None:
            raise NoEntry(name)
        rec = self._root.records[item.snapshot_id]
        mtime = time_ns(rec.time)
        if item.is_latest:
            key: NodeKey = ("latest", rec.id)
            inode, node = self._find(key)
            if node is None:
                target = safe_name(rec.id)
                node = self._add(Node(
                    inode, NodeKind.LATEST, key, ROOT, name,
                    Attributes(inode, stat.S_IFLNK | 0o777, 1, self.uid, self.gid,
                               len(target), mtime),
                    record=rec, target=target))
            return node
        key = ("snapshot", name, rec.id)
        inode, node = self._find(key)
        if node is None:
            node = self._add(Node(
                inode, NodeKind.SNAPSHOT, key, ROOT, name,
                Attributes(inode, stat.S_IFDIR | DIR_MODE, 2 + len(rec.resources),
                           self.uid, self.gid, 0, mtime),
                record=rec))
        return node

    def _resource_child(self, parent: Node, name: bytes) -> Node:
        rec = parent.record
        assert rec is not None
        resource = next((r for r in rec.resources if safe_name(r) == name), None)
        if resource is None:
            raise NoEntry(name)
        key = ("resource", parent.name, rec.id, name)
        inode, node = self._find(key)
        if node is None:
            # The resource's own directory as captured; the synthetic defaults only for
            # snapshots recorded without it.
            mode, uid, gid, mtime = rec.root_meta.get(
                resource, (DIR_MODE, self.uid, self.gid, time_ns(rec.time)))
            node = self._add(Node(
                inode, NodeKind.RESOURCE, key, parent.inode, name,
                Attributes(inode, stat.S_IFDIR | mode, 1, uid, gid, 0, mtime),
                record=rec, tree=rec.resources[resource], resource=key))
        return node

    def _entry_node(self, parent: Node, entry: Entry) -> Node:
        """The node of hard-linked file `entry`, a name in tree directory `parent`,
        shared by every name of its link group in the resource; made on first use."""
        inode, node = self._find(("link", parent.resource, entry.ino))
        if node is None:
            node = self._add(Node(
                inode, NodeKind.ENTRY, ("link", parent.resource, entry.ino), parent.inode,
                entry.name, entry_attributes(inode, entry), parent.record, None, entry,
                parent.resource))
        return node

    def _find(self, key: NodeKey) -> tuple[Inode, Node | None]:
        """The inode number of `key` (a new one the first time) and its live node, None
        when there is none: the caller makes it and `_add`s it."""
        inode = self._by_key.get(key)
        if inode is None:
            inode = self._by_key[key] = Inode(self._next_inode)
            self._next_inode += 1
            return inode, None
        return inode, self._nodes.get(inode)

    def _add(self, node: Node) -> Node:
        self._nodes[node.inode] = node
        return node

    # -- leaves -------------------------------------------------------------------------

    def readlink(self, inode: int) -> bytes:
        """A symlink's target, verbatim."""
        node = self.node(inode)
        if node.kind is NodeKind.LATEST:
            return node.target
        if node.entry is not None and node.entry.kind == SYMLINK:
            return node.entry.target
        raise WrongKind(f"{self.describe(inode)} is not a symbolic link")

    def blob(self, inode: int) -> ObjectId:
        """The content blob of a regular file."""
        entry = self.node(inode).entry
        if entry is None or entry.kind != FILE or entry.ref is None:
            raise WrongKind(f"{self.describe(inode)} is not a regular file")
        return entry.ref

    def xattrs(self, inode: int) -> Xattrs:
        """The captured extended attributes (name, value), sorted by name."""
        entry = self.node(inode).entry
        return entry.xattrs if entry is not None else ()

    def getxattr(self, inode: int, name: bytes) -> bytes:
        for xname, value in self.xattrs(inode):
            if xname == name:
                return value
        raise NoAttribute(name)

    def path(self, inode: int) -> bytes | None:
        """The path of `inode` below the mount (b"" for the root), or None when a
        directory on the way is no longer known here."""
        parts, whole = self._path_parts(inode)
        return b"/".join(parts) if whole else None

    def describe(self, inode: int) -> str:
        """A best-effort path of `inode` below the mount, for log lines."""
        parts, whole = self._path_parts(inode)
        return ("" if whole else ".../") + os.fsdecode(b"/".join(parts))

    def _path_parts(self, inode: int) -> tuple[list[bytes], bool]:
        """The names from the root down to `inode`, and whether they reach the root."""
        parts: list[bytes] = []
        node = self._live(Inode(inode))
        while node is not None and node.inode != ROOT:
            parts.append(node.name)
            node = self._live(node.parent)
        parts.reverse()
        return parts, node is not None


def entry_attributes(inode: Inode, entry: Entry) -> Attributes:
    """Attributes of a captured entry. Directories report nlink 1 ("unknown", as btrfs
    does: counting subdirectories would mean loading the child tree). Hard-linked files
    report 2: trees record the link group, not its size."""
    nlink = 2 if entry.ino and entry.kind == FILE else 1
    return Attributes(inode, entry.st_mode, nlink, entry.uid, entry.gid, entry.size,
                      entry.mtime_ns, entry.rdev)
