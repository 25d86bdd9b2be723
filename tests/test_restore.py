"""Restore on real trees: fidelity, minimal writes, safety, options."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from dwsd.errors import RestoreError, UsageError
from dwsd.snapshot.restore import RESTORE_TEMP_PREFIX, Progress, plan_restore
from dwsd.store.ids import hash_bytes
from dwsd.workspace import Workspace
from tests import trees
from tests.conftest import WriteConfig

ROOT = Path(__file__).resolve().parent.parent


def rsync_differences(reference: Path, other: Path) -> str:
    # rsync works with paths, so the PATH_MAX-deep directory is left to describe_source.
    proc = subprocess.run(["rsync", "-aHAXnci", "--delete", "--exclude=/deep",
                           f"{reference}/", f"{other}/"], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode(errors="replace")


def mutate_everything(root: Path) -> None:
    (root / "sub" / "hello.txt").write_bytes(b"edited\n")
    (root / "mode600").unlink()
    trees.write(root / "added" / "new.txt", b"new\n")
    os.chmod(root / "mode4755", 0o755)
    os.setxattr(root / "xattr.txt", "user.origin", b"changed")
    (root / "dangling").unlink()
    os.symlink("elsewhere", root / "dangling")
    shutil.rmtree(root / "emptydir")
    (root / "emptydir").write_bytes(b"a file where a dir was\n")
    (root / "empty").unlink()
    (root / "empty").mkdir()
    trees.write(root / "empty" / "inside", b"a dir where a file was\n")
    (root / "link-1").write_bytes(b"link broken and rewritten\n")
    with open(root / "big.bin", "r+b") as f:
        f.seek(12345)
        f.write(b"patch")


@pytest.fixture
def odd_ws(tmp_path: Path, write_config: WriteConfig) -> tuple[Workspace, Path]:
    live = tmp_path / "live"
    trees.make_odd_tree(live)  # fresh: cp -a cannot copy its PATH_MAX-deep part
    ws = Workspace.open(write_config({"data": live}))
    yield ws, live
    ws.close()


def test_round_trip_restores_everything_and_can_be_undone(odd_ws: tuple[Workspace, Path],
                                                          tmp_path: Path) -> None:
    ws, live = odd_ws
    pristine = trees.describe_source(live)
    ws.snapshot(tags=["A"])
    reference = tmp_path / "reference"
    subprocess.run(["rsync", "-aHAX", "--exclude=/deep", f"{live}/", f"{reference}/"],
                   check=True, timeout=120)
    mutate_everything(live)
    mutated = trees.describe_source(live)
    result = ws.restore("A")
    assert rsync_differences(reference, live) == ""
    assert trees.describe_source(live) == pristine
    assert result.pre_restore is not None and result.pre_restore.kind == "pre-restore"
    ws.restore(result.pre_restore.id)
    assert trees.describe_source(live) == mutated


def test_restore_writes_only_what_differs(tmp_path: Path, write_config: WriteConfig) -> None:
    data = tmp_path / "data"
    paths = trees.make_many_files(data, 20_000)
    trees.settle()
    with Workspace.open(write_config({"data": data})) as ws:
        ws.snapshot(tags=["base"])
        for p in paths[5::7000]:
            p.write_bytes(b"changed")
        with trees.OpenCounter(data, trees.OpenCounter.IN_CLOSE_WRITE) as writes:
            result = ws.restore("base")
    assert len(writes.files_opened()) == 3
    assert result.files_written == 3 and result.removed == 0
    assert all(p.read_bytes().startswith(b"file ") for p in paths[5::7000])


@pytest.fixture
def two_ws(tmp_path: Path, write_config: WriteConfig) -> Workspace:
    trees.write(tmp_path / "data" / "d.csv", b"v1")
    trees.write(tmp_path / "data" / "sub" / "x.csv", b"x1")
    trees.write(tmp_path / "results" / "r.txt", b"r1")
    config = write_config({"data": tmp_path / "data", "results": tmp_path / "results"},
                          roles={"results": "results"})
    with Workspace.open(config) as ws:
        ws.snapshot(tags=["v1"])
        trees.write(tmp_path / "data" / "d.csv", b"v2")
        trees.write(tmp_path / "data" / "sub" / "x.csv", b"x2")
        trees.write(tmp_path / "results" / "r.txt", b"r2")
        yield ws


def test_results_are_never_rolled_back(two_ws: Workspace, tmp_path: Path) -> None:
    two_ws.restore("v1")
    assert (tmp_path / "data" / "d.csv").read_bytes() == b"v1"
    assert (tmp_path / "results" / "r.txt").read_bytes() == b"r2"
    with pytest.raises(UsageError, match="role 'results'"):
        two_ws.restore("v1", only=["results"])


@pytest.mark.parametrize("kwargs,message", [
    ({"only": ["data"], "leave": ["results"]}, "cannot be used together"),
    ({"only": ["nope"]}, "unknown resource 'nope'"),
    ({"paths": ["elsewhere/x"]}, "not inside a resource"),
    ({"paths": ["data/../results/r.txt"]}, "has a '..' component"),
    ({"paths": ["data//nosuch"]}, "'data/nosuch' is not in snapshot"),
    ({"leave": ["nope"]}, "unknown resource 'nope'"),
])
def test_bad_restore_requests_fail_cleanly(two_ws: Workspace, kwargs: dict[str, Any],
                                           message: str) -> None:
    with pytest.raises(UsageError, match=message):
        two_ws.restore("v1", **kwargs)
    assert len(two_ws.history()) == 1  # nothing taken, nothing touched


def test_path_restores_only_that_file(two_ws: Workspace, tmp_path: Path) -> None:
    two_ws.restore("v1", paths=["/data//./sub/x.csv"])  # as data/sub/x.csv
    assert (tmp_path / "data" / "sub" / "x.csv").read_bytes() == b"x1"
    assert (tmp_path / "data" / "d.csv").read_bytes() == b"v2"


def test_target_leaves_live_files_alone(two_ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    two_ws.restore("v1", target=out)
    assert (out / "data" / "d.csv").read_bytes() == b"v1"
    assert (out / "results" / "r.txt").read_bytes() == b"r1"
    assert (tmp_path / "data" / "d.csv").read_bytes() == b"v2"
    with pytest.raises(UsageError, match="not empty"):
        two_ws.restore("v1", target=out)


def test_target_with_a_path_writes_that_file_and_the_directories_above_it(
        two_ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    two_ws.restore("v1", paths=["data/sub/x.csv"], target=out)
    assert (out / "data" / "sub" / "x.csv").read_bytes() == b"x1"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "data", "data/sub", "data/sub/x.csv"]


def test_target_that_is_a_file_is_a_usage_error(two_ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_bytes(b"a file")
    with pytest.raises(UsageError, match="is not a directory"):
        two_ws.restore("v1", target=out)


def test_a_path_not_in_the_snapshot_is_a_usage_error(two_ws: Workspace, tmp_path: Path
                                                     ) -> None:
    with pytest.raises(UsageError, match=r"path 'data/nosuch' is not in snapshot \S+$"):
        two_ws.restore("v1", paths=["data/nosuch"], target=tmp_path / "out")
    with pytest.raises(UsageError, match="'data/sub/x.csv/x' is not in snapshot .* nor in "
                                         "the live files"):
        two_ws.restore("v1", paths=["data/sub/x.csv/x"])
    assert not (tmp_path / "out").exists() and len(two_ws.history()) == 1
    # In place, a path only the live files have is restored to the snapshot's state of
    # it: absent.
    trees.write(tmp_path / "data" / "new.csv", b"not in v1")
    two_ws.restore("v1", paths=["data/new.csv"])
    assert not (tmp_path / "data" / "new.csv").exists()
    assert (tmp_path / "data" / "d.csv").read_bytes() == b"v2"


def test_a_target_inside_the_store_is_a_usage_error(two_ws: Workspace, tmp_path: Path
                                                    ) -> None:
    for target in (tmp_path / "store" / "restored", tmp_path / "store"):
        with pytest.raises(UsageError, match=f"restore target {target} is inside the "
                                             f"store {tmp_path / 'store'}$"):
            two_ws.restore("v1", target=target)
    assert not (tmp_path / "store" / "restored").exists()
    (tmp_path / "via").symlink_to(tmp_path / "store")
    with pytest.raises(UsageError, match="is inside the store"):
        two_ws.restore("v1", target=tmp_path / "via" / "restored")
    assert two_ws.check().ok


def test_a_target_inside_the_view_is_a_usage_error(tmp_path: Path, data_dir: Path,
                                                   write_config: WriteConfig) -> None:
    config = write_config({"data": data_dir})
    config.write_text(config.read_text().replace("mount: null",
                                                 f"mount: {tmp_path / 'view'}"))
    trees.write(data_dir / "a.csv", b"1")
    with Workspace.open(config) as ws:
        ws.snapshot(tags=["v1"])
        with pytest.raises(UsageError, match=f"is inside the view's mount point "
                                             f"{tmp_path / 'view'}$"):
            ws.restore("v1", target=tmp_path / "view" / "v1" / "out")


def test_a_symlinked_resource_directory_is_captured_and_restored_through(
        tmp_path: Path, write_config: WriteConfig) -> None:
    disk = tmp_path / "disk" / "data"
    trees.write(disk / "sub" / "a.csv", b"v1")
    (tmp_path / "data").symlink_to(disk)
    with Workspace.open(write_config({"data": tmp_path / "data"})) as ws:
        first = ws.snapshot(tags=["v1"])
        assert first.record is not None and first.record.counts.files == 1
        trees.write(disk / "sub" / "a.csv", b"v2")
        ws.restore("v1")
        ws.restore("v1", target=tmp_path / "out")
    assert (disk / "sub" / "a.csv").read_bytes() == b"v1"
    assert (tmp_path / "data").is_symlink()  # written through, not replaced
    assert (tmp_path / "out" / "data" / "sub" / "a.csv").read_bytes() == b"v1"


def test_dry_run_plans_without_touching(two_ws: Workspace, tmp_path: Path) -> None:
    result = two_ws.restore("v1", dry_run=True)
    assert result.plans["data"].files == 2
    assert (tmp_path / "data" / "d.csv").read_bytes() == b"v2"
    assert [r.kind for r in two_ws.history()] == ["manual"]


def test_progress_counts_files_and_bytes(two_ws: Workspace) -> None:
    seen: list[tuple[int, int, int, int]] = []

    def progress(p: Progress) -> None:
        seen.append((p.files_done, p.files_total, p.bytes_done, p.bytes_total))

    two_ws.restore("v1", progress=progress)
    assert seen == [(1, 2, 2, 4), (2, 2, 4, 4)]


def test_diff_of_snapshots_reads_only_changed_trees(tmp_path: Path,
                                                    write_config: WriteConfig) -> None:
    from dwsd.snapshot.diff import diff_trees
    data = tmp_path / "data"
    paths = trees.make_many_files(data, 20_000)
    with Workspace.open(write_config({"data": data})) as ws:
        a = ws.snapshot().record
        for p in paths[::4000]:
            p.write_bytes(b"different")
        b = ws.snapshot().record
        assert a is not None and b is not None
        objects = ws.store.objects
        objects.reads = {"blobs": 0, "trees": 0}
        changes = list(diff_trees(objects, a.resources["data"], b.resources["data"]))
    assert sorted(c.path for c in changes) == sorted(
        os.fsencode(p.relative_to(data)) for p in paths[::4000])
    assert {c.status for c in changes} == {"modified"}
    # The two roots, and old and new of the five directories on changed paths.
    assert objects.reads == {"blobs": 0, "trees": 12}


def test_diff_against_live_files_tells_kinds_of_change(two_ws: Workspace, tmp_path: Path
                                                       ) -> None:
    os.chmod(tmp_path / "data" / "sub", 0o700)
    (tmp_path / "data" / "gone").mkdir()
    trees.write(tmp_path / "data" / "gone" / "f", b"")
    changes = two_ws.diff("v1")
    data = {(c.path, c.status) for c in changes["data"]}
    assert data == {(b"d.csv", "modified"), (b"sub", "metadata"),
                    (b"sub/x.csv", "modified"), (b"gone", "added"), (b"gone/f", "added")}
    assert [(c.path, c.status, c.size_delta) for c in changes["results"]] == [
        (b"r.txt", "modified", 0)]


def test_diff_between_snapshots(two_ws: Workspace, tmp_path: Path) -> None:
    (tmp_path / "data" / "d.csv").unlink()
    two_ws.snapshot(tags=["v2"])
    changes = two_ws.diff("v1", "v2")
    assert [(c.path, c.status) for c in changes["data"]] == [
        (b"d.csv", "removed"), (b"sub/x.csv", "modified")]


def test_prune_keeps_by_policy_and_collects_garbage(tmp_path: Path,
                                                    write_config: WriteConfig) -> None:
    import datetime as dt
    data = tmp_path / "data"
    now = [dt.datetime(2026, 11, 22, 0, 0, tzinfo=dt.timezone.utc)]
    config = write_config({"data": data}, extra="""
        retention:
          periodic: {last: 2}
          manual: {}
        """)
    trees.write(data / "f", b"0")
    with Workspace.open(config, clock=lambda: now[0]) as ws:
        ws.snapshot(tags=["hand"])
        for i in range(1, 5):
            now[0] += dt.timedelta(hours=1)
            trees.write(data / "f", b"%d" % i)
            ws.snapshot(kind="periodic")
        dry = ws.prune(dry_run=True)
        assert len(dry.deleted) == 2 and len(ws.history()) == 5
        result = ws.prune()
        assert result.deleted == dry.deleted
        assert [r.kind for r in ws.history()] == ["periodic", "periodic", "manual"]
        assert result.gc is not None and result.gc.removed == 4  # 2 blobs, 2 root trees
        assert ws.check(read_data=True).ok


def test_a_hard_link_group_stays_one_inode_when_one_member_only_needs_metadata(
        tmp_path: Path, write_config: WriteConfig) -> None:
    data = tmp_path / "data"
    trees.write(data / "a", b"shared\n")
    os.link(data / "a", data / "b")
    with Workspace.open(write_config({"data": data})) as ws:
        ws.snapshot(tags=["linked"])
        os.chmod(data / "a", 0o600)  # a: metadata only (b follows: one inode)
        (data / "b").unlink()
        trees.write(data / "b", b"another file\n")  # b: other content
        ws.restore("linked")
    a, b = os.stat(data / "a"), os.stat(data / "b")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert (data / "b").read_bytes() == b"shared\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside every resource, with content a restore could overwrite."""
    trees.write(tmp_path / "outside" / "x.csv", b"not yours")
    trees.write(tmp_path / "outside" / "other", b"keep")
    return tmp_path / "outside"


def sub_replaced_by(kind: str, sub: Path, outside: Path) -> None:
    shutil.rmtree(sub)
    if kind == "symlink":
        os.symlink(outside, sub)
    else:
        sub.write_bytes(b"a file where a directory was")


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_path_restore_replaces_what_stands_in_the_way(two_ws: Workspace, tmp_path: Path,
                                                      outside: Path, kind: str) -> None:
    sub = tmp_path / "data" / "sub"
    sub_replaced_by(kind, sub, outside)
    before = trees.describe_source(outside)
    two_ws.restore("v1", paths=["data/sub/x.csv"])
    assert not sub.is_symlink() and sub.is_dir()
    assert (sub / "x.csv").read_bytes() == b"x1"
    assert (tmp_path / "data" / "d.csv").read_bytes() == b"v2"  # outside the limit
    assert trees.describe_source(outside) == before
    assert two_ws.pending_restore() is None


def test_restore_never_writes_through_a_symlinked_directory(two_ws: Workspace,
                                                            tmp_path: Path,
                                                            outside: Path) -> None:
    sub = tmp_path / "data" / "sub"
    sub_replaced_by("symlink", sub, outside)
    before = trees.describe_source(outside)
    two_ws.restore("v1")
    assert trees.describe_source(outside) == before
    assert not sub.is_symlink() and sub.is_dir()
    wanted = trees.describe_snapshot(two_ws.store.objects,
                                     two_ws.get("v1").resources["data"])
    assert trees.describe_source(tmp_path / "data") == wanted


def test_the_undo_point_is_a_pre_restore_record_even_for_a_saved_state(
        two_ws: Workspace, tmp_path: Path) -> None:
    saved = two_ws.snapshot(kind="periodic", message="").record  # live state: saved
    assert saved is not None
    result = two_ws.restore("v1")
    pre = result.pre_restore
    assert pre is not None and pre.id != saved.id and pre.hash == saved.hash
    assert pre.kind == "pre-restore"
    assert pre.message == f"before restoring {result.snapshot.id}"
    assert two_ws.get(saved.id) == saved  # kind and message untouched
    assert [r.kind for r in two_ws.history()] == ["pre-restore", "periodic", "manual"]
    assert two_ws.get(saved.hash[:8]) == pre  # one content: the newest record
    two_ws.restore(pre.hash[:8])
    assert (tmp_path / "data" / "d.csv").read_bytes() == b"v2"


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_restored_files_are_durable_before_the_journal_goes(
        two_ws: Workspace, tmp_path: Path) -> None:
    two_ws.close()  # the child takes the store's lock
    trace = tmp_path / "trace"
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=syncfs,rename,renameat,renameat2,unlink",
         "-o", str(trace), sys.executable, "-m", "tests.crashdriver",
         str(tmp_path / "dwsd.yaml"), "restore", "v1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    calls = trace.read_text().splitlines()
    journal_gone = next(i for i, c in enumerate(calls)
                        if "unlink(" in c and "restore.json" in c)
    last_file_renamed = max(i for i, c in enumerate(calls[:journal_gone]) if "rename" in c)
    assert any(" syncfs(" in c for c in calls[last_file_renamed:journal_gone]), calls


def test_planning_reads_each_snapshot_tree_once(tmp_path: Path,
                                                write_config: WriteConfig) -> None:
    data = tmp_path / "data"
    paths = trees.make_many_files(data, 400, per_dir=200)
    with Workspace.open(write_config({"data": data})) as ws:
        base = ws.snapshot().record
        for p in paths:
            p.write_bytes(b"changed")
        live = ws.snapshot().record
        assert base is not None and live is not None
        objects = ws.store.objects
        objects.reads = {"blobs": 0, "trees": 0}
        plan = plan_restore(objects, live.resources["data"], base.resources["data"])
    assert len(plan.actions) == 400
    # The diff reads old and new of the root and both directories; noting the
    # directories to reset reads the snapshot's root once more, not once per file.
    assert objects.reads == {"blobs": 0, "trees": 7}


@pytest.fixture
def many_ws(tmp_path: Path, write_config: WriteConfig) -> Iterator[tuple[Workspace, Path]]:
    """300 small files in 3 directories, two hard-link groups and a file of several
    read buffers, snapshotted as `many`: enough for the writers to run side by side."""
    data = tmp_path / "data"
    trees.make_many_files(data, 300)
    trees.write(data / "big.bin", bytes(range(256)) * (9 << 12))  # 2.25 MiB
    for group in ("a", "b"):
        trees.write(data / f"{group}0", f"group {group}\n".encode())
        for i in (1, 2, 3):
            os.link(data / f"{group}0", data / "d0001" / f"{group}{i}")
    ws = Workspace.open(write_config({"data": data}))
    ws.snapshot(tags=["many"])
    yield ws, data
    ws.close()


def temp_files(root: Path) -> list[str]:
    return [name for _, _, names in os.walk(root) for name in names
            if os.fsencode(name).startswith(RESTORE_TEMP_PREFIX)]


def test_a_many_file_restore_is_identical_and_keeps_link_groups(
        many_ws: tuple[Workspace, Path], tmp_path: Path) -> None:
    ws, data = many_ws
    out = tmp_path / "out"
    result = ws.restore("many", target=out)
    assert result.files_written == 309 and not result.errors
    assert rsync_differences(data, out / "data") == ""
    for group in ("a", "b"):
        inodes = {os.stat(p).st_ino for p in [out / "data" / f"{group}0",
                                               *(out / "data" / "d0001").glob(f"{group}?")]}
        assert len(inodes) == 1


def test_progress_comes_in_plan_order_on_the_calling_thread(
        many_ws: tuple[Workspace, Path], tmp_path: Path) -> None:
    ws, _ = many_ws
    seen: list[tuple[bytes, int, threading.Thread]] = []

    def progress(p: Progress) -> None:
        seen.append((p.path, p.files_done, threading.current_thread()))

    ws.restore("many", target=tmp_path / "out", progress=progress)
    assert [done for _, done, _ in seen] == list(range(1, 310))
    assert [path for path, _, _ in seen] == sorted((path for path, _, _ in seen),
                                                   key=lambda p: p.split(b"/"))
    assert {thread for _, _, thread in seen} == {threading.current_thread()}


def test_a_corrupt_blob_skips_that_file_only(many_ws: tuple[Workspace, Path],
                                             tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    ws, data = many_ws
    blob = ws.store.objects.path("blobs", hash_bytes((data / "d0002" / "f000250.txt").read_bytes()))
    os.chmod(blob, 0o644)
    blob.write_bytes(b"not what was stored".ljust(64, b"."))  # same size, other bytes
    out = tmp_path / "out"
    result = ws.restore("many", target=out)
    assert [(name, path) for name, path, _ in result.errors] == [
        ("data", b"d0002/f000250.txt")]
    assert not (out / "data" / "d0002" / "f000250.txt").exists()
    assert result.files_written == 308 and temp_files(out) == []
    assert [r.levelno for r in caplog.records if r.levelno >= logging.WARNING] == [
        logging.WARNING]
    caplog.clear()


def test_a_path_restore_into_a_directory_reads_only_the_trees_on_its_way(
        tmp_path: Path, write_config: WriteConfig) -> None:
    data = tmp_path / "data"
    trees.make_many_files(data, 2000, per_dir=100)  # 20 directories
    with Workspace.open(write_config({"data": data})) as ws:
        ws.snapshot(tags=["many"])
        ws.store.objects.reads = {"blobs": 0, "trees": 0}
        result = ws.restore("many", paths=["data/d0007"], target=tmp_path / "out",
                            dry_run=True)
        assert result.plans["data"].files == 100
        assert ws.store.objects.reads["trees"] <= 3  # root (twice at most) and d0007


def test_sparse_files_stay_sparse_in_the_store_and_when_restored(
        tmp_path: Path, data_dir: Path, write_config: WriteConfig) -> None:
    hole = 8 << 20
    with open(data_dir / "image.bin", "wb") as f:  # data, a hole, data, a hole at the end
        f.write(b"head" * 1000)
        f.seek(hole)
        f.write(os.urandom(100_000))
        f.truncate(3 * hole)
    (data_dir / "empty.bin").write_bytes(bytes(200_000))  # zeros written as data
    source = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    with Workspace.open(write_config({"data": data_dir})) as ws:
        ws.snapshot(tags=["v1"])
        blob = ws.store.objects.path("blobs", hash_bytes(source["image.bin"]))
        assert blob.stat().st_size == 3 * hole and used(blob) < 1 << 20
        ws.restore("v1", target=tmp_path / "out")
        (data_dir / "image.bin").write_bytes(b"changed")
        ws.restore("v1")
    for restored in (tmp_path / "out" / "data", data_dir):  # in place: image.bin only
        assert {p.name: p.read_bytes() for p in restored.iterdir()} == source
        assert used(restored / "image.bin") < 1 << 20
    assert used(tmp_path / "out" / "data" / "empty.bin") < 64 << 10


def used(path: Path) -> int:
    """Bytes of disk a file takes (its holes take none)."""
    return path.stat().st_blocks * 512


def test_a_target_that_cannot_be_made_is_a_restore_error(two_ws: Workspace,
                                                         tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "deeper")
    with pytest.raises(RestoreError, match="cannot make or open the directory to "
                                           "restore into"):
        two_ws.restore("v1", target=tmp_path / "dangling")
    with pytest.raises(RestoreError, match="cannot make or open"):
        two_ws.restore("v1", target="/proc/dwsd-cannot-be-here")
