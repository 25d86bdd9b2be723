"""The pyfuse3 adapter's handlers called directly (no mount) over a real store."""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import pyfuse3
import pytest
import trio
import trio.testing

from dwsd.fuse import ops as ops_module
from dwsd.fuse.ops import (ROOT_TIMEOUT, SMALL_BLOB, SNAPSHOT_TIMEOUT, ViewOps,
                           read_if_cached)
from dwsd.fuse.vfs import LATEST, ROOT
from dwsd.store.ids import ObjectId
from dwsd.store.store import Store
from dwsd.store.tree import Entry, decode_tree
from tests import trees
from tests.fusehelp import (cached_pages, delete_snapshot, drop_pages, page_vector,
                             take_snapshot, tag_snapshot, wait_until)

TIMEOUT = 10


class Listing:
    """A readdir_reply stand-in that accepts `room` entries, then reports a full
    buffer (a real ReaddirToken exists only inside a mount)."""

    def __init__(self, room: int = 1000) -> None:
        self.room = room
        self.entries: list[tuple[bytes, int, int]] = []

    def __call__(self, token: Any, name: bytes, attrs: pyfuse3.EntryAttributes,
                 next_id: int) -> bool:
        if len(self.entries) >= self.room:
            return False
        self.entries.append((name, attrs.st_ino, next_id))
        return True


def make_source(root: Path) -> Path:
    trees.write(root / "a.txt", b"alpha\n")
    trees.write(root / "sub" / "b.txt", b"beta\n")
    trees.write(root / "sub" / "c.txt", b"gamma\n")
    os.link(root / "a.txt", root / "sub" / "a-link")
    os.setxattr(root / "a.txt", "user.note", b"hi")
    return root


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_source(tmp_path / "src")


@pytest.fixture
def store(tmp_path: Path, source: Path) -> Path:
    """A store of its own, for tests that damage or change it."""
    take_snapshot(tmp_path / "store", {"data": source}, tags=["v1"])
    return tmp_path / "store"


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the tests that only read (stores cost a syncfs to make)."""
    work = tmp_path_factory.mktemp("ops")
    take_snapshot(work / "store", {"data": make_source(work / "src")}, tags=["v1"])
    return work / "store"


@pytest.fixture
def listing() -> Listing:
    return Listing()


def make_ops(store: Path, listing: Listing, **kwargs: Any) -> ViewOps:
    """Handlers over `store`, whose blobs are first dropped from the page cache: opens
    read them in worker threads and read the next ones ahead, as on a cold start."""
    view_ops = ViewOps(Store.open(store, readonly=True), readdir_reply=listing, **kwargs)
    for blob in view_ops.store.objects.iter_ids("blobs"):
        set_blob_cached(view_ops, blob, False)
    view_ops.show_catalog(view_ops.store.catalog)
    return view_ops


# Skip reason for the few tests that need a blob's first open to miss the page cache:
# on a busy machine the page of a blob dropped just before has, rarely, been found
# cached again by the open (seen in about 1 of 25 runs of the FUSE tests while another
# program filled the page cache; the cause was not found).
PAGE_CAME_BACK = "a blob dropped from the page cache was found there at its open"


def set_blob_cached(ops: ViewOps, blob: ObjectId, cached: bool) -> None:
    """Read `blob`'s file into the page cache, or drop its (clean) pages from it."""
    fd = ops.store.objects.open_blob(blob)
    try:
        if cached:
            os.pread(fd, 1 << 20, 0)
        else:
            # A read-ahead that a non-blocking read started (in this test or one
            # before) may still bring pages in: drop until mincore sees none, a while.
            for _ in range(5):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                if cached_pages(ops.store.objects.path("blobs", blob))[0] == 0:
                    break
                time.sleep(0.002)
    finally:
        os.close(fd)


def cached_reads_work(ops: ViewOps, blob: ObjectId) -> bool:
    """Whether the store's filesystem serves non-blocking (RWF_NOWAIT) reads of cached
    pages, which inline opens need: ext4 and xfs do, tmpfs does not."""
    set_blob_cached(ops, blob, True)
    fd = ops.store.objects.open_blob(blob)
    try:
        return read_if_cached(fd, 0, 1) is not None
    finally:
        os.close(fd)


@pytest.fixture
def ops(shared_store: Path, listing: Listing) -> ViewOps:
    return make_ops(shared_store, listing)


@pytest.fixture
def own_ops(store: Path, listing: Listing) -> ViewOps:
    return make_ops(store, listing)


async def resolve(ops: ViewOps, *names: bytes) -> int:
    inode = ROOT
    for name in names:
        inode = (await ops.lookup(inode, name)).st_ino
    return inode


async def read_file(ops: ViewOps, inode: int) -> bytes:
    info = await ops.open(inode, os.O_RDONLY)
    try:
        return await ops.read(info.fh, 0, 1 << 20)
    finally:
        await ops.release(info.fh)


async def listdir(ops: ViewOps, listing: Listing, inode: int, start: int = 0
                  ) -> list[bytes]:
    fh = await ops.opendir(inode)
    listing.entries.clear()
    await ops.readdir(fh, start, None)  # type: ignore[arg-type]
    await ops.releasedir(fh)
    return [name for name, _, _ in listing.entries]


async def test_a_tree_load_has_the_tree_database_read_ahead(store: Path,
                                                            listing: Listing) -> None:
    """A walk loads trees in no order of their rows' place in the tree database: the
    view's first tree load has all of it read into the page cache (counted with
    mincore(2)), so the loads after it do not wait for the disk one by one."""
    with Store.open(store) as writer:
        writer.objects.start_log()
        trees.add_random_trees(writer.objects, 1500)
    db = store / "objects" / "trees.db"
    pages = len(page_vector(db))
    assert pages > 200
    view = make_ops(store, listing)
    if drop_pages(db) > 0:
        pytest.skip("this file system keeps a dropped file's pages (tmpfs?)")
    inode = await resolve(view, b"v1", b"data")
    await view.releasedir(await view.opendir(inode))
    wait_until(lambda: all(page_vector(db)), timeout=10, what="the whole database cached")


async def test_lookup_open_and_read_a_file(ops: ViewOps) -> None:
    with trio.fail_after(TIMEOUT):
        inode = await resolve(ops, b"v1", b"data", b"sub", b"b.txt")
        info = await ops.open(inode, os.O_RDONLY)
        assert info.keep_cache and not info.direct_io
        assert await ops.read(info.fh, 1, 3) == b"eta"
        await ops.release(info.fh)


class PageStore:
    """A store_pages stand-in: records (inode, offset, data) (the kernel's page cache
    exists only inside a mount)."""

    def __init__(self) -> None:
        self.pushed: list[tuple[int, int, bytes]] = []

    def __call__(self, inode: int, offset: int, data: bytes) -> None:
        self.pushed.append((inode, offset, bytes(data)))


async def test_a_small_files_open_pushes_its_content_unless_the_inode_is_open(
        shared_store: Path, listing: Listing, monkeypatch: pytest.MonkeyPatch) -> None:
    pages = PageStore()
    ops = make_ops(shared_store, listing, store_pages=pages)
    with trio.fail_after(TIMEOUT):
        b_txt = await resolve(ops, b"v1", b"data", b"sub", b"b.txt")
        monkeypatch.setattr(ops_module, "OPEN_CONTENT_MAX", 0)
        first = await ops.open(b_txt, os.O_RDONLY)  # the larger blobs' path: no push
        monkeypatch.undo()
        # Open already: the kernel may be reading it, holding pages locked.
        second = await ops.open(b_txt, os.O_RDONLY)
        assert ops._files[second.fh].content == b"beta\n" and pages.pushed == []
        await ops.release(first.fh)
        await ops.release(second.fh)
        assert await read_file(ops, b_txt) == b"beta\n"
        assert pages.pushed == [(b_txt, 0, b"beta\n")] and ops.counters.pushed == 1
        assert not ops._inode_handles


async def test_once_pushed_a_file_opens_without_reading_until_its_inode_is_forgotten(
        shared_store: Path, listing: Listing) -> None:
    """Its pages stay in the kernel's cache with its inode: opens read nothing, and a
    read the kernel still sends (it dropped a page) opens the blob then."""
    pages = PageStore()
    ops = make_ops(shared_store, listing, store_pages=pages)
    with trio.fail_after(TIMEOUT):
        b_txt = await resolve(ops, b"v1", b"data", b"sub", b"b.txt")
        assert await read_file(ops, b_txt) == b"beta\n"
        read = (ops.counters.opened_inline, ops.counters.opened_in_thread)
        info = await ops.open(b_txt, os.O_RDONLY)
        handle = ops._files[info.fh]
        assert (handle.fd, handle.content) == (None, None)
        assert (ops.counters.opened_inline, ops.counters.opened_in_thread) == read
        assert await ops.read(info.fh, 1, 100) == b"eta\n"  # opens the blob
        assert handle.fd is not None
        await ops.release(info.fh)
        assert ops._open_content == 0 and len(pages.pushed) == 1
        await ops.forget([(b_txt, ops.vfs.lookups(b_txt))])
        b_txt = await resolve(ops, b"v1", b"data", b"sub", b"b.txt")
        assert await read_file(ops, b_txt) == b"beta\n"
        assert len(pages.pushed) == 2


async def test_files_up_to_small_blob_are_pushed_whole_while_open_ones_hold_little(
        tmp_path: Path, listing: Listing, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of several MiB is read, verified and pushed whole at open (no reads
    reach the view). The content open handles hold is bounded: past the bound, an open
    takes the larger blobs' path, and a release makes room again."""
    source = tmp_path / "src"
    one, two = os.urandom(SMALL_BLOB), os.urandom(3 << 20)
    trees.write(source / "one.bin", one)
    trees.write(source / "two.bin", two)
    take_snapshot(tmp_path / "store", {"data": source}, tags=["v1"])
    monkeypatch.setattr(ops_module, "OPEN_CONTENT_MAX", SMALL_BLOB + (1 << 20))
    pages = PageStore()
    ops = make_ops(tmp_path / "store", listing, store_pages=pages)
    with trio.fail_after(TIMEOUT):
        one_ino = await resolve(ops, b"v1", b"data", b"one.bin")
        two_ino = await resolve(ops, b"v1", b"data", b"two.bin")
        first = await ops.open(one_ino, os.O_RDONLY)
        assert pages.pushed == [(one_ino, 0, one)]
        assert ops._files[first.fh].fd is None
        # 8 MiB held: 3 more would pass the bound.
        second = await ops.open(two_ino, os.O_RDONLY)
        assert ops._files[second.fh].fd is not None and len(pages.pushed) == 1
        assert await ops.read(second.fh, 0, 3 << 20) == two
        await ops.release(second.fh)
        await ops.release(first.fh)
        assert ops._open_content == 0
        third = await ops.open(two_ino, os.O_RDONLY)
        assert ops._files[third.fh].fd is None and pages.pushed[-1] == (two_ino, 0, two)
        assert await ops.read(third.fh, (1 << 20) - 1, 2) == two[(1 << 20) - 1:(1 << 20) + 1]
        await ops.release(third.fh)
    ops.shutdown()


async def test_concurrent_opens_stay_within_the_bound_on_open_content(
        tmp_path: Path, listing: Listing, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cold opens wait for their reads in threads: the content they will hold counts
    from before that wait, or two of them would both pass the bound."""
    source = tmp_path / "src"
    first, second = os.urandom(3 << 20), os.urandom(3 << 20)
    trees.write(source / "a.bin", first)
    trees.write(source / "b.bin", second)
    take_snapshot(tmp_path / "store", {"data": source}, tags=["v1"])
    monkeypatch.setattr(ops_module, "OPEN_CONTENT_MAX", 4 << 20)
    ops = make_ops(tmp_path / "store", listing)  # blobs dropped: reads go to threads
    infos: list[pyfuse3.FileInfo] = []

    async def open_one(inode: int) -> None:
        infos.append(await ops.open(inode, os.O_RDONLY))

    with trio.fail_after(TIMEOUT):
        a = await resolve(ops, b"v1", b"data", b"a.bin")
        b = await resolve(ops, b"v1", b"data", b"b.bin")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_one, a)
            nursery.start_soon(open_one, b)
        assert sorted(ops._files[i.fh].fd is None for i in infos) == [False, True]
        assert ops._open_content == 3 << 20
        for info in infos:
            await ops.release(info.fh)
        assert ops._open_content == 0
    ops.shutdown()


async def test_a_small_blob_in_the_page_cache_is_read_at_open_without_a_thread(
        store: Path, listing: Listing) -> None:
    # A warmer that reads nothing: only what the test puts in the page cache is there.
    ops = make_ops(store, listing, warm=lambda paths: True)
    with trio.fail_after(TIMEOUT):
        a_txt = await resolve(ops, b"v1", b"data", b"a.txt")
        c_txt = await resolve(ops, b"v1", b"data", b"sub", b"c.txt")
        assert await read_file(ops, a_txt) == b"alpha\n"  # not cached: a thread
        if ops.counters.opened_inline:
            pytest.skip(PAGE_CAME_BACK)
        assert ops.counters.opened_in_thread == 1
        inline = cached_reads_work(ops, ops.vfs.blob(c_txt))
        set_blob_cached(ops, ops.vfs.blob(a_txt), True)  # that read dropped its pages
        assert await read_file(ops, a_txt) == b"alpha\n"  # cached and verified
        assert await read_file(ops, c_txt) == b"gamma\n"  # cached, hashed at open
        assert ops.vfs.blob(c_txt) in ops._verified
        if inline:
            assert (ops.counters.opened_in_thread, ops.counters.opened_inline) == (1, 2)
        else:
            assert (ops.counters.opened_in_thread, ops.counters.opened_inline) == (3, 0)


async def test_what_the_view_serves_leaves_the_blob_files_page_cache(
        tmp_path: Path, listing: Listing) -> None:
    """Served content is cached once, in the view's pages: a small blob's file pages go
    at open (read from the cache or from the disk), a larger one's as READs serve
    them, and only those."""
    source = tmp_path / "src"
    small, large = os.urandom(64 << 10), os.urandom(SMALL_BLOB + (1 << 20))
    trees.write(source / "small.bin", small)
    trees.write(source / "large.bin", large)
    take_snapshot(tmp_path / "store", {"data": source}, tags=["v1"])
    ops = make_ops(tmp_path / "store", listing, warm=lambda paths: True)
    with trio.fail_after(TIMEOUT):
        small_ino = await resolve(ops, b"v1", b"data", b"small.bin")
        large_ino = await resolve(ops, b"v1", b"data", b"large.bin")
        small_path, large_path = [ops.store.objects.path("blobs", ops.vfs.blob(inode))
                                  for inode in (small_ino, large_ino)]
        if not cached_reads_work(ops, ops.vfs.blob(small_ino)):
            pytest.skip("the store's filesystem keeps no page cache apart (tmpfs)")
        assert cached_pages(small_path) == (16, 16)
        assert await read_file(ops, small_ino) == small  # from the cache, inline
        assert ops.counters.opened_inline == 1 and cached_pages(small_path)[0] == 0
        # The kernel may finish a read-ahead after the drop: make sure it is gone.
        set_blob_cached(ops, ops.vfs.blob(small_ino), False)
        assert await read_file(ops, small_ino) == small  # from the disk, in a thread
        assert ops.counters.opened_in_thread == 1 and cached_pages(small_path)[0] == 0

        info = await ops.open(large_ino, os.O_RDONLY)  # verified: read whole
        assert cached_pages(large_path)[0] > 0
        assert await ops.read(info.fh, 1 << 20, 1 << 20) == large[1 << 20:2 << 20]
        assert await ops.read(info.fh, 4 << 20, 1 << 20) == large[4 << 20:5 << 20]
        vec = page_vector(large_path)
        served = [*range(256, 512), *range(1024, 1280)]
        assert not any(vec[page] for page in served)
        assert any(vec[page] for page in range(len(vec)) if page not in served)
        await ops.release(info.fh)
    ops.shutdown()


async def test_files_after_one_found_in_the_page_cache_are_not_read_ahead(
        own_ops: ViewOps) -> None:
    ops = own_ops
    with trio.fail_after(TIMEOUT):
        a_link, b_txt, c_txt = [await resolve(ops, b"v1", b"data", b"sub", name)
                                for name in (b"a-link", b"b.txt", b"c.txt")]
        for inode in (a_link, b_txt):
            inline = cached_reads_work(ops, ops.vfs.blob(inode))
        await read_in_order(ops, b"a-link", b"b.txt")
        blob = ops.vfs.blob(c_txt)
        if inline:  # reading c.txt ahead in a thread would cost more than it saves
            assert ops.counters.opened_inline == 2
            assert blob not in ops._verifying and blob not in ops._ready
        else:
            await read_ahead_done(ops, blob)
            assert blob in ops._ready


async def test_timeouts_are_short_at_the_root_and_long_below(ops: ViewOps) -> None:
    with trio.fail_after(TIMEOUT):
        assert (await ops.getattr(ROOT)).attr_timeout == ROOT_TIMEOUT
        snap = await ops.lookup(ROOT, b"v1")
        assert snap.entry_timeout == ROOT_TIMEOUT
        below = await ops.lookup(snap.st_ino, b"data")
        assert below.entry_timeout == below.attr_timeout == SNAPSHOT_TIMEOUT


async def test_readdir_lists_and_restarts_from_any_offset(ops: ViewOps,
                                                          listing: Listing) -> None:
    with trio.fail_after(TIMEOUT):
        sub = await resolve(ops, b"v1", b"data", b"sub")
        assert await listdir(ops, listing, sub) == [b"a-link", b"b.txt", b"c.txt"]
        offsets = [next_id for _, _, next_id in listing.entries]
        assert await listdir(ops, listing, sub, offsets[0]) == [b"b.txt", b"c.txt"]
        assert await listdir(ops, listing, sub, offsets[-1]) == []


async def test_readdir_counts_lookups_only_for_entries_taken(ops: ViewOps,
                                                             listing: Listing) -> None:
    with trio.fail_after(TIMEOUT):
        sub = await resolve(ops, b"v1", b"data", b"sub")
        listing.room = 1
        before = len(ops.vfs)
        await listdir(ops, listing, sub)
        assert len(ops.vfs) == before + 1  # the refused entry's node is gone again
        taken = listing.entries[0][1]
        assert ops.vfs.lookups(taken) == 1
        live = len(ops.vfs)
        await ops.forget([(taken, 1)])
        assert len(ops.vfs) == live - 1


def failing_after_one(listing: Listing) -> Any:
    """A readdir_reply that takes one entry, then fails."""
    def failing(token: Any, name: bytes, attrs: pyfuse3.EntryAttributes,
                next_id: int) -> bool:
        if listing.entries:
            raise RuntimeError("reply buffer gone")
        return listing(token, name, attrs, next_id)
    return failing


async def test_readdir_whose_reply_fails_counts_no_lookup(
        ops: ViewOps, listing: Listing, caplog: pytest.LogCaptureFixture) -> None:
    """pyfuse3 answers a failed readdir with an error and drops its buffer: the kernel
    holds none of the names given before the failure."""
    with trio.fail_after(TIMEOUT):
        sub = await resolve(ops, b"v1", b"data", b"sub")  # has a hard link: vfs.children
        before = len(ops.vfs)
        ops._readdir_reply = failing_after_one(listing)
        with pytest.raises(pyfuse3.FUSEError):
            await listdir(ops, listing, sub)
        assert len(ops.vfs) == before
        assert ops.vfs.lookups(listing.entries[0][1]) == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "view: unexpected error in readdir(1, 0, None)"]
    caplog.clear()


async def test_a_failed_readdir_of_a_directory_without_hard_links_counts_none(
        tmp_path: Path, listing: Listing, caplog: pytest.LogCaptureFixture) -> None:
    ops = five_subdirectories(tmp_path, listing)
    with trio.fail_after(TIMEOUT):
        data = await resolve(ops, b"v1", b"data")
        before = len(ops.vfs)
        ops._readdir_reply = failing_after_one(listing)
        with pytest.raises(pyfuse3.FUSEError):
            await listdir(ops, listing, data)
        assert len(ops.vfs) == before and ops.vfs.lookups(listing.entries[0][1]) == 0
        assert not ops.vfs._by_base  # nothing holds its block of inodes
    caplog.clear()
    ops.shutdown()


async def test_listing_a_directory_of_hard_links_keeps_no_block_of_inodes(
        tmp_path: Path, listing: Listing) -> None:
    """Its names are all keyed inodes: a block made to look at it must not stay."""
    source = tmp_path / "src"
    trees.write(source / "d" / "h1", b"x")
    os.link(source / "d" / "h1", source / "d" / "h2")
    take_snapshot(tmp_path / "store", {"data": source}, tags=["v1"])
    ops = make_ops(tmp_path / "store", listing)
    with trio.fail_after(TIMEOUT):
        d = await resolve(ops, b"v1", b"data", b"d")
        blocks = len(ops.vfs._by_base)  # data's, holding d
        assert await listdir(ops, listing, d) == [b"h1", b"h2"]
        assert len(ops.vfs._by_base) == blocks
    ops.shutdown()


async def test_root_readdir_loads_no_tree(ops: ViewOps, listing: Listing) -> None:
    with trio.fail_after(TIMEOUT):
        names = await listdir(ops, listing, ROOT)
        rec = ops.store.catalog.resolve("v1")
        assert names == sorted([LATEST, b"v1", rec.id.encode()])
        assert len(ops.vfs.trees) == 0


async def test_hard_links_share_an_inode(ops: ViewOps) -> None:
    with trio.fail_after(TIMEOUT):
        a = await ops.lookup(await resolve(ops, b"v1", b"data"), b"a.txt")
        b = await ops.lookup(await resolve(ops, b"v1", b"data", b"sub"), b"a-link")
        assert a.st_ino == b.st_ino and a.st_nlink == 2


async def test_xattrs_are_listed_and_read(ops: ViewOps) -> None:
    with trio.fail_after(TIMEOUT):
        inode = await resolve(ops, b"v1", b"data", b"a.txt")
        assert list(await ops.listxattr(inode)) == [b"user.note"]
        assert await ops.getxattr(inode, b"user.note") == b"hi"
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.getxattr(inode, b"user.other")
        assert exc.value.errno == pyfuse3.ENOATTR


async def test_latest_and_snapshot_mtime(ops: ViewOps) -> None:
    with trio.fail_after(TIMEOUT):
        rec = ops.store.catalog.resolve("latest")
        latest = await resolve(ops, LATEST)
        assert await ops.readlink(latest) == rec.id.encode()
        snap = await ops.lookup(ROOT, rec.id.encode())
        assert snap.st_mtime_ns == int(rec.time.timestamp() * 1e6) * 1000


async def test_a_missing_name_is_enoent(ops: ViewOps) -> None:
    with trio.fail_after(TIMEOUT):
        for parent, name in ((ROOT, b"nope"), (await resolve(ops, b"v1"), b"nope"),
                             (await resolve(ops, b"v1", b"data"), b"nope")):
            with pytest.raises(pyfuse3.FUSEError) as exc:
                await ops.lookup(parent, name)
            assert exc.value.errno == errno.ENOENT


@pytest.mark.parametrize("method,args", [
    ("setattr", (2, None, None, None, None)), ("mknod", (1, b"x", 0o644, 0, None)),
    ("mkdir", (1, b"x", 0o755, None)), ("unlink", (1, b"v1", None)),
    ("rmdir", (1, b"v1", None)), ("symlink", (1, b"x", b"y", None)),
    ("rename", (1, b"v1", 1, b"v2", 0, None)), ("link", (2, 1, b"x", None)),
    ("write", (1, 0, b"x")), ("create", (1, b"x", 0o644, os.O_WRONLY, None)),
    ("setxattr", (1, b"user.x", b"y", None)), ("removexattr", (1, b"user.x", None)),
])
async def test_every_write_is_erofs(ops: ViewOps, method: str, args: tuple[Any, ...]
                                    ) -> None:
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await getattr(ops, method)(*args)
    assert exc.value.errno == errno.EROFS


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC])
async def test_opening_for_writing_is_erofs(ops: ViewOps, flags: int) -> None:
    with trio.fail_after(TIMEOUT):
        inode = await resolve(ops, b"v1", b"data", b"a.txt")
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.open(inode, flags)
        assert exc.value.errno == errno.EROFS


async def test_a_corrupt_blob_is_eio_for_that_file_only_with_one_log_line(
        own_ops: ViewOps, caplog: pytest.LogCaptureFixture) -> None:
    ops = own_ops
    with trio.fail_after(TIMEOUT):
        inode = await resolve(ops, b"v1", b"data", b"sub", b"b.txt")
        blob = ops.vfs.blob(inode)
        flip_byte(ops.store.objects.path("blobs", blob))
        for _ in range(2):
            with pytest.raises(pyfuse3.FUSEError) as exc:
                await ops.open(inode, os.O_RDONLY)
            assert exc.value.errno == errno.EIO
        other = await resolve(ops, b"v1", b"data", b"sub", b"c.txt")
        assert await read_file(ops, other) == b"gamma\n"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and blob in errors[0] and "corrupt" in errors[0]
    caplog.clear()


async def test_a_missing_tree_is_eio_naming_the_object(
        own_ops: ViewOps, caplog: pytest.LogCaptureFixture) -> None:
    ops = own_ops
    with trio.fail_after(TIMEOUT):
        data = await resolve(ops, b"v1", b"data")
        sub_tree = ops.vfs.node(await resolve(ops, b"v1", b"data", b"sub")).tree
        assert sub_tree is not None
        trees.drop_tree(ops.store.objects.root, sub_tree)  # not loaded yet: unused
        sub = await resolve(ops, b"v1", b"data", b"sub")
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.lookup(sub, b"b.txt")
        assert exc.value.errno == errno.EIO
        a_txt = (await ops.lookup(data, b"a.txt")).st_ino
        assert await read_file(ops, a_txt) == b"alpha\n"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and sub_tree in errors[0] and "missing" in errors[0]
    caplog.clear()


async def test_an_unexpected_error_is_eio_and_logged(
        ops: ViewOps, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TIMEOUT):
        data = await resolve(ops, b"v1", b"data")
        tree = ops.vfs.node(data).tree
        assert tree is not None
        ops.vfs.trees._trees[tree] = None  # type: ignore[assignment]  # break the cache
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.lookup(data, b"a.txt")
        assert exc.value.errno == errno.EIO
    assert any("unexpected error in lookup" in r.getMessage() for r in caplog.records)
    caplog.clear()


async def test_unknown_handles_are_ebadf(ops: ViewOps) -> None:
    for call in (ops.read(99, 0, 1), ops.readdir(99, 0, None)):  # type: ignore[arg-type]
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await call
        assert exc.value.errno == errno.EBADF


async def test_an_open_file_survives_deleting_its_snapshot_and_blob(
        own_ops: ViewOps, store: Path) -> None:
    ops = own_ops
    with trio.fail_after(TIMEOUT):
        inode = await resolve(ops, b"v1", b"data", b"sub", b"c.txt")
        info = await ops.open(inode, os.O_RDONLY)
        delete_snapshot(store, "v1")
        os.unlink(ops.store.objects.path("blobs", ops.vfs.blob(inode)))
        await ops.reload_catalog()
        assert await ops.read(info.fh, 0, 100) == b"gamma\n"
        await ops.release(info.fh)


async def test_a_catalog_change_invalidates_the_changed_root_names(
        store: Path, source: Path) -> None:
    invalidated: list[tuple[int, bytes]] = []
    ops = ViewOps(Store.open(store, readonly=True),
                  invalidate=lambda parent, name: invalidated.append((parent, name)))
    await ops.reload_catalog()
    assert invalidated == []  # before init() the kernel has cached nothing
    ops.init()
    with trio.fail_after(TIMEOUT):
        first = ops.store.catalog.resolve("v1")
        trees.write(source / "new.txt", b"new\n")
        second = take_snapshot(store, {"data": source})
        tag_snapshot(store, second.id, "v2")
        await ops.reload_catalog()
        assert sorted(invalidated) == sorted([(ROOT, LATEST), (ROOT, second.id.encode()),
                                              (ROOT, b"v2")])
        invalidated.clear()
        delete_snapshot(store, first.id)
        await ops.reload_catalog()
        assert sorted(invalidated) == sorted([(ROOT, first.id.encode()), (ROOT, b"v1")])
        assert await ops.readlink(await resolve(ops, LATEST)) == second.id.encode()


async def read_in_order(ops: ViewOps, *names: bytes) -> None:
    """Open and read files of v1/data/sub one after the other, as `cp -r` would."""
    for name in names:
        await read_file(ops, await resolve(ops, b"v1", b"data", b"sub", name))


async def read_ahead_done(ops: ViewOps, blob: ObjectId) -> None:
    """Wait until the read-ahead of `blob`, started by an open before, has finished (it
    may have finished already: the first open in a directory starts it too)."""
    pending = ops._verifying.get(blob)
    if pending is not None:
        await pending.wait()
    assert blob not in ops._verifying


async def test_a_sequential_reader_gets_the_next_files_read_and_verified_ahead(
        ops: ViewOps) -> None:
    with trio.fail_after(TIMEOUT):
        c_txt = await resolve(ops, b"v1", b"data", b"sub", b"c.txt")
        blob = ops.vfs.blob(c_txt)
        await read_in_order(ops, b"a-link", b"b.txt")
        if ops.counters.opened_inline == 2:
            pytest.skip(PAGE_CAME_BACK)  # then nothing is read ahead, rightly
        await read_ahead_done(ops, blob)
        assert blob in ops._ready
        assert await read_file(ops, c_txt) == b"gamma\n"
        assert blob not in ops._ready


async def test_opening_the_first_file_of_a_directory_reads_the_next_ones_ahead(
        ops: ViewOps) -> None:
    with trio.fail_after(TIMEOUT):
        blob = ops.vfs.blob(await resolve(ops, b"v1", b"data", b"sub", b"b.txt"))
        await read_in_order(ops, b"a-link")  # the first regular file in sub
        if ops.counters.opened_inline == 1:
            pytest.skip(PAGE_CAME_BACK)  # then nothing is read ahead, rightly
        await read_ahead_done(ops, blob)
        assert ops._ready[blob] == b"beta\n"


async def test_a_corrupt_blob_found_ahead_is_eio_when_opened_with_one_log_line(
        own_ops: ViewOps, caplog: pytest.LogCaptureFixture) -> None:
    ops = own_ops
    with trio.fail_after(TIMEOUT):
        c_txt = await resolve(ops, b"v1", b"data", b"sub", b"c.txt")
        blob = ops.vfs.blob(c_txt)
        flip_byte(ops.store.objects.path("blobs", blob))
        await read_in_order(ops, b"a-link", b"b.txt")
        await read_ahead_done(ops, blob)
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.open(c_txt, os.O_RDONLY)
        assert exc.value.errno == errno.EIO
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and blob in errors[0] and "corrupt" in errors[0]
    caplog.clear()


class WarmRecorder:
    """A `warm` stand-in that reads the files into the page cache itself, as the warmer
    process would, and keeps each batch of paths it got."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gone = False

    def __call__(self, paths: Sequence[str]) -> bool:
        if self.gone:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        self.batches.append(list(paths))
        for path in paths:
            with open(path, "rb") as f:
                f.read()
        return True


@pytest.fixture
def many_files(tmp_path: Path, listing: Listing) -> tuple[ViewOps, WarmRecorder]:
    """Handlers with a WarmRecorder over a store of one directory of 20 small files."""
    source = tmp_path / "src"
    for i in range(20):
        trees.write(source / "many" / f"f{i:02}.txt", f"file {i}\n".encode())
    take_snapshot(tmp_path / "store", {"data": source}, tags=["v1"])
    warm = WarmRecorder()
    return make_ops(tmp_path / "store", listing, warm=warm), warm


async def make_first_cold(ops: ViewOps) -> None:
    """Make sure f00's open finds nothing in the page cache, so it goes to a thread
    and starts the reading ahead (mincore(2) tells: a probing read would start the
    kernel's read-ahead)."""
    blob = ops.vfs.blob(await resolve(ops, b"v1", b"data", b"many", b"f00.txt"))
    set_blob_cached(ops, blob, False)
    if cached_pages(ops.store.objects.path("blobs", blob))[0] != 0:
        pytest.skip("the page cache keeps the blob's pages (tmpfs)")


async def open_many(ops: ViewOps, *indexes: int) -> list[ObjectId]:
    """Read files f<index> of `many` in this order; their blobs."""
    blobs = []
    for i in indexes:
        inode = await resolve(ops, b"v1", b"data", b"many", f"f{i:02}.txt".encode())
        assert await read_file(ops, inode) == f"file {i}\n".encode()
        blobs.append(ops.vfs.blob(inode))
    return blobs


async def test_the_warmer_gets_the_next_small_files_a_batch_at_a_time(
        many_files: tuple[ViewOps, WarmRecorder]) -> None:
    ops, warm = many_files
    with trio.fail_after(TIMEOUT):
        await make_first_cold(ops)
        blobs = await open_many(ops, 0)
        if ops.counters.opened_inline:
            pytest.skip(PAGE_CAME_BACK)
        blobs += await open_many(ops, *range(1, 20))
    files = [ops.store.objects.blob_file(blob) for blob in blobs]
    # The first open (cold, in a thread) sends the next 16; the open of the middle one
    # of those (f09) sends the rest. Nothing is read ahead in a thread.
    assert warm.batches == [files[1:17], files[17:]]
    if cached_reads_work(ops, blobs[-1]):
        assert ops.counters.opened_in_thread == 1 and ops.counters.opened_inline == 19
    assert not ops._ready and ops._prefetches == 0
    ops.shutdown()


async def test_files_found_cached_without_the_warmer_are_not_sent_to_it(
        many_files: tuple[ViewOps, WarmRecorder]) -> None:
    ops, warm = many_files
    with trio.fail_after(TIMEOUT):
        first = await resolve(ops, b"v1", b"data", b"many", b"f00.txt")
        if not cached_reads_work(ops, ops.vfs.blob(first)):
            pytest.skip("inline opens need RWF_NOWAIT reads (not on tmpfs)")
        for blob in ops.store.objects.iter_ids("blobs"):
            set_blob_cached(ops, blob, True)
        await open_many(ops, 0, 1, 2)
    assert warm.batches == [] and ops.counters.opened_inline == 3
    ops.shutdown()


async def test_when_the_warmer_is_gone_files_are_read_ahead_in_threads(
        many_files: tuple[ViewOps, WarmRecorder], caplog: pytest.LogCaptureFixture
        ) -> None:
    ops, warm = many_files
    warm.gone = True
    with trio.fail_after(TIMEOUT):
        await make_first_cold(ops)
        await open_many(ops, 0)
        following = ops.vfs.blob(await resolve(ops, b"v1", b"data", b"many", b"f01.txt"))
        await read_ahead_done(ops, following)
        assert following in ops._ready  # read and verified ahead in a thread
        assert warm.batches == []
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "view: no warmer process (Broken pipe); reading ahead in threads from now on"]
    caplog.clear()
    ops.shutdown()


class ListRecorder:
    """A `list_ahead` stand-in that keeps the paths it got; `refuse` answers a full
    queue that many times, `gone` a helper that is gone."""

    def __init__(self) -> None:
        self.paths: list[bytes] = []
        self.refuse = 0
        self.gone = False

    def __call__(self, path: bytes) -> bool:
        if self.gone:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        if self.refuse:
            self.refuse -= 1
            return False
        self.paths.append(path)
        return True


def directories_of(tmp_path: Path, listing: Listing, *sizes: int
                   ) -> tuple[ViewOps, ListRecorder]:
    """Handlers with a ListRecorder over a snapshot (tag v1) of directories d<size>
    holding `size` files each."""
    source = tmp_path / "src"
    for size in sizes:
        for i in range(size):
            trees.write(source / f"d{size}" / f"f{i:03}", b"x")
    take_snapshot(tmp_path / "store", {"data": source}, tags=["v1"])
    recorder = ListRecorder()
    return make_ops(tmp_path / "store", listing, list_ahead=recorder), recorder


async def lookups_until_listed(ops: ViewOps, recorder: ListRecorder, size: int
                               ) -> int | None:
    """Look up the names of d<size> one by one: after how many it was listed ahead."""
    listed = None
    for i in range(size):
        await resolve(ops, b"v1", b"data", f"d{size}".encode(), f"f{i:03}".encode())
        if recorder.paths and listed is None:
            listed = i + 1
    return listed


@pytest.mark.parametrize(("size", "after"), [(15, None), (16, 4), (40, 5), (200, 12)])
async def test_a_directory_whose_names_are_looked_up_one_by_one_is_listed_ahead_once(
        tmp_path: Path, listing: Listing, size: int, after: int | None) -> None:
    ops, recorder = directories_of(tmp_path, listing, size)
    with trio.fail_after(TIMEOUT):
        assert await lookups_until_listed(ops, recorder, size) == after
    # Once, by its path below the mount; never the root, the snapshot or `data` (whose
    # one name was looked up again and again).
    assert recorder.paths == ([] if after is None else [f"v1/data/d{size}".encode()])
    assert ops.counters.listed_ahead == len(recorder.paths)


async def test_the_root_and_snapshot_directories_are_never_listed_ahead(
        tmp_path: Path, listing: Listing) -> None:
    ops, recorder = directories_of(tmp_path, listing, 16)
    for i in range(16):
        tag_snapshot(tmp_path / "store", "v1", f"t{i}")
    with trio.fail_after(TIMEOUT):
        await ops.reload_catalog()
        for name in ops.vfs.listdir(ROOT):  # 19 names: 17 tags, the id and latest
            snapshot = (await ops.lookup(ROOT, name)).st_ino
            if name != LATEST:
                await ops.lookup(snapshot, b"data")
    assert recorder.paths == []


async def test_a_directory_larger_than_list_ahead_max_is_left_to_lookups(
        tmp_path: Path, listing: Listing, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops_module, "LIST_AHEAD_MAX", 199)
    ops, recorder = directories_of(tmp_path, listing, 200)
    with trio.fail_after(TIMEOUT):
        assert await lookups_until_listed(ops, recorder, 200) is None


async def test_the_count_starts_over_once_the_kernel_forgot_the_directory(
        tmp_path: Path, listing: Listing) -> None:
    ops, recorder = directories_of(tmp_path, listing, 16)  # listed at the 4th name
    with trio.fail_after(TIMEOUT):
        names = [await resolve(ops, b"v1", b"data", b"d16", f"f{i:03}".encode())
                 for i in range(3)]
        directory = ops.vfs.node(names[0]).parent
        await ops.forget([(inode, 1) for inode in names] + [(directory, 3)])
        for i in range(3, 6):
            await resolve(ops, b"v1", b"data", b"d16", f"f{i:03}".encode())
        assert recorder.paths == []  # three names since the kernel forgot the others
        await resolve(ops, b"v1", b"data", b"d16", b"f006")
    assert recorder.paths == [b"v1/data/d16"]


async def test_a_directory_of_hard_links_is_listed_ahead_too(
        tmp_path: Path, listing: Listing) -> None:
    source = tmp_path / "src"
    (source / "d16").mkdir(parents=True)
    for i in range(16):  # each name of d16 a second name of a file in orig
        trees.write(source / "orig" / f"f{i:03}", f"{i}".encode())
        os.link(source / "orig" / f"f{i:03}", source / "d16" / f"f{i:03}")
    take_snapshot(tmp_path / "store", {"data": source}, tags=["v1"])
    recorder = ListRecorder()
    ops = make_ops(tmp_path / "store", listing, list_ahead=recorder)
    with trio.fail_after(TIMEOUT):
        assert await lookups_until_listed(ops, recorder, 16) == 4
    assert recorder.paths == [b"v1/data/d16"]


async def test_a_listing_refused_by_a_full_queue_is_asked_for_at_the_next_name(
        tmp_path: Path, listing: Listing) -> None:
    ops, recorder = directories_of(tmp_path, listing, 16)
    recorder.refuse = 1
    with trio.fail_after(TIMEOUT):
        assert await lookups_until_listed(ops, recorder, 16) == 5
    assert recorder.paths == [b"v1/data/d16"] and ops.counters.listed_ahead == 1


async def test_when_the_warmer_is_gone_nothing_is_listed_ahead(
        tmp_path: Path, listing: Listing, caplog: pytest.LogCaptureFixture) -> None:
    ops, recorder = directories_of(tmp_path, listing, 16, 17)
    recorder.gone = True
    with trio.fail_after(TIMEOUT):
        assert await lookups_until_listed(ops, recorder, 16) is None
        recorder.gone = False
        assert await lookups_until_listed(ops, recorder, 17) is None
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "view: no warmer process (Broken pipe); directories are not listed ahead from "
        "now on"]
    caplog.clear()


async def test_shutdown_drops_the_contents_read_ahead(ops: ViewOps) -> None:
    with trio.fail_after(TIMEOUT):
        blob = ops.vfs.blob(await resolve(ops, b"v1", b"data", b"sub", b"c.txt"))
        await read_in_order(ops, b"a-link", b"b.txt")
        await read_ahead_done(ops, blob)
        assert ops._ready[blob] == b"gamma\n"
        ops.shutdown()
        assert not ops._ready and ops._ready_bytes == 0


async def test_opening_a_directory_loads_its_subdirectories_trees_ahead(
        ops: ViewOps) -> None:
    with trio.fail_after(TIMEOUT):
        data = await resolve(ops, b"v1", b"data")
        sub_tree = ops.vfs.node(await resolve(ops, b"v1", b"data", b"sub")).tree
        assert sub_tree is not None and sub_tree not in ops.vfs.trees
        fh = await ops.opendir(data)
        await ops._loading[sub_tree].wait()
        assert sub_tree in ops.vfs.trees
        await ops.releasedir(fh)


async def test_trees_load_breadth_first_ahead_of_a_walk(tmp_path: Path,
                                                        listing: Listing) -> None:
    source = tmp_path / "src"
    for top in (b"a", b"b"):
        trees.write(source / os.fsdecode(top) / "x" / "y" / "z" / "f.txt", b"deep\n")
    take_snapshot(tmp_path / "store", {"data": source}, tags=["v1"])
    ops = make_ops(tmp_path / "store", listing)
    with trio.fail_after(TIMEOUT):
        data = await resolve(ops, b"v1", b"data")
        fh = await ops.opendir(data)
        while ops._loading_ahead:  # the loader's batches, one after the other
            await trio.lowlevel.checkpoint()
        await ops.releasedir(fh)
    # Only `data` was opened, yet all 9 trees below it are cached.
    assert len(ops.vfs.trees) == 9
    ops.shutdown()


def five_subdirectories(tmp_path: Path, listing: Listing) -> ViewOps:
    source = tmp_path / "src"
    for name in "abcde":
        trees.write(source / name / "f.txt", name.encode())
    take_snapshot(tmp_path / "store", {"data": source}, tags=["v1"])
    return make_ops(tmp_path / "store", listing)


async def test_trees_loaded_ahead_reach_the_view_in_one_hand_over_per_batch(
        tmp_path: Path, listing: Listing) -> None:
    """Each hand-over wakes the trio thread: a batch nobody waits for is one."""
    ops = five_subdirectories(tmp_path, listing)
    handed: list[int] = []
    trees_loaded = ops._trees_loaded
    ops._trees_loaded = lambda loaded: (handed.append(len(loaded)),  # type: ignore
                                        trees_loaded(loaded))
    with trio.fail_after(TIMEOUT):
        fh = await ops.opendir(await resolve(ops, b"v1", b"data"))
        while ops._loading_ahead:
            await trio.lowlevel.checkpoint()
        await ops.releasedir(fh)
    assert handed == [5] and len(ops.vfs.trees) == 6
    ops.shutdown()


async def test_a_request_gets_the_tree_it_waits_for_before_its_batch_ends(
        tmp_path: Path, listing: Listing, monkeypatch: pytest.MonkeyPatch) -> None:
    ops = five_subdirectories(tmp_path, listing)
    data = await resolve(ops, b"v1", b"data")
    data_tree = ops.vfs.node(data).tree
    assert data_tree is not None
    first, *_, last = [e.ref for e in ops._load_tree(data_tree)]  # a ... e
    gates = {first: threading.Event(), last: threading.Event()}

    def gated_decode(data: bytes, oid: str = "?") -> list[Entry]:
        if oid in gates:
            gates[oid].wait(TIMEOUT)
        return decode_tree(data, oid)

    monkeypatch.setattr(ops_module, "decode_tree", gated_decode)
    with trio.fail_after(TIMEOUT):
        fh = await ops.opendir(data)  # the five subtrees load ahead, in one batch
        async with trio.open_nursery() as nursery:
            entered = trio.Event()

            async def enter_a() -> None:
                a = (await ops.lookup(data, b"a")).st_ino
                await ops.releasedir(await ops.opendir(a))
                entered.set()

            nursery.start_soon(enter_a)
            await trio.testing.wait_all_tasks_blocked()
            assert not entered.is_set()  # waiting for `a`'s tree, loaded ahead
            gates[first].set()
            await entered.wait()  # while the batch's last tree is still held back
            assert last not in ops.vfs.trees
            gates[last].set()
        while ops._loading_ahead:
            await trio.lowlevel.checkpoint()
        assert last in ops.vfs.trees
        await ops.releasedir(fh)
    ops.shutdown()


async def test_no_trees_load_ahead_while_a_larger_file_is_read_for_its_first_open(
        tmp_path: Path, listing: Listing) -> None:
    """A reader waits on that whole-blob read: loading trees ahead would take the disk
    from it. The trees wanted meanwhile load once it is done."""
    source = tmp_path / "src"
    trees.write(source / "big.bin", os.urandom(SMALL_BLOB + 1))
    trees.write(source / "a" / "x" / "f.txt", b"deep\n")
    take_snapshot(tmp_path / "store", {"data": source}, tags=["v1"])
    # Room for 4 entries: loading ahead for the lookups stops at `a` (half full).
    ops = make_ops(tmp_path / "store", listing, tree_cache_entries=4)
    with trio.fail_after(TIMEOUT):
        big = await resolve(ops, b"v1", b"data", b"big.bin")
        a = await resolve(ops, b"v1", b"data", b"a")
        while ops._loading_ahead:
            await trio.lowlevel.checkpoint()
        a_tree = ops.vfs.node(a).tree
        assert a_tree is not None and a_tree in ops.vfs.trees  # loaded ahead
        x_tree = next(e.ref for e in ops.vfs.trees.get(a_tree) if e.name == b"x")
        assert x_tree is not None and x_tree not in ops.vfs.trees
        # Hold the verify threads, so the open waits in its first use.
        holders = [object() for _ in range(int(ops.verify_limiter.total_tokens))]
        for holder in holders:
            await ops.verify_limiter.acquire_on_behalf_of(holder)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.open, big, os.O_RDONLY)
            await trio.testing.wait_all_tasks_blocked()
            fh = await ops.opendir(a)  # wants x's tree, first in line
            await trio.testing.wait_all_tasks_blocked()
            assert x_tree not in ops.vfs.trees and x_tree not in ops._loading
            for holder in holders:
                ops.verify_limiter.release_on_behalf_of(holder)
        while ops._loading_ahead:
            await trio.lowlevel.checkpoint()
        assert x_tree in ops.vfs.trees
        await ops.releasedir(fh)
    ops.shutdown()


async def test_statfs_reports_a_full_read_only_filesystem(ops: ViewOps) -> None:
    with trio.fail_after(TIMEOUT):
        st = await ops.statfs()
        assert st.f_blocks > 0 and st.f_bavail == 0 and st.f_namemax == 255


def flip_byte(path: Path, offset: int = 0) -> None:
    """Corrupt a stored object in place (objects are 0444: write through chmod)."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.chmod(path, 0o444)
