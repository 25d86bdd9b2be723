"""Crash safety: the process is SIGKILLed at named points; reopening finds a consistent
store, no temp files (in the store or the resources), the history that committed, and
restores completed."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dwsd.errors import RestoreError
from dwsd.snapshot.restore import RESTORE_TEMP_PREFIX
from dwsd.store.fsutil import TEMP_PREFIX
from dwsd.workspace import Workspace
from tests import trees
from tests.conftest import WriteConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def setup(tmp_path: Path, write_config: WriteConfig) -> tuple[Path, Path]:
    data = tmp_path / "data"
    trees.make_many_files(data, 300, per_dir=30)
    config = write_config({"data": data}, extra="""
        retention:
          manual: {last: 1, tagged: false}
        """)
    with Workspace.open(config) as ws:
        ws.snapshot(tags=["base"])
    for i, p in enumerate(sorted(data.rglob("*.txt"))[::10]):
        p.write_bytes(b"edited %d" % i)
    trees.write(data / "extra" / "new.bin", os.urandom(100_000))
    return config, data


def crash(config: Path, op: str, point: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.crashdriver", str(config), op,
                           *args],
                          cwd=ROOT, env={**os.environ, "DWSD_CRASH_AT": point},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def assert_consistent(ws: Workspace, data: Path) -> None:
    assert ws.check(read_data=True).ok
    assert ws.pending_restore() is None
    temps = [TEMP_PREFIX + "*", os.fsdecode(RESTORE_TEMP_PREFIX) + "*"]
    assert [p for top in (ws.store.root, data) for t in temps for p in top.rglob(t)] == []


@pytest.mark.parametrize("point,committed", [
    ("objects-written:5", False),
    ("before-catalog-commit", False),
    ("after-catalog-commit", True),
])
def test_crash_during_snapshot(setup: tuple[Path, Path], point: str, committed: bool
                               ) -> None:
    config, data = setup
    crash(config, "snapshot", point)
    with Workspace.open(config) as ws:
        assert_consistent(ws, data)
        tags = [r.tags for r in ws.history()]
        assert tags == ([("crashed",), ("base",)] if committed else [("base",)])
        again = ws.snapshot(tags=["after"]).record
        assert again is not None
        source = trees.describe_source(data)
        assert trees.describe_snapshot(ws.store.objects, again.resources["data"]) == source


@pytest.mark.parametrize("point", ["restore-file:7", "restore-temp-written:7"])
def test_crash_mid_restore_is_completed_on_open(setup: tuple[Path, Path], point: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    config, data = setup
    with Workspace.open(config) as ws:
        wanted = trees.describe_snapshot(ws.store.objects, ws.get("base").resources["data"])
    crash(config, "restore", point)
    with Workspace.open(config, resume=False) as ws:
        assert ws.pending_restore() is not None
        assert trees.describe_source(data) != wanted  # a mix, until resumed
    with Workspace.open(config) as ws:  # resumes
        assert ws.pending_restore() is None
        assert trees.describe_source(data) == wanted
        assert [r.kind for r in ws.history()] == ["pre-restore", "manual"]
        assert_consistent(ws, data)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"completing the interrupted restore of snapshot {wanted_id(config)}"]
    caplog.clear()


def wanted_id(config: Path) -> str:
    with Workspace.open(config) as ws:
        return ws.get("base").id


def test_crash_between_prune_and_gc(setup: tuple[Path, Path]) -> None:
    config, data = setup
    with Workspace.open(config) as ws:
        ws.snapshot(tags=["second"])
    crash(config, "prune", "after-delete-commit")
    with Workspace.open(config) as ws:
        assert [r.tags for r in ws.history()] == [("second",)]
        assert_consistent(ws, data)
        assert ws.gc().removed > 0  # the garbage the crash left is collected now


def test_crash_mid_gc(setup: tuple[Path, Path]) -> None:
    config, data = setup
    with Workspace.open(config) as ws:
        ws.snapshot(tags=["second"])
        ws.delete("base")
    crash(config, "gc", "gc-remove:3")
    with Workspace.open(config) as ws:
        assert [r.tags for r in ws.history()] == [("second",)]
        assert_consistent(ws, data)
        assert ws.gc().removed > 0
        assert ws.gc().removed == 0


def test_dirty_snapshot_after_a_crash_before_the_state_save_walks_it_all(
        setup: tuple[Path, Path]) -> None:
    # The crash leaves the capture state one snapshot behind the catalog: dirty paths
    # (changes since the *latest* snapshot) must not be applied on top of it.
    config, data = setup
    crash(config, "snapshot", "after-catalog-commit")
    trees.write(data / "later.txt", b"after the crash")
    with Workspace.open(config) as ws:
        rec = ws.snapshot(tags=["dirty"], dirty={"data": [b"later.txt"]}).record
        assert rec is not None
        stored = trees.describe_snapshot(ws.store.objects, rec.resources["data"])
    assert stored == trees.describe_source(data)


def test_a_path_restore_cut_between_temp_and_rename_leaves_no_temp_file(
        setup: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    # The temp file sits beside the one file asked for, outside the limit: the resumed
    # restore must still remove it, and no later snapshot may capture it.
    config, data = setup
    target = data / "d0003" / "f000100.txt"
    crash(config, "restore", "restore-temp-written", "base", "data/d0003/f000100.txt")
    assert any(os.fsencode(p.name).startswith(RESTORE_TEMP_PREFIX)
               for p in target.parent.iterdir())  # the crash left it there
    with Workspace.open(config) as ws:  # resumes
        assert_consistent(ws, data)
        assert target.read_bytes().startswith(b"file 100")
        assert (data / "d0000" / "f000000.txt").read_bytes() == b"edited 0"  # not asked
        rec = ws.snapshot(tags=["after"]).record
        assert rec is not None
        stored = trees.describe_snapshot(ws.store.objects, rec.resources["data"])
    assert stored == trees.describe_source(data)
    assert [r.levelname for r in caplog.records if r.levelno >= logging.WARNING] == [
        "WARNING"]  # "completing the interrupted restore ..."
    caplog.clear()


def test_snapshots_an_unfinished_restore_needs_are_not_deleted(
        setup: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    config, data = setup
    crash(config, "restore", "restore-file:7")
    data.rename(data.with_name("unmounted"))
    with Workspace.open(config) as ws:
        journal = ws.pending_restore()
        assert journal is not None and journal.pre_restore is not None
        with pytest.raises(RestoreError, match="needed by the unfinished restore"):
            ws.delete(journal.snapshot)
        result = ws.prune()
        assert {journal.snapshot, journal.pre_restore} <= set(result.kept)
        assert journal.snapshot in {r.id for r in ws.history()}
    caplog.clear()


def test_a_restore_that_cannot_be_completed_does_not_stop_the_opening(
        setup: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    config, data = setup
    crash(config, "restore", "restore-file:7")
    data.rename(data.with_name("unmounted"))  # its disk is not there at the next start
    with Workspace.open(config) as ws:
        assert ws.resume_error is not None and "cannot read resource" in ws.resume_error
        assert ws.pending_restore() is not None  # kept, to finish later
        assert [r.levelname for r in caplog.records if r.levelno >= logging.WARNING] == [
            "WARNING", "ERROR"]
    caplog.clear()
    data.with_name("unmounted").rename(data)
    with Workspace.open(config) as ws:
        assert ws.resume_error is None
        assert_consistent(ws, data)
        wanted = trees.describe_snapshot(ws.store.objects, ws.get("base").resources["data"])
    assert trees.describe_source(data) == wanted
    caplog.clear()


@pytest.mark.parametrize("point,deleted", [
    ("delete-before-commit", False),
    ("after-delete-commit", True),
])
def test_crash_mid_delete(setup: tuple[Path, Path], point: str, deleted: bool) -> None:
    config, data = setup
    with Workspace.open(config) as ws:
        ws.snapshot(tags=["second"])
    crash(config, "delete", point, "base")
    with Workspace.open(config) as ws:
        assert [r.tags for r in ws.history()] == (
            [("second",)] if deleted else [("second",), ("base",)])
        assert_consistent(ws, data)
        ws.gc()
        assert ws.check(read_data=True).ok


def test_a_crash_between_a_state_rewrite_and_its_log_removal_ignores_the_old_log(
        setup: tuple[Path, Path]) -> None:
    # The log left behind holds changes to the state file the rewrite replaced: applied
    # to the new one, they would undo what it holds.
    config, data = setup
    changed = [os.fsencode(p.relative_to(data)) for p in sorted(data.rglob("*.txt"))[::10]]
    with Workspace.open(config) as ws:
        log = ws.store.state_dir / "data.state.log"
        ws.snapshot(tags=["logged"], dirty={"data": changed + [b"extra"]})
    assert log.stat().st_size > 0  # the dirty-path snapshot's record
    trees.write(data / "d0000" / "f000001.txt", b"changed again")
    crash(config, "snapshot-state-whole", "state-rewritten")
    assert log.exists()
    trees.write(data / "d0001" / "f000031.txt", b"after the crash")
    with Workspace.open(config) as ws:
        assert ws.get("latest").tags == ("crashed",)
        result = ws.snapshot(tags=["after"], dirty={"data": [b"d0001/f000031.txt"]})
        # The state is the crashed snapshot's, so only the dirty path was looked at.
        assert result.captures["data"].counters.dirs_listed == 0
        rec = result.record
        assert rec is not None
        stored = trees.describe_snapshot(ws.store.objects, rec.resources["data"])
    assert stored == trees.describe_source(data)
    assert not log.exists()  # the next save wrote the state whole
