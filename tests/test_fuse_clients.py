"""Real clients on a mounted snapshot: rsync, tar, git, sqlite3, mmap, find, the shell.

One `dwsd mount` server (a subprocess) serves one store for the whole module: a snapshot,
tagged v1, of the foundation's odd tree (`data`), a git repository (`repo`) and an
SQLite database (`db`).
"""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
import sqlite3
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from dwsd.fuse.vfs import time_ns
from dwsd.store.catalog import SnapshotRecord
from tests import trees
from tests.fusehelp import require_fuse, run, serving, take_snapshot

GIT = ["git", "-c", "user.name=T", "-c", "user.email=t@example.org",
       "-c", "init.defaultBranch=main"]


@dataclass
class Mounted:
    view: Path          # <mount>/v1
    record: SnapshotRecord
    odd: Path           # the source of `data`
    repo: Path
    reference: Path     # a copy of the odd tree without `deep` (see `reference`)


def make_repo(root: Path) -> None:
    root.mkdir()
    run([*GIT, "init", "-q"], cwd=root)
    for i in range(3):
        trees.write(root / f"f{i}.txt", f"version {i}\n".encode())
        run([*GIT, "add", "."], cwd=root)
        assert run([*GIT, "commit", "-q", "-m", f"commit {i}"], cwd=root).returncode == 0


def make_db(path: Path) -> None:
    path.parent.mkdir()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE results (k TEXT, v REAL)")
        db.executemany("INSERT INTO results VALUES (?, ?)", [("a", 1.5), ("b", 2.5)])
    db.close()


def reference_copy(odd: Path, dest: Path, record: SnapshotRecord) -> Path:
    """The reference rsync and tar compare the view with: the odd tree copied without
    `deep`, whose path is longer than PATH_MAX ("filename overflows max-path len" for
    rsync, "File name too long" for tar extracting); `deep` is compared by a dir-fd
    walk instead. rsync -a keeps the top directory's mode and mtime, which the view
    shows as captured. --modify-window=-1: without it, rsync leaves a symlink it
    creates within the same second as its source with the copy's own mtime (rsync
    3.5 compares whole seconds first), and tar's bytes then differ."""
    res = run(["rsync", "-aHAX", "--modify-window=-1", "--exclude=/deep", f"{odd}/",
               f"{dest}/"])
    assert res.returncode == 0, res.stderr
    return dest


@pytest.fixture(scope="module")
def mounted(odd_tree: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Mounted]:
    require_fuse()
    work = tmp_path_factory.mktemp("clients")
    make_repo(work / "repo")
    make_db(work / "db" / "results.sqlite")
    trees.settle()
    record = take_snapshot(work / "store", {"data": odd_tree, "repo": work / "repo",
                                            "db": work / "db"}, tags=["v1"])
    reference = reference_copy(odd_tree, work / "reference", record)
    with serving(work / "store", work / "view"):
        yield Mounted(work / "view" / "v1", record, odd_tree, work / "repo", reference)


@pytest.fixture(scope="module")
def odd_description(odd_tree: Path) -> dict[bytes, dict[str, Any]]:
    return trees.describe_source(odd_tree)


def test_rsync_finds_no_difference(mounted: Mounted) -> None:
    res = run(["rsync", "-aHAXnci", "--delete", "--exclude=/deep",
               f"{mounted.reference}/", f"{mounted.view}/data/"])
    assert res.returncode == 0, res.stderr[:2000]
    assert res.stdout == b""


def test_a_dir_fd_walk_finds_the_source_including_past_path_max(
        mounted: Mounted, odd_description: dict[bytes, dict[str, Any]]) -> None:
    # Modes, owners, mtimes, content, symlink targets, xattrs and hard-link groups
    # (by st_ino) of every entry, `deep` included.
    assert trees.describe_source(mounted.view / "data") == odd_description
    assert any(len(path) > 4096 for path in odd_description)


def test_tar_gives_identical_bytes(mounted: Mounted) -> None:
    def tar(directory: Path) -> bytes:
        # atime and ctime are not captured (only mtime is), so tar's pax headers leave
        # them out; `deep` is not in the reference (see reference_copy).
        res = subprocess.run(
            ["tar", "--sort=name", "--xattrs", "--pax-option=delete=atime,delete=ctime",
             "--exclude=./deep", "-C", str(directory), "-cf", "-", "."],
            capture_output=True, timeout=60)
        assert res.returncode == 0, res.stderr[:2000]
        return res.stdout

    def listing(archive: bytes) -> list[str]:
        res = subprocess.run(["tar", "--xattrs", "--full-time", "-tvvf", "-"],
                             input=archive, capture_output=True, timeout=60)
        return res.stdout.decode(errors="replace").splitlines()
    view, reference = tar(mounted.view / "data"), tar(mounted.reference)
    if view != reference:  # say which member differs before failing on the bytes
        assert listing(view) == listing(reference)
    assert hashlib.sha256(view).digest() == hashlib.sha256(reference).digest()


def test_git_works_inside_a_snapshotted_repository(mounted: Mounted) -> None:
    repo = mounted.view / "repo"
    status = run(["git", "status", "--porcelain"], cwd=repo)
    assert status.returncode == 0 and status.stdout == b"", status.stderr
    log = run(["git", "log", "--format=%s"], cwd=repo)
    assert log.stdout.split(b"\n")[:3] == [b"commit 2", b"commit 1", b"commit 0"]
    fsck = run(["git", "fsck", "--full", "--strict"], cwd=repo)
    assert fsck.returncode == 0, fsck.stderr


def test_sqlite_reads_an_immutable_database(mounted: Mounted) -> None:
    uri = f"file:{mounted.view / 'db' / 'results.sqlite'}?immutable=1"
    res = run(["sqlite3", uri, "SELECT k, v FROM results ORDER BY k"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"a|1.5\nb|2.5\n"


def test_mmap_of_a_large_file_matches_its_hash(
        mounted: Mounted, odd_description: dict[bytes, dict[str, Any]]) -> None:
    with open(mounted.view / "data" / "big.bin", "rb") as f, \
            mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        assert hashlib.sha256(mapped).hexdigest() == odd_description[b"big.bin"]["sha256"]


def test_find_counts_the_same_entries(mounted: Mounted) -> None:
    def count(directory: Path) -> int:
        res = run(["find", "."], cwd=directory)
        assert res.returncode == 0, res.stderr[:2000]
        return res.stdout.count(b"\n")
    assert count(mounted.view / "data") == count(mounted.odd) > 40


def test_inode_numbers_stay_after_the_kernel_forgets_the_inodes(mounted: Mounted) -> None:
    def numbers() -> bytes:
        res = run(["find", ".", "-printf", "%i %p\\n"], cwd=mounted.view / "data")
        assert res.returncode == 0, res.stderr[:2000]
        return res.stdout
    before = numbers()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("2\n")  # dentries and inodes
    except PermissionError:
        pytest.skip("dropping the kernel's caches needs root")
    assert numbers() == before


def test_shell_cd_ls_cat_stat(mounted: Mounted) -> None:
    script = ("cd v1/data && ls >/dev/null && cat sub/hello.txt && "
              "stat -c '%a %h %s' link-1 && ls -l ../../latest | grep -c 'latest ->'")
    res = run(["sh", "-c", script], cwd=mounted.view.parent)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"hello\n644 2 12\n1\n"


def test_snapshot_directory_mtime_is_the_snapshot_time(mounted: Mounted) -> None:
    assert os.stat(mounted.view).st_mtime_ns == time_ns(mounted.record.time)
    assert os.readlink(mounted.view.parent / "latest") == mounted.record.id


@pytest.mark.parametrize("command", [
    "echo x > new.txt", "echo x >> sub/hello.txt", "mkdir newdir", "rm empty",
    "rmdir emptydir", "chmod 600 empty", "touch empty", "touch new.txt",
    "setfattr -n user.x -v y xattr.txt", "mv empty empty2", "ln empty empty3",
    "ln -s empty empty4", "setfattr -x user.origin xattr.txt",
])
def test_every_write_fails_with_erofs(mounted: Mounted, command: str) -> None:
    res = run(["sh", "-c", command], cwd=mounted.view / "data")
    assert res.returncode != 0
    assert b"Read-only file system" in res.stderr, res.stderr


def test_writes_through_system_calls_are_erofs(mounted: Mounted) -> None:
    data = mounted.view / "data"
    calls = [lambda: os.open(data / "empty", os.O_WRONLY),
             lambda: os.open(data / "new", os.O_CREAT | os.O_WRONLY),
             lambda: os.truncate(data / "empty", 0), lambda: os.mkdir(data / "d"),
             lambda: os.utime(data / "empty"), lambda: os.chown(data / "empty", 1, 1)]
    for call in calls:
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EROFS


def test_special_files_keep_their_kind(mounted: Mounted) -> None:
    data = mounted.view / "data"
    assert stat.S_ISFIFO(os.lstat(data / "fifo").st_mode)
    assert stat.S_ISSOCK(os.lstat(data / "socket").st_mode)
    assert os.readlink(data / "sub" / "dotdot") == "../outside"
    assert os.lstat(data / "mode4755").st_mode & 0o7777 == 0o4755
