"""Restore on real trees: fidelity, minimal writes, safety, options."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dwsd.errors import UsageError
from dwsd.snapshot.restore import Progress
from dwsd.workspace import Workspace
from tests import trees
from tests.conftest import WriteConfig


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
])
def test_bad_restore_requests_fail_cleanly(two_ws: Workspace, kwargs: dict[str, Any],
                                           message: str) -> None:
    with pytest.raises(UsageError, match=message):
        two_ws.restore("v1", **kwargs)
    assert len(two_ws.history()) == 1  # nothing taken, nothing touched


def test_path_restores_only_that_file(two_ws: Workspace, tmp_path: Path) -> None:
    two_ws.restore("v1", paths=["data/sub/x.csv"])
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
