"""The store on real disks: format, writer lock, full disks, check."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from dwsd.errors import CorruptObjectError, StoreError, StoreLockedError
from dwsd.snapshot import capture
from dwsd.store.fsutil import TEMP_PREFIX, UNIFIED_SYSCALLS, open_cached
from dwsd.store.ids import ObjectId, hash_bytes
from dwsd.store.store import Store
from dwsd.workspace import Workspace
from tests import trees
from tests.conftest import WriteConfig

HOLD_LOCK = ("import sys,time; from dwsd.store.store import Store; "
             "s=Store.open(sys.argv[1], create=True); print('ready', flush=True); "
             "time.sleep(60)")


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(TEMP_PREFIX + "*")]


def test_objects_are_verified_when_read(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True) as store:
        oid = store.objects.put("blobs", b"payload")
        path = store.objects.path("blobs", oid)
        os.chmod(path, 0o644)
        path.write_bytes(b"pAyload")
        with pytest.raises(CorruptObjectError):
            store.objects.get("blobs", oid)


def test_a_directory_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is not a dwsd store"):
        Store.open(tmp_path)


def test_an_unknown_format_version_is_refused(tmp_path: Path) -> None:
    Store.open(tmp_path / "s", create=True).close()
    (tmp_path / "s" / "format").write_text("dwsd-store 99\n")
    with pytest.raises(StoreError, match="dwsd-store 99"):
        Store.open(tmp_path / "s")


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "s")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_second_writer_is_refused_with_the_holders_pid(tmp_path: Path,
                                                       lock_holder: subprocess.Popen[str]
                                                       ) -> None:
    with pytest.raises(StoreLockedError, match=f"in use by pid {lock_holder.pid}"):
        Store.open(tmp_path / "s")


def test_kill_9_of_the_holder_frees_the_lock(tmp_path: Path,
                                             lock_holder: subprocess.Popen[str]) -> None:
    lock_holder.send_signal(signal.SIGKILL)
    lock_holder.wait(timeout=10)
    Store.open(tmp_path / "s").close()


def test_readers_need_no_lock(tmp_path: Path, lock_holder: subprocess.Popen[str]) -> None:
    with Store.open(tmp_path / "s", readonly=True) as store:
        assert store.catalog.history() == []


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    trees.mount_tmpfs(mnt, "4m")
    try:
        yield mnt
    finally:
        trees.unmount(mnt)


@pytest.mark.parametrize("readers", ["here", "processes"])
def test_full_disk_gives_one_error_and_loses_nothing(tmp_path: Path, small_tmpfs: Path,
                                                     write_config: WriteConfig, readers: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if readers == "processes":
        monkeypatch.setattr(capture, "PROCESSES_AFTER", 0)
    data = tmp_path / "data"
    trees.write(data / "small.txt", b"fits")
    config = write_config({"data": data}, store=small_tmpfs / "store")
    with Workspace.open(config) as ws:
        first = ws.snapshot(tags=["small"]).record
        catalog_before = (small_tmpfs / "store" / "catalog.json").read_bytes()
        trees.write(data / "big.bin", os.urandom(3 << 20))
        trees.write(data / "bigger.bin", os.urandom(3 << 20))
        with pytest.raises(StoreError, match="No space left on device"):
            ws.snapshot(tags=["too-big"])
        assert temp_files(small_tmpfs) == []
        assert (small_tmpfs / "store" / "catalog.json").read_bytes() == catalog_before
        assert ws.history() == [first]
        assert ws.check(read_data=True).ok


def test_check_names_the_snapshots_using_a_corrupt_blob(tmp_path: Path,
                                                        write_config: WriteConfig) -> None:
    data = tmp_path / "data"
    trees.write(data / "shared.csv", b"a,b\n1,2\n")
    trees.write(data / "other.txt", b"x")
    with Workspace.open(write_config({"data": data})) as ws:
        one = ws.snapshot(tags=["one"]).record
        trees.write(data / "other.txt", b"y")
        two = ws.snapshot(tags=["two"]).record
        trees.write(data / "shared.csv", b"changed")
        ws.snapshot(tags=["three"])
        assert ws.check(read_data=True).ok
        blob = next(e.ref for e in trees.entries(ws.store.objects, one.resources["data"])
                    if e.name == b"shared.csv")
        path = ws.store.objects.path("blobs", blob)
        os.chmod(path, 0o644)
        raw = bytearray(path.read_bytes())
        raw[3] ^= 0x01
        path.write_bytes(bytes(raw))
        assert ws.check().ok  # structure alone cannot see it
        result = ws.check(read_data=True)
    assert [str(p) for p in result.problems] == [
        f"blob {blob}: content does not match its hash (used by {one.id}, {two.id})"]


def test_check_repair_moves_a_corrupt_blob_aside_and_a_full_snapshot_heals_it(
        tmp_path: Path, write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    trees.write(data / "train.py", b"print(1)")
    trees.write(data / "other.py", b"print(2)")
    blob = hash_bytes(b"print(1)")
    with Workspace.open(write_config({"data": data})) as ws:
        first = ws.snapshot(tags=["before"]).record
        path = ws.store.objects.path("blobs", blob)
        os.chmod(path, 0o644)
        path.write_bytes(b"print(9)")
        assert not ws.snapshot(tags=[]).created  # unchanged files: the bad blob stays
        repaired = ws.check(read_data=True, repair=True)
        assert [p.object_id for p in repaired.problems] == [blob]
        assert repaired.moved_aside == [blob]
        assert (tmp_path / "store" / "corrupt" / blob).read_bytes() == b"print(9)"
        # Only the files that had the bad content are read again, by the full walk.
        healed = ws.snapshot(tags=["after"])
        assert healed.counters.files_opened == 1 and not healed.created
        assert ws.check(read_data=True).ok
        ws.restore("before", target=tmp_path / "out")
    assert first is not None
    assert (tmp_path / "out" / "data" / "train.py").read_bytes() == b"print(1)"
    assert f"blob {blob} is corrupt: moved aside to {tmp_path / 'store' / 'corrupt'}" \
        in caplog.text
    caplog.clear()


def test_check_reports_a_missing_tree(tmp_path: Path, write_config: WriteConfig) -> None:
    data = tmp_path / "data"
    trees.write(data / "sub" / "f", b"1")
    with Workspace.open(write_config({"data": data})) as ws:
        rec = ws.snapshot().record
        sub = trees.entries(ws.store.objects, rec.resources["data"])[0].ref
        ws.store.objects.remove("trees", sub)
        problems = ws.check().problems
    assert len(problems) == 1 and problems[0].object_id == sub
    assert "missing" in problems[0].problem and problems[0].snapshots == [rec.id]


def _downgrade_to_format_1(store_dir: Path) -> int:
    """Rewrite a closed format-2 store the way format 1 kept it: one file per tree under
    objects/trees/<2 hex>/<62 hex>, zlib-compressed, no trees.db. Returns the number of
    trees."""
    import sqlite3
    import zlib

    import zstandard
    objects = store_dir / "objects"
    con = sqlite3.connect(objects / "trees.db")
    rows = con.execute("SELECT id, data FROM trees").fetchall()
    con.close()
    for raw, data in rows:
        oid = bytes(raw).hex()
        plain = zstandard.ZstdDecompressor().decompress(bytes(data))
        trees.write(objects / "trees" / oid[:2] / oid[2:], zlib.compress(plain))
    for name in ("trees.db", "trees.db-wal", "trees.db-shm"):
        (objects / name).unlink(missing_ok=True)
    (store_dir / "format").write_text("dwsd-store 1\n")
    return len(rows)


def test_a_format_1_store_is_upgraded_by_its_writer_and_reads_the_same(
        tmp_path: Path, write_config: WriteConfig) -> None:
    data = tmp_path / "data"
    for i in range(5):
        trees.write(data / f"d{i}" / "sub" / "f.txt", f"{i}\n".encode())
    config = write_config({"data": data})
    with Workspace.open(config) as ws:
        rec = ws.snapshot(tags=["old"]).record
        before = trees.describe_snapshot(ws.store.objects, rec.resources["data"])
        store_dir = ws.store.root
    count = _downgrade_to_format_1(store_dir)
    assert count == 11  # the root, five d*, five sub
    with pytest.raises(StoreError, match="format 1; start dwsd on it once"):
        Store.open(store_dir, readonly=True)
    with Workspace.open(config) as ws:
        assert (store_dir / "format").read_text() == "dwsd-store 2\n"
        assert not (store_dir / "objects" / "trees").exists()
        assert trees.describe_snapshot(ws.store.objects,
                                       ws.get("old").resources["data"]) == before
        assert ws.check(read_data=True).ok
        trees.write(data / "d0" / "sub" / "f.txt", b"new\n")
        assert ws.snapshot(tags=["new"]).record is not None


def test_an_upgrade_cut_short_is_finished_by_the_next_writer(
        tmp_path: Path, write_config: WriteConfig) -> None:
    data = tmp_path / "data"
    trees.write(data / "a" / "f.txt", b"1")
    config = write_config({"data": data})
    with Workspace.open(config) as ws:
        rec = ws.snapshot(tags=["old"]).record
        store_dir = ws.store.root
    _downgrade_to_format_1(store_dir)
    # A crash after the rows were committed and one tree file removed, before the format
    # file changed: the next writer must still end with every tree.
    from dwsd.store.objects import ObjectStore
    ObjectStore.create(store_dir / "objects").close()
    first_file = sorted((store_dir / "objects" / "trees").glob("??/*"))[0]
    oid = first_file.parent.name + first_file.name
    db = ObjectStore(store_dir / "objects")
    db.trees.insert_stored(oid, first_file.read_bytes())  # type: ignore[arg-type]
    db.close()
    first_file.unlink()
    with Workspace.open(config) as ws:
        assert ws.check(read_data=True).ok
        assert ws.get("old").id == rec.id


def test_trees_are_rows_a_snapshot_adds_only_blob_files(tmp_path: Path,
                                                        write_config: WriteConfig) -> None:
    data = tmp_path / "data"
    for i in range(40):
        trees.write(data / f"d{i:02d}" / "f.txt", f"first {i}\n".encode())
    with Workspace.open(write_config({"data": data})) as ws:
        ws.snapshot()
        files_before = {p for p in ws.store.root.rglob("*") if p.is_file()}
        for i in range(0, 40, 4):
            trees.write(data / f"d{i:02d}" / "f.txt", f"second {i}\n".encode())
        ws.snapshot()
        written = sorted(kind for kind, _ in ws.store.objects.log.written)
        new_files = {p for p in ws.store.root.rglob("*") if p.is_file()} - files_before
    assert written == ["blobs"] * 10 + ["trees"] * 11  # ten files, ten d*, the root
    new_objects = [p for p in new_files if "objects" in p.parts]
    assert sorted(p.parent.parent.name for p in new_objects) == ["blobs"] * 10


def test_check_finds_a_corrupt_tree_row(tmp_path: Path, write_config: WriteConfig) -> None:
    import sqlite3

    import zstandard
    data = tmp_path / "data"
    trees.write(data / "sub" / "f", b"1")
    config = write_config({"data": data})
    with Workspace.open(config) as ws:
        rec = ws.snapshot().record
        sub = trees.entries(ws.store.objects, rec.resources["data"])[0].ref
        db_path = ws.store.objects.root / "trees.db"
    assert sub is not None
    con = sqlite3.connect(db_path)
    (stored,) = con.execute("SELECT data FROM trees WHERE id = ?",
                            (bytes.fromhex(sub),)).fetchone()
    plain = bytearray(zstandard.ZstdDecompressor().decompress(stored))
    plain[-1] ^= 0x01  # still decodes; the hash no longer matches
    with con:
        con.execute("UPDATE trees SET data = ? WHERE id = ?",
                    (zstandard.ZstdCompressor().compress(bytes(plain)), bytes.fromhex(sub)))
    con.close()
    with Workspace.open(config) as ws:
        problems = ws.check().problems
    assert [(p.object_id, p.snapshots) for p in problems] == [(sub, [rec.id])]
    assert "corrupt" in problems[0].problem


@pytest.mark.parametrize("stored", [
    b"\x28\xb5\x2f\xfd" + b"\xa0" + (2**31).to_bytes(4, "little") + b"junk",  # claims 2 GiB
    b"\x28\xb5\x2f\xfd" + b"\x20" + b"\x10" + b"not a zstd block",
    b"neither zstd nor zlib",
], ids=["huge-frame-header", "bad-zstd-frame", "bad-zlib-stream"])
def test_a_tree_row_that_does_not_decompress_is_corrupt(tmp_path: Path,
                                                        stored: bytes) -> None:
    from dwsd.store.treedb import TreeDB
    with Store.open(tmp_path / "s", create=True) as store:
        oid = ObjectId("cd" * 32)
        db = store.objects.trees
        db.insert_stored(oid, stored)
        db.commit()
        with pytest.raises(CorruptObjectError, match="does not decompress"):
            db.get(oid)
        reader = TreeDB(store.objects.root / "trees.db", readonly=True)
        try:
            with pytest.raises(CorruptObjectError, match="does not decompress"):
                reader.get(oid)
        finally:
            reader.close()


def test_trees_are_buffered_then_committed_in_one_batch(tmp_path: Path) -> None:
    from dwsd.store.tree import FILE, Entry, encode_tree
    from dwsd.store.treedb import TreeDB
    with Store.open(tmp_path / "s", create=True) as store:
        objects = store.objects
        objects.start_log()
        encodings = [encode_tree([Entry(b"f%d" % i, FILE, 0o644, 0, 0, i, 1,
                                        ref="ab" * 32)]) for i in range(3)]
        ids = [objects.put("trees", e) for e in encodings]
        reader = TreeDB(objects.root / "trees.db", readonly=True)
        try:
            assert [objects.get("trees", t) for t in ids] == encodings  # the writer sees them
            assert [reader.has(t) for t in ids] == [False] * 3  # nobody else yet
            assert objects.log.objects_written == 0
            objects.make_durable()
            assert sorted(oid for _, oid in objects.log.written) == sorted(ids)
            assert [reader.get(t) for t in ids] == encodings
            # A failed snapshot's trees that were never flushed are dropped.
            lost = objects.put("trees", encode_tree([]))
            objects.roll_back(objects.start_log())
            objects.make_durable()
            assert not objects.has("trees", lost) and not reader.has(lost)
        finally:
            reader.close()


def test_committed_trees_reach_the_database_file_by_a_checkpoint_on_its_own_thread(
        tmp_path: Path) -> None:
    import shutil
    import sqlite3
    import threading
    from dwsd.store.tree import FILE, Entry, encode_tree
    with Store.open(tmp_path / "s", create=True) as store:
        objects = store.objects
        ids = [objects.put("trees", encode_tree([Entry(b"f%d" % i, FILE, 0o644, 0, 0, i,
                                                       1, ref="ab" * 32)]))
               for i in range(50)]
        objects.make_durable()
        objects.trees.wait_checkpointed()
        # The database file alone, without its log, holds them: they were checkpointed.
        shutil.copy(objects.root / "trees.db", tmp_path / "copy.db")
        con = sqlite3.connect(tmp_path / "copy.db")
        try:
            assert con.execute("SELECT count(*) FROM trees").fetchone() == (len(ids),)
        finally:
            con.close()
        objects.put("trees", encode_tree([]))
        objects.make_durable()  # starts another, which close waits for
    assert not any(t.name == "trees checkpoint" for t in threading.enumerate())


def test_open_cached_opens_a_cached_path_and_refuses_a_missing_one(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"cached")
    os.stat(path)  # its dentry and inode are cached now
    fd = open_cached(str(path))
    assert fd is not None  # openat2 with RESOLVE_CACHED: Linux 5.12 and later
    try:
        assert os.pread(fd, 10, 0) == b"cached"
    finally:
        os.close(fd)
    missing = tmp_path / "missing"
    assert not missing.exists()  # the miss is cached now (a negative dentry)
    with pytest.raises(FileNotFoundError):
        open_cached(str(missing))


def test_read_ahead_reads_the_whole_tree_database_at_most_once_a_while(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`TreeDB.read_ahead` has the whole database read into the page cache (the next
    loads of a walk find their pages there: mincore(2)); at most once a
    READ_AHEAD_EVERY_S, never for a file over READ_AHEAD_MAX, and a plain load reads only
    its own pages (bytes read from the disk, counted as the reads are submitted)."""
    from dwsd.store import treedb
    from tests.fusehelp import disk_reads_during, drop_pages, page_vector, wait_until
    with Store.open(tmp_path / "s", create=True) as store:
        store.objects.start_log()
        ids = trees.add_random_trees(store.objects, 1500)
    path = tmp_path / "s" / "objects" / "trees.db"
    assert not path.with_name("trees.db-wal").exists()  # all in the file (last close)
    size = path.stat().st_size
    assert size > 200 * 4096
    if drop_pages(path) > 0:
        pytest.skip("this file system keeps a dropped file's pages (tmpfs?)")
    monkeypatch.setattr(treedb, "READ_AHEAD_EVERY_S", 3600.0)
    reader = treedb.TreeDB(path, readonly=True)
    try:
        assert disk_reads_during(lambda: reader.get(ids[0])) < size // 2  # its own pages
        assert disk_reads_during(reader.read_ahead) >= size // 2
        wait_until(lambda: all(page_vector(path)), timeout=10, what="the whole file cached")
        drop_pages(path)
        assert disk_reads_during(reader.read_ahead) == 0  # within the interval: nothing
    finally:
        reader.close()
    monkeypatch.setattr(treedb, "READ_AHEAD_MAX", size - 1)
    reader = treedb.TreeDB(path, readonly=True)  # a new one is due to read ahead
    try:
        drop_pages(path)
        assert disk_reads_during(reader.read_ahead) == 0  # too large to be asked for
    finally:
        reader.close()


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


_SYS_CACHESTAT = 451 if UNIFIED_SYSCALLS else None  # Linux 6.5


def dirty_pages(path: Path) -> int:
    """How many of `path`'s pages in the page cache are dirty: written to, and no write
    to the disk started (cachestat(2)); skips the test on kernels without it."""
    if _SYS_CACHESTAT is None:
        pytest.skip(f"no cachestat(2) number known for {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        out = _CacheStat()
        if libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_Range(0, 0)), ctypes.byref(out),
                        0) != 0:
            pytest.skip(f"no cachestat(2): {os.strerror(ctypes.get_errno())}")
        return int(out.dirty)
    finally:
        os.close(fd)


def test_a_new_blobs_writeback_is_started_when_it_is_written(tmp_path: Path) -> None:
    """The batch flush before a catalog entry then finds the data on its way to disk."""
    source = tmp_path / "source"
    source.write_bytes(os.urandom(1 << 20))
    with Store.open(tmp_path / "s", create=True) as store:
        objects = store.objects
        small, new = objects.store_bytes("blobs", os.urandom(1 << 20))
        assert new
        fd = os.open(source, os.O_RDONLY)
        try:
            streamed, length, new = objects.put_stream("blobs", fd, bytearray(1 << 16))
        finally:
            os.close(fd)
        assert new and length == 1 << 20
        # What a file written and closed looks like here: still dirty, unless this
        # filesystem keeps no dirty pages (tmpfs) or something flushed it meanwhile.
        if dirty_pages(source) == 0:
            pytest.skip("the file written alongside has no dirty pages: nothing to compare")
        assert dirty_pages(objects.blob_file(small)) == 0
        assert dirty_pages(objects.blob_file(streamed)) == 0
        assert objects.get("blobs", streamed) == source.read_bytes()
