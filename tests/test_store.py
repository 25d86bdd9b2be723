"""The store on real disks: format, writer lock, full disks, check."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from dwsd.errors import CorruptObjectError, StoreError, StoreLockedError
from dwsd.store.fsutil import TEMP_PREFIX
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


def test_full_disk_gives_one_error_and_loses_nothing(tmp_path: Path, small_tmpfs: Path,
                                                     write_config: WriteConfig) -> None:
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
