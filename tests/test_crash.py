"""Crash safety: the process is SIGKILLed at named points; reopening finds a consistent
store, no temp files, the history that committed, and restores completed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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


def crash(config: Path, op: str, point: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.crashdriver", str(config), op],
                          cwd=ROOT, env={**os.environ, "DWSD_CRASH_AT": point},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def assert_consistent(ws: Workspace) -> None:
    assert ws.check(read_data=True).ok
    assert [p for p in ws.store.root.rglob(TEMP_PREFIX + "*")] == []


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
        assert_consistent(ws)
        tags = [r.tags for r in ws.history()]
        assert tags == ([("crashed",), ("base",)] if committed else [("base",)])
        again = ws.snapshot(tags=["after"]).record
        assert again is not None
        source = trees.describe_source(data)
        assert trees.describe_snapshot(ws.store.objects, again.resources["data"]) == source


def test_crash_mid_restore_is_completed_on_open(setup: tuple[Path, Path],
                                                caplog: pytest.LogCaptureFixture) -> None:
    config, data = setup
    with Workspace.open(config) as ws:
        wanted = trees.describe_snapshot(ws.store.objects, ws.get("base").resources["data"])
    crash(config, "restore", "restore-file:7")
    with Workspace.open(config, resume=False) as ws:
        assert ws.pending_restore() is not None
        assert trees.describe_source(data) != wanted  # a mix, until resumed
    with Workspace.open(config) as ws:  # resumes
        assert ws.pending_restore() is None
        assert trees.describe_source(data) == wanted
        assert [r.kind for r in ws.history()] == ["pre-restore", "manual"]
        assert_consistent(ws)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"completing the interrupted restore of snapshot {wanted_id(config)}"]
    caplog.clear()


def wanted_id(config: Path) -> str:
    with Workspace.open(config) as ws:
        return ws.get("base").id


def test_crash_between_prune_and_gc(setup: tuple[Path, Path]) -> None:
    config, _ = setup
    with Workspace.open(config) as ws:
        ws.snapshot(tags=["second"])
    crash(config, "prune", "after-delete-commit")
    with Workspace.open(config) as ws:
        assert [r.tags for r in ws.history()] == [("second",)]
        assert_consistent(ws)
        assert ws.gc().removed > 0  # the garbage the crash left is collected now


def test_crash_mid_gc(setup: tuple[Path, Path]) -> None:
    config, _ = setup
    with Workspace.open(config) as ws:
        ws.snapshot(tags=["second"])
        ws.delete("base")
    crash(config, "gc", "gc-remove:3")
    with Workspace.open(config) as ws:
        assert [r.tags for r in ws.history()] == [("second",)]
        assert_consistent(ws)
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
