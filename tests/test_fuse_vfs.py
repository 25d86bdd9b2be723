"""The view model (`dwsd.fuse.vfs`) alone: names, inodes, lookup counts, refresh. No
pyfuse3, no mount, no I/O: catalogs and trees are built in memory."""
from __future__ import annotations

import datetime as dt
import errno
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from dwsd.fuse import vfs as vfs_module
from dwsd.fuse.vfs import AHEAD_ENTRIES_VISITED, LATEST, ROOT, Attributes, NoAttribute, \
    NoEntry, NotADirectory, TreeCache, TreeNotLoaded, View, WrongKind, root_items, \
    safe_name, time_ns
from dwsd.store.catalog import Catalog, SnapshotRecord
from dwsd.store.ids import ObjectId
from dwsd.store.tree import DIR, FILE, SYMLINK, Entry

T0 = dt.datetime(2026, 11, 22, 10, 30, 5, 123456, tzinfo=dt.timezone.utc)
ROOT_TREE = ObjectId("1" * 64)
SUB_TREE = ObjectId("2" * 64)
BLOB = ObjectId("3" * 64)
OTHER_ROOT = ObjectId("4" * 64)

ROOT_ENTRIES = [
    Entry(b"a.txt", FILE, 0o644, 1000, 1000, 111, size=5, ref=BLOB, ino=7,
          xattrs=((b"user.k", b"v"),)),
    Entry(b"link", SYMLINK, 0o777, 0, 0, 222, size=3, target=b"../x"),
    Entry(b"sub", DIR, 0o750, 0, 0, 333, ref=SUB_TREE),
]
SUB_ENTRIES = [Entry(b"b.txt", FILE, 0o600, 1000, 1000, 444, size=5, ref=BLOB, ino=7)]


def record(sid: str, time: dt.datetime, tags: tuple[str, ...] = (),
           resources: dict[str, ObjectId] | None = None) -> SnapshotRecord:
    return SnapshotRecord(id=sid, hash=ObjectId(sid[-1] * 64), number=0, kind="manual",
                          tags=tags, message="", hostname="h", time=time,
                          resources=resources or {"data": ROOT_TREE})


def catalog(*records: SnapshotRecord) -> Catalog:
    cat = Catalog(Path("/nonexistent/catalog.json"))
    for rec in records:
        cat.snapshots[rec.id] = rec
    return cat


FIRST = record("20261122T103005Z", T0, ("v1",))
SECOND = record("20261122T110000Z", T0 + dt.timedelta(minutes=30), (),
                {"data": OTHER_ROOT, "code": ROOT_TREE})


@pytest.fixture
def view() -> View:
    v = View(uid=42, gid=43)
    v.refresh(catalog(FIRST, SECOND))
    return v


def walk(view: View, *names: bytes) -> int:
    """Look up a path from the root, loading the in-memory trees as ops would."""
    inode = ROOT
    for name in names:
        needed = view.tree_needed(inode)
        if needed is not None:
            view.add_tree(needed, {ROOT_TREE: ROOT_ENTRIES, SUB_TREE: SUB_ENTRIES,
                                   OTHER_ROOT: []}[needed])
        inode = view.lookup(inode, name).inode
    return inode


def test_root_lists_tags_ids_and_latest_from_the_catalog_alone(view: View) -> None:
    assert view.listdir(ROOT) == sorted([b"v1", FIRST.id.encode(), SECOND.id.encode(),
                                         LATEST])
    for name in view.listdir(ROOT):
        view.lookup(ROOT, name)
    assert len(view.trees) == 0


def test_latest_is_a_symlink_to_the_newest_id(view: View) -> None:
    latest = view.lookup(ROOT, LATEST)
    assert stat.S_ISLNK(latest.mode)
    assert view.readlink(latest.inode) == SECOND.id.encode()
    assert latest.size == len(SECOND.id)


def test_snapshot_directory_has_the_snapshot_time_and_one_dir_per_resource(
        view: View) -> None:
    attrs = view.lookup(ROOT, SECOND.id.encode())
    assert attrs.is_dir and attrs.mtime_ns == time_ns(SECOND.time)
    assert (attrs.uid, attrs.gid) == (42, 43)
    assert view.listdir(attrs.inode) == [b"code", b"data"]


def test_time_ns_is_exact() -> None:
    assert time_ns(T0) == 1795343405_123456000


def test_a_tree_loads_only_when_its_directory_is_entered(view: View) -> None:
    resource = view.lookup(view.lookup(ROOT, b"v1").inode, b"data").inode
    assert view.tree_needed(resource) == ROOT_TREE
    with pytest.raises(TreeNotLoaded):
        view.lookup(resource, b"a.txt")
    view.add_tree(ROOT_TREE, ROOT_ENTRIES)
    assert view.tree_needed(resource) is None
    assert view.listdir(resource) == [b"a.txt", b"link", b"sub"]


def test_entries_carry_their_captured_attributes(view: View) -> None:
    attrs = view.getattr(walk(view, b"v1", b"data", b"sub"))
    assert stat.S_ISDIR(attrs.mode) and stat.S_IMODE(attrs.mode) == 0o750
    assert (attrs.uid, attrs.mtime_ns, attrs.nlink) == (0, 333, 1)
    link = walk(view, b"v1", b"data", b"link")
    assert view.readlink(link) == b"../x"


def test_hard_links_share_one_inode_within_a_resource(view: View) -> None:
    a = walk(view, b"v1", b"data", b"a.txt")
    b = walk(view, b"v1", b"data", b"sub", b"b.txt")
    assert a == b and view.getattr(a).nlink == 2
    through_id = walk(view, FIRST.id.encode(), b"data", b"a.txt")
    assert through_id != a  # another directory tree: distinct inodes


def test_a_hard_link_keeps_its_inode_number_after_the_kernel_forgets_it(
        view: View) -> None:
    snapshot = walk(view, b"v1")
    resource = walk(view, b"v1", b"data")
    a = walk(view, b"v1", b"data", b"a.txt")
    for inode in (a, resource, snapshot):  # the kernel drops the whole path
        view.forget(inode, view.lookups(inode))
    with pytest.raises(NoEntry):
        view.getattr(a)
    assert walk(view, b"v1", b"data", b"sub", b"b.txt") == a


def test_the_same_name_looked_up_twice_is_the_same_inode(view: View) -> None:
    assert walk(view, b"v1", b"data", b"sub") == walk(view, b"v1", b"data", b"sub")


def test_forget_to_zero_drops_the_node_and_a_new_lookup_works(view: View) -> None:
    inode = walk(view, b"v1", b"data", b"link")
    view.lookup(view.node(inode).parent, b"link")
    view.forget(inode, 1)
    assert view.readlink(inode) == b"../x"
    view.forget(inode, 1)
    with pytest.raises(NoEntry):
        view.getattr(inode)
    again = walk(view, b"v1", b"data", b"link")
    assert view.readlink(again) == b"../x"


def test_forget_of_an_unknown_inode_or_the_root_is_harmless(view: View) -> None:
    view.forget(999, 3)
    view.forget(ROOT, 5)
    assert view.getattr(ROOT).is_dir


def root_child(view: View, name: bytes) -> Attributes:
    """The attributes `children` gives for one root name (one reference counted)."""
    ((_, _, attrs),) = view.children(ROOT, [name], 0)
    return attrs


def test_children_count_a_reference_that_refused_takes_back(view: View) -> None:
    before = len(view)
    attrs = root_child(view, b"v1")
    view.refused(attrs.inode)
    assert len(view) == before
    attrs = root_child(view, b"v1")
    root_child(view, b"v1")
    view.refused(attrs.inode)
    assert view.getattr(attrs.inode) == attrs
    view.forget(attrs.inode, 1)
    assert len(view) == before


def test_children_are_what_lookup_gives_from_any_position(view: View) -> None:
    resource = walk(view, b"v1", b"data")
    view.add_tree(ROOT_TREE, ROOT_ENTRIES)
    names = view.listdir(resource)
    listed = list(view.children(resource, names, 1))
    assert [(i, name) for i, name, _ in listed] == [(1, b"link"), (2, b"sub")]
    assert [view.lookups(a.inode) for _, _, a in listed] == [1, 1]
    assert [attrs for _, _, attrs in listed] == [view.lookup(resource, n) for n in names[1:]]


def test_a_name_listed_then_looked_up_is_one_inode_with_two_references(
        view: View) -> None:
    resource = walk(view, b"v1", b"data")
    view.add_tree(ROOT_TREE, ROOT_ENTRIES)
    listed = {name: attrs for _, name, attrs in
              view.children(resource, view.listdir(resource), 0)}
    sub = view.lookup(resource, b"sub")
    assert sub == listed[b"sub"] and view.lookups(sub.inode) == 2
    view.forget(sub.inode, 1)
    assert view.getattr(sub.inode) == sub  # one reference left
    view.forget(sub.inode, 1)
    with pytest.raises(NoEntry):
        view.getattr(sub.inode)


def test_a_path_keeps_its_inode_number_after_the_kernel_forgets_it(view: View) -> None:
    resource = walk(view, b"v1", b"data")
    view.add_tree(ROOT_TREE, ROOT_ENTRIES)
    before = len(view)
    first = {name: a.inode for _, name, a in
             view.children(resource, view.listdir(resource), 0)}
    sub = first[b"sub"]
    view.add_tree(SUB_TREE, SUB_ENTRIES)
    assert len(view) == before + 3
    for inode in first.values():
        view.forget(inode, view.lookups(inode))
    assert len(view) == before
    with pytest.raises(NoEntry):
        view.getattr(sub)
    again = {name: a.inode for _, name, a in
             view.children(resource, view.listdir(resource), 0)}
    assert again == first  # the same numbers: find or git see the same files


def test_the_numbers_of_the_oldest_directories_are_forgotten_past_the_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vfs_module, "KNOWN_DIRECTORIES", 16)
    many = [Entry(b"d%04d" % i, DIR, 0o755, 0, 0, 0, ref=SUB_TREE) for i in range(100)]
    view = View(uid=0, gid=0)
    view.refresh(catalog(FIRST))
    resource = walk(view, b"v1", b"data")
    view.add_tree(ROOT_TREE, many)
    view.add_tree(SUB_TREE, [Entry(b"f", FILE, 0o644, 0, 0, 0, ref=BLOB)])
    files = {}
    for e in many:
        d = view.lookup(resource, e.name).inode
        files[e.name] = view.lookup(d, b"f").inode
        view.forget(files[e.name], 1)
        view.forget(d, 1)
    assert len(view._known_bases) <= 16 and len(view._bases) <= 16 + len(view._by_base)
    last = view.lookup(view.lookup(resource, b"d0099").inode, b"f").inode
    assert last == files[b"d0099"]  # still known: the same number
    oldest = view.lookup(view.lookup(resource, b"d0000").inode, b"f").inode
    assert oldest not in files.values()  # forgotten: a new number, never a reused one


def test_a_listed_directory_keeps_working_after_its_tree_leaves_the_cache() -> None:
    view = View(uid=0, gid=0, tree_cache_entries=1)
    view.refresh(catalog(FIRST))
    resource = walk(view, b"v1", b"data")
    view.add_tree(ROOT_TREE, ROOT_ENTRIES)
    sub = view.lookup(resource, b"sub").inode
    view.add_tree(SUB_TREE, SUB_ENTRIES)  # pushes ROOT_TREE out (room for 1 entry)
    assert ROOT_TREE not in view.trees
    assert view.getattr(sub).mode == stat.S_IFDIR | 0o750
    assert view.dot_lookup(sub, b"..") == resource
    assert view.describe(sub) == "v1/data/sub"


def test_children_skip_root_names_gone_since_the_listing(view: View) -> None:
    names = view.listdir(ROOT)
    view.refresh(catalog(SECOND))
    listed = [name for _, name, _ in view.children(ROOT, names, 0)]
    assert listed == [n for n in names if n in view.listdir(ROOT)]
    assert b"v1" not in listed


def test_refresh_reports_appeared_disappeared_and_changed_names() -> None:
    view = View(uid=0, gid=0)
    view.refresh(catalog(FIRST))
    moved = replace(SECOND, tags=("v1",))
    change = view.refresh(catalog(replace(FIRST, tags=()), moved))
    assert change.appeared == (SECOND.id.encode(),)
    assert change.changed == (LATEST, b"v1")
    assert change.disappeared == ()
    change = view.refresh(catalog(moved))
    assert change.disappeared == (FIRST.id.encode(),)
    assert not view.refresh(catalog(moved))


def test_a_moved_tag_gets_a_new_inode(view: View) -> None:
    old = view.lookup(ROOT, b"v1").inode
    view.refresh(catalog(replace(FIRST, tags=()), replace(SECOND, tags=("v1",))))
    new = view.lookup(ROOT, b"v1")
    assert new.inode != old and new.mtime_ns == time_ns(SECOND.time)


def test_a_deleted_snapshot_keeps_working_for_inodes_the_kernel_holds(view: View) -> None:
    file_inode = walk(view, b"v1", b"data", b"a.txt")
    view.refresh(catalog(SECOND))
    with pytest.raises(NoEntry):
        view.lookup(ROOT, b"v1")
    assert view.blob(file_inode) == BLOB


def test_root_names_are_made_safe_and_unique() -> None:
    cat = catalog(record("20261122T103005Z", T0, ("a/b", "..", "a_b")))
    items = root_items(cat)
    assert set(items) == {b"20261122T103005Z", LATEST, b"a_b", b"a_b-2", b"_.."}
    assert safe_name("x" * 300) == b"x" * 255
    assert safe_name("") == b"_"


def test_errors_carry_their_errno(view: View) -> None:
    file_inode = walk(view, b"v1", b"data", b"a.txt")
    with pytest.raises(NotADirectory) as not_dir:
        view.lookup(file_inode, b"x")
    with pytest.raises(WrongKind) as wrong:
        view.readlink(file_inode)
    with pytest.raises(NoAttribute) as no_attr:
        view.getxattr(file_inode, b"user.none")
    with pytest.raises(NoEntry) as missing:
        view.lookup(ROOT, b"nope")
    assert [e.value.errno for e in (not_dir, wrong, no_attr, missing)] == [
        errno.ENOTDIR, errno.EINVAL, errno.ENODATA, errno.ENOENT]
    assert view.getxattr(file_inode, b"user.k") == b"v"


def test_tree_cache_is_bounded_by_entries_and_keeps_the_newest() -> None:
    cache = TreeCache(max_entries=3)
    cache.put(ROOT_TREE, ROOT_ENTRIES)
    cache.put(SUB_TREE, SUB_ENTRIES)
    assert ROOT_TREE not in cache and SUB_TREE in cache
    big = ObjectId("5" * 64)
    cache.put(big, ROOT_ENTRIES * 2)
    assert list(cache._trees) == [big]


def test_describe_names_the_path_for_log_lines(view: View) -> None:
    inode = walk(view, b"v1", b"data", b"sub", b"b.txt")
    assert view.describe(inode) == "v1/data/sub/b.txt"


def test_path_is_exact_or_none_where_describe_guesses(view: View) -> None:
    inode = walk(view, b"v1", b"data", b"sub", b"b.txt")
    sub = view.node(inode).parent
    assert view.path(inode) == b"v1/data/sub/b.txt" and view.path(ROOT) == b""
    view.forget(sub, 1)  # the kernel forgot the directory (not its name b.txt)
    assert view.path(inode) is None
    assert view.describe(inode) == ".../b.txt"


def test_the_model_does_not_import_pyfuse3() -> None:
    code = "import sys, dwsd.fuse.vfs; sys.exit('pyfuse3' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


def test_uncached_subtrees_names_the_child_trees_not_loaded(view: View) -> None:
    tree = view.node(walk(view, b"v1", b"data")).tree
    assert tree is not None
    assert view.uncached_subtrees(tree, 10) == []  # its own tree is not loaded yet
    walk(view, b"v1", b"data", b"link")
    assert view.uncached_subtrees(tree, 10) == [SUB_TREE]
    assert view.uncached_subtrees(tree, 0) == []
    walk(view, b"v1", b"data", b"sub", b"b.txt")
    assert view.uncached_subtrees(tree, 10) == []


def file_entry(name: bytes, blob: ObjectId, size: int = 1) -> Entry:
    return Entry(name, FILE, 0o644, 0, 0, 1, size=size, ref=blob)


def dir_entry(name: bytes, tree: ObjectId) -> Entry:
    return Entry(name, DIR, 0o755, 0, 0, 1, ref=tree)


def test_the_files_after_a_directorys_last_go_on_in_copying_order(view: View) -> None:
    x1, x2, y1, w1, z = [ObjectId(c * 64) for c in "5678a"]
    d1, d2, d3, sub = [ObjectId(c * 64) for c in "bcde"]
    view.add_tree(ROOT_TREE, [dir_entry(b"d1", d1), dir_entry(b"d2", d2),
                              dir_entry(b"d3", d3), file_entry(b"z.txt", z)])
    view.add_tree(d1, [file_entry(b"x1", x1), file_entry(b"x2", x2)])
    view.add_tree(d2, [dir_entry(b"sub", sub), file_entry(b"y1", y1)])
    view.add_tree(sub, [file_entry(b"w1", w1)])  # d3's tree is not cached: passed over
    last = walk(view, b"v1", b"data", b"d1", b"x2")
    assert view.neighbour_files(last, 10) == (x1, [(w1, 1), (y1, 1), (z, 1)])
    assert view.neighbour_files(last, 2) == (x1, [(w1, 1), (y1, 1)])


@pytest.mark.parametrize("empty_dirs", [AHEAD_ENTRIES_VISITED - 10,
                                        AHEAD_ENTRIES_VISITED + 10])
def test_the_files_after_one_are_looked_for_in_a_bounded_number_of_entries(
        view: View, empty_dirs: int) -> None:
    first, last, empty = [ObjectId(c * 64) for c in "567"]
    view.add_tree(empty, [])
    view.add_tree(ROOT_TREE, [file_entry(b"a", first)]
                  + [dir_entry(b"e%04d" % i, empty) for i in range(empty_dirs)]
                  + [file_entry(b"z", last)])
    following = view.neighbour_files(walk(view, b"v1", b"data", b"a"), 10).following
    assert following == ([(last, 1)] if empty_dirs < AHEAD_ENTRIES_VISITED else [])


def test_neighbour_files_skip_other_kinds_and_stop_at_ahead(view: View) -> None:
    blobs = [ObjectId(c * 64) for c in "56789"]
    entries = [Entry(b"f%d" % i, FILE, 0o644, 0, 0, 1, size=i, ref=blob)
               for i, blob in enumerate(blobs)]
    entries.insert(2, Entry(b"f1-dir", DIR, 0o755, 0, 0, 1, ref=SUB_TREE))
    view.add_tree(ROOT_TREE, entries)
    first = walk(view, b"v1", b"data", b"f0")
    assert view.neighbour_files(first, 2) == (None, [(blobs[1], 1), (blobs[2], 2)])
    middle = walk(view, b"v1", b"data", b"f2")
    assert view.neighbour_files(middle, 5) == (blobs[1], [(blobs[3], 3), (blobs[4], 4)])
