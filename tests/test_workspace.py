"""The workspace API over a real store and real trees."""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dwsd.errors import CaptureError, RefError, TagError, UsageError
from dwsd.snapshot import capture
from dwsd.snapshot.diff import Change
from dwsd.workspace import Workspace
from tests import trees
from tests.conftest import WriteConfig


@pytest.fixture
def ws(tmp_path: Path, write_config: WriteConfig) -> Workspace:
    for name in ("data", "code"):
        trees.write(tmp_path / name / "a.txt", f"{name} a\n".encode())
        trees.write(tmp_path / name / "sub" / "b.txt", f"{name} b\n".encode())
    config = write_config({"data": tmp_path / "data", "code": tmp_path / "code"},
                          roles={"code": "code"})
    with Workspace.open(config) as w:
        yield w


def test_snapshot_records_every_resource(ws: Workspace) -> None:
    result = ws.snapshot(tags=["v1"], message="baseline")
    rec = result.record
    assert result.created and rec is not None
    assert set(rec.resources) == {"data", "code"}
    assert (rec.kind, rec.tags, rec.message, rec.number) == ("manual", ("v1",), "baseline", 1)
    assert rec.counts.files == 4 and rec.counts.changed_files == 4
    assert rec.counts.added_bytes == result.bytes_written > 0
    assert ws.get("v1") == rec == ws.get("latest")


def test_reader_processes_are_kept_between_snapshots_and_stopped_by_close(
        tmp_path: Path, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture, "PROCESSES_AFTER", 0)  # the first snapshot starts them
    data = tmp_path / "data"
    trees.make_many_files(data, 20)
    ws = Workspace.open(write_config({"data": data}))
    try:
        ws.snapshot(tags=["one"])
        pids = trees.child_pids()
        assert pids != []
        (data / "more.txt").write_bytes(b"more")
        ws.snapshot(tags=["two"])
        assert sorted(trees.child_pids()) == sorted(pids)  # the same ones, none new
    finally:
        ws.close()
    assert trees.child_pids() == []


def test_same_content_merges_into_the_existing_snapshot(ws: Workspace) -> None:
    first = ws.snapshot(tags=["v1"]).record
    again = ws.snapshot(tags=["v1-again"], message="same data")
    assert not again.created and again.record is not None
    assert again.record.id == first.id if first else False
    assert again.record.tags == ("v1", "v1-again")
    assert again.objects_written == 0
    assert len(ws.history()) == 1


def test_retagging_unchanged_content_is_a_no_op(ws: Workspace) -> None:
    first = ws.snapshot(tags=["v1", "v1"], message="m").record
    assert first is not None and first.tags == ("v1",)
    again = ws.snapshot(tags=["v1"], message="m")
    assert not again.created and again.record == first
    assert len(ws.history()) == 1


def test_a_tag_on_the_latest_snapshot_is_refused_once_content_changed(
        ws: Workspace, tmp_path: Path) -> None:
    ws.snapshot(tags=["v1"])
    (tmp_path / "data" / "a.txt").write_bytes(b"changed")
    with pytest.raises(TagError, match="already on snapshot"):
        ws.snapshot(tags=["v1"])
    assert len(ws.history()) == 1
    assert ws.store.objects.log.objects_written == 0  # the new blob was rolled back
    assert ws.check().ok
    # The rolled-back objects are forgotten: the next snapshot's durability sweep (a
    # few objects: fsynced one by one) must not look for them.
    (tmp_path / "data" / "a.txt").write_bytes(b"changed again")
    assert ws.snapshot(tags=["v2"]).created


def test_periodic_checkpoint_without_change_is_not_taken(ws: Workspace) -> None:
    ws.snapshot(kind="periodic")
    result = ws.snapshot(kind="periodic")
    assert result.record is None and not result.created
    assert len(ws.history()) == 1


def test_change_gives_a_new_snapshot_with_counts(ws: Workspace, tmp_path: Path) -> None:
    ws.snapshot()
    (tmp_path / "data" / "a.txt").write_bytes(b"changed!")
    rec = ws.snapshot(kind="periodic").record
    assert rec is not None and rec.kind == "periodic"
    assert rec.counts.changed_files == 1
    # The new blob, and the root tree that names it.
    assert len(b"changed!") < rec.counts.added_bytes < len(b"changed!") + 300
    assert [r.number for r in ws.history()] == [2, 1]


@pytest.mark.parametrize("dirty", [False, True], ids=["full-walk", "dirty-paths"])
def test_a_snapshot_counts_the_files_it_removes(ws: Workspace, tmp_path: Path,
                                                dirty: bool) -> None:
    first = ws.snapshot().record
    (tmp_path / "data" / "a.txt").unlink()
    shutil.rmtree(tmp_path / "code" / "sub")
    paths = {"data": [b"a.txt"], "code": [b"sub"]} if dirty else None
    rec = ws.snapshot(dirty=paths).record
    assert first is not None and first.counts.removed_files == 0
    assert rec is not None and rec.counts.files == 2
    assert (rec.counts.changed_files, rec.counts.removed_files) == (0, 2)
    (tmp_path / "data" / "a.txt").write_bytes(b"back\n")
    again = ws.snapshot(dirty={"data": [b"a.txt"], "code": []} if dirty else None).record
    assert again is not None
    assert (again.counts.changed_files, again.counts.removed_files) == (1, 0)
    os.rename(tmp_path / "data" / "a.txt", tmp_path / "data" / "moved.txt")
    moved = ws.snapshot(dirty={"data": [b"a.txt", b"moved.txt"], "code": []} if dirty
                        else None).record
    assert moved is not None and moved.counts.files == 3
    assert (moved.counts.changed_files, moved.counts.removed_files) == (1, 1)


def test_dirty_mode_matches_a_full_walk(ws: Workspace, tmp_path: Path) -> None:
    ws.snapshot()
    (tmp_path / "code" / "sub" / "b.txt").write_bytes(b"edited")
    dirty = ws.snapshot(dirty={"code": [b"sub/b.txt"]}).record
    full = ws.snapshot(tags=["full"]).record
    assert dirty is not None and full is not None and dirty.hash == full.hash


def test_dirty_path_snapshots_update_the_stat_cache_in_place_and_failed_ones_not_at_all(
        ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dirty-path snapshot's cost must follow the change: the stat cache is not
    copied (the same dict, changed in place), and a snapshot that fails leaves it as it
    was, so the next one still sees the change."""
    ws.snapshot()
    files = ws._states["code"].files
    target = tmp_path / "code" / "sub" / "b.txt"
    target.write_bytes(b"edited")
    ws.snapshot(dirty={"code": [b"sub/b.txt"]})
    assert ws._states["code"].files is files and files[b"sub/b.txt"].size == 6
    target.write_bytes(b"edited again")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ws, "_record", fail)
    with pytest.raises(OSError):
        ws.snapshot(dirty={"code": [b"sub/b.txt"]})
    assert files[b"sub/b.txt"].size == 6
    monkeypatch.undo()
    result = ws.snapshot(dirty={"code": [b"sub/b.txt"]})
    assert result.counters.files_opened == 1 and files[b"sub/b.txt"].size == 12
    full = ws.snapshot(tags=["full"]).record
    assert result.record is not None and full is not None and result.record.hash == full.hash


def test_tags_are_checked_before_any_work(ws: Workspace, tmp_path: Path) -> None:
    ws.snapshot(tags=["v1"])
    (tmp_path / "data" / "a.txt").write_bytes(b"changed")
    ws.snapshot()
    reads = dict(ws.store.objects.reads)
    with pytest.raises(TagError, match="already on snapshot"):
        ws.snapshot(tags=["v1"])  # on an older snapshot: refused before any capture
    assert ws.store.objects.reads == reads
    with pytest.raises(TagError):
        ws.snapshot(tags=["a/b"])
    with pytest.raises(UsageError):
        ws.snapshot(kind="hourly")


def test_tag_untag_delete(ws: Workspace, tmp_path: Path) -> None:
    first = ws.snapshot().record
    (tmp_path / "data" / "new.txt").write_bytes(b"new")
    ws.snapshot()
    assert first is not None
    ws.tag(first.id, "keep")
    assert ws.get("keep").id == first.id
    ws.untag("keep")
    with pytest.raises(RefError):
        ws.get("keep")
    ws.delete(first.id)
    assert [r.id for r in ws.history()] != [first.id] and len(ws.history()) == 1


def test_catalog_survives_reopening(ws: Workspace) -> None:
    rec = ws.snapshot(tags=["v1"]).record
    config = ws.config
    ws.close()
    with Workspace.open(config) as again:
        assert again.get("v1") == rec


def test_gc_removes_only_what_nothing_uses(ws: Workspace, tmp_path: Path) -> None:
    first = ws.snapshot().record
    (tmp_path / "data" / "a.txt").write_bytes(b"second version")
    ws.snapshot()
    assert first is not None
    ws.delete(first.id)
    result = ws.gc()
    assert result.removed > 0  # the first a.txt blob and the trees above it
    assert ws.check(read_data=True).ok
    assert ws.gc().removed == 0


def test_ids_use_the_clock(tmp_path: Path, write_config: WriteConfig) -> None:
    trees.write(tmp_path / "d" / "x", b"x")
    fixed = dt.datetime(2026, 11, 22, 10, 30, 5, tzinfo=dt.timezone.utc)
    with Workspace.open(write_config({"d": tmp_path / "d"}), clock=lambda: fixed) as w:
        assert w.snapshot().record.id == "20261122T103005Z"  # type: ignore[union-attr]


def test_snapshot_progress_estimates_from_the_last_capture(ws: Workspace, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    from dwsd import workspace as workspace_module
    from dwsd.snapshot.restore import Progress
    monkeypatch.setattr(workspace_module, "PROGRESS_EVERY", 0.0)  # report every file
    ws.snapshot()
    (tmp_path / "data" / "a.txt").write_bytes(b"longer content")
    seen: list[tuple[int, int, int, int]] = []

    def progress(p: Progress) -> None:
        seen.append((p.files_done, p.files_total, p.bytes_done, p.bytes_total))

    ws.snapshot(progress=progress)
    assert [s[0] for s in seen] == [1, 2, 3, 4]
    assert {s[1] for s in seen} == {4} and {s[3] for s in seen} == {4 * 7}
    assert seen[-1][2] == 3 * 7 + len(b"longer content")


def test_an_undo_point_of_a_saved_state_is_its_own_record_kept_by_its_policy(
        ws: Workspace, tmp_path: Path) -> None:
    v1 = ws.snapshot(tags=["v1"], message="mine").record
    (tmp_path / "data" / "a.txt").write_bytes(b"changed")
    first_undo = ws.restore("v1").pre_restore
    assert first_undo is not None
    undo = ws.restore(first_undo.id).pre_restore  # the live state is v1's again
    assert v1 is not None and undo is not None
    assert undo.hash == v1.hash and undo.id != v1.id and undo.kind == "pre-restore"
    assert ws.get("v1") == v1  # its message is untouched
    assert ws.get(v1.hash[:6]) == undo  # one content, several records: the newest
    kept = ws.prune(dry_run=True).kept
    assert kept[undo.id] == ("within 14d",)


def test_dirty_paths_still_apply_after_a_checkpoint_that_reverted_content(
        ws: Workspace, tmp_path: Path) -> None:
    # A checkpoint equal to an older snapshot (not the latest) is recorded anew, and it
    # is the capture the next dirty paths follow: no full walk is needed.
    a = tmp_path / "data" / "a.txt"
    original, mtime = a.read_bytes(), a.stat().st_mtime_ns
    first = ws.snapshot(kind="periodic").record
    a.write_bytes(b"edited")
    assert ws.snapshot(kind="periodic", dirty={"data": [b"a.txt"]}).created
    a.write_bytes(original)
    os.utime(a, ns=(mtime, mtime))  # as `git checkout` of an old state may leave it
    reverted = ws.snapshot(kind="periodic", dirty={"data": [b"a.txt"]})
    assert first is not None and reverted.record is not None and reverted.created
    assert reverted.record.hash == first.hash  # the first snapshot's content again
    assert ws.snapshot(kind="periodic", dirty={"data": [b"a.txt"]}).record is None
    (tmp_path / "data" / "sub" / "b.txt").write_bytes(b"new b")
    result = ws.snapshot(kind="periodic", dirty={"data": [b"sub/b.txt"]})
    assert result.created and result.record is not None
    data = result.captures["data"].counters
    assert (data.files_opened, data.lstats) == (1, 1)
    full = ws.snapshot(tags=["full"], full=["data", "code"])
    assert full.record is not None and full.record.id == result.record.id


def test_a_dirty_path_snapshot_saves_its_state_as_a_record_of_its_changes(
        tmp_path: Path, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """O(changes) on disk too: the state file is left as it is and the changes (an
    edit, a new file, a deleted one) go to its log, at once; loading replays the log to
    the state in memory, stops at a torn record, and a log past its limit is folded
    into a new state file."""
    from dwsd.snapshot import statcache
    data = tmp_path / "data"
    files = trees.make_many_files(data, 2000)
    with Workspace.open(write_config({"data": data})) as ws:
        ws.snapshot()
        ws.save_states()
        state_file = ws.store.state_dir / "data.state"
        log = ws.store.state_dir / "data.state.log"
        before = state_file.stat()
        files[5].write_bytes(b"edited")
        trees.write(data / "d0001" / "new.txt", b"new")
        files[7].unlink()
        trees.settle()  # read after the racy window: the next walk trusts them
        paths = [os.fsencode(p.relative_to(data)) for p in (files[5], files[7])]
        # With the directories whose names changed, as the watcher reports them.
        first = ws.snapshot(dirty={"data": paths + [b"d0000", b"d0001", b"d0001/new.txt"]}
                            ).record
        after = state_file.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert 0 < log.stat().st_size < before.st_size / 50
        loaded, saved = statcache.load_state(ws.store.state_dir, "data")
        assert loaded == ws._states["data"] and saved is not None and saved.records == 1
        assert b"d0000/f000007.txt" not in loaded.files and b"d0001/new.txt" in loaded.files
        one_record = log.stat().st_size
        assert ws.snapshot(kind="periodic").record is None  # an idle full walk: no record
        assert log.stat().st_size == one_record
        # A full walk that finds changes logs them too.
        files[9].write_bytes(b"edited too")
        files[10].unlink()
        trees.settle()
        second = ws.snapshot(kind="periodic")
        assert second.record is not None and first is not None
        assert second.captures["data"].counters.files_opened == 1
        loaded, saved = statcache.load_state(ws.store.state_dir, "data")
        assert loaded == ws._states["data"] and saved is not None and saved.records == 2
        assert state_file.stat().st_ino == before.st_ino
        # A torn last record: the state before it, and no more appending to that log.
        with open(log, "r+b") as f:
            f.truncate(log.stat().st_size - 3)
        loaded, saved = statcache.load_state(ws.store.state_dir, "data")
        assert saved is None and loaded.root == first.resources["data"]
        assert loaded.files[b"d0000/f000009.txt"] != ws._states["data"].files[
            b"d0000/f000009.txt"]
        with open(log, "r+b") as f:
            f.truncate(one_record)
        # A full log: the change waits for the whole write (due later, or at close).
        monkeypatch.setattr(statcache, "LOG_MIN_LIMIT", 0)
        monkeypatch.setattr(statcache, "LOG_LIMIT_FRACTION", 0.0)
        files[11].write_bytes(b"edited at last")
        ws.snapshot(dirty={"data": [os.fsencode(files[11].relative_to(data))]})
        assert log.stat().st_size == one_record and state_file.stat().st_ino == before.st_ino
    assert not log.exists() and state_file.stat().st_ino != before.st_ino  # at close
    with Workspace.open(write_config({"data": data})) as ws:
        loaded, saved = statcache.load_state(ws.store.state_dir, "data")
        assert saved is not None and saved.records == 0
        assert loaded.files[b"d0000/f000011.txt"].size == len(b"edited at last")
        assert loaded.root == ws.get("latest").resources["data"]


def test_a_state_or_log_record_of_the_wrong_shape_is_ignored(tmp_path: Path) -> None:
    """Marshal data that loads but is not a state (or a record) is read as no state (or
    the end of the log), never an exception: the files are then read again."""
    import marshal
    import struct
    import zlib
    from dwsd.snapshot import statcache
    from dwsd.snapshot.statcache import CachedFile, CaptureState
    (tmp_path / "r.state").write_bytes(marshal.dumps({"v": 1, "root": None, "files": [1]}))
    assert statcache.load_state(tmp_path, "r") == (CaptureState(), None)
    good = CaptureState("ab" * 32, {b"f": CachedFile(1, 2, 3, 4, "cd" * 32, ())})
    saved = statcache.save_state(tmp_path, "r", good, None)
    assert saved is not None
    for files in ([1], {b"g": (1, 2)}, {b"g": 7}):
        record = marshal.dumps({"epoch": saved.epoch, "seq": 1, "base": saved.root,
                                "root": "ef" * 32, "files": files})
        statcache.log_path(tmp_path, "r").write_bytes(
            struct.pack("<II", len(record), zlib.crc32(record)) + record)
        state, now = statcache.load_state(tmp_path, "r")
        assert (state.root, state.files, now) == (good.root, good.files, None)


LEFT_OUT_SCRIPT = """
import json, os, sys
from pathlib import Path
from dwsd.workspace import Workspace
data = Path(sys.argv[2])
out = []
def left_out(result):
    out.append([p.decode() for _, p, _ in result.left_out])
with Workspace.open(Path(sys.argv[1])) as ws:
    left_out(ws.snapshot(tags=[]))                       # a full walk finds it
    (data / "other.txt").write_bytes(b"new")
    left_out(ws.snapshot(tags=[], dirty={"data": [b"other.txt"]}))
    left_out(ws.snapshot(tags=["again"]))                # same content: merged
    os.chmod(data / "sub" / "locked.txt", 0o600)
    left_out(ws.snapshot(tags=[], dirty={"data": [b"sub/locked.txt"]}))
    out.append(ws.left_out())
print(json.dumps(out))
"""


def test_a_file_left_out_is_reported_by_every_snapshot_until_it_is_read() -> None:
    # As another user: root reads any file. Everything it writes is in a directory it
    # can reach; the unreadable file is its own, mode 000 (it can chmod it later).
    work = trees.world_readable_dir("dwsd-left-out-")
    data = work / "data"
    trees.write(data / "ok.txt", b"fine")
    trees.write(data / "sub" / "locked.txt", b"secret", 0o000)
    os.chown(data / "sub" / "locked.txt", 65534, 65534)
    for d in (data, data / "sub"):
        os.chmod(d, 0o777)
    (work / "store").mkdir(mode=0o777)
    os.chmod(work / "store", 0o777)
    config = work / "dwsd.yaml"
    config.write_text(f"workspace: t\nstore: {work / 'store'}\nmount: null\n"
                      f"socket: {work / 's.sock'}\nresources:\n"
                      f"  - {{name: data, path: {data}, role: source-data}}\n")
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
         "-c", LEFT_OUT_SCRIPT, str(config), str(data)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [
        ["sub/locked.txt"], ["sub/locked.txt"], ["sub/locked.txt"], [], {}]
    assert "cannot read b'sub/locked.txt'" in proc.stderr


def test_gc_of_blobs_not_yet_durable_does_not_fail_the_next_snapshot(
        tmp_path: Path, data_dir: Path, write_config: WriteConfig) -> None:
    # A capture that records nothing (a dry-run restore's look at the live files, a
    # completed restore's re-planning, a snapshot equal to an existing one) leaves its
    # new blobs waiting for the next make_durable; gc may remove them first.
    trees.write(data_dir / "a.csv", b"v1")
    with Workspace.open(write_config({"data": data_dir})) as ws:
        ws.snapshot(tags=["v1"])
        trees.write(data_dir / "a.csv", b"only ever in the live files")
        ws.restore("v1", dry_run=True)
        assert ws.gc().removed == 2  # the live files' blob and tree
        trees.write(data_dir / "a.csv", b"v2")
        taken = ws.snapshot(tags=["v2"])
        assert taken.record is not None and ws.check().ok


def data_and_results(tmp_path: Path) -> tuple[Path, Path]:
    """Two resource directories, data/a.csv and results/r.txt."""
    data, results = tmp_path / "data", tmp_path / "results"
    trees.write(data / "a.csv", b"1")
    trees.write(results / "r.txt", b"r1")
    return data, results


def test_a_missing_resource_keeps_its_last_content_and_the_others_are_snapshotted(
        tmp_path: Path, write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    data, results = data_and_results(tmp_path)
    with Workspace.open(write_config({"data": data, "results": results})) as ws:
        first = ws.snapshot(tags=["v1"]).record
        assert first is not None
        data.rename(tmp_path / "unplugged")
        trees.write(results / "r.txt", b"r2")
        second = ws.snapshot(tags=["v2"])
        assert second.record is not None and second.created
        assert second.record.resources["data"] == first.resources["data"]
        assert second.record.resources["results"] != first.resources["results"]
        [(name, path, error)] = second.left_out
        assert (name, path) == ("data", b"") and "cannot read resource directory" in error
        (tmp_path / "unplugged").rename(data)
        back = ws.snapshot(tags=["v3"])
        assert back.left_out == [] and not back.created  # the same content as v2
    assert f"data: cannot read resource directory {data}: No such file or directory; " \
        f"its content as of snapshot {first.id} is kept" in caplog.text
    caplog.clear()


def test_a_diff_to_the_live_files_shows_a_missing_resource_as_not_compared(
        tmp_path: Path, write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    data, results = data_and_results(tmp_path)
    with Workspace.open(write_config({"data": data, "results": results})) as ws:
        ws.snapshot(tags=["v1"])
        data.rename(tmp_path / "unplugged")
        trees.write(results / "r.txt", b"r22")
        changes = ws.diff("v1")
    assert changes["data"] == [Change(b"", "unavailable", None, None)]  # not all removed
    assert [(c.path, c.status) for c in changes["results"]] == [(b"r.txt", "modified")]
    assert "data: cannot read resource directory" in caplog.text
    caplog.clear()


def test_a_resource_no_snapshot_has_yet_is_left_out_while_its_directory_is_missing(
        tmp_path: Path, write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    # A disk not mounted yet, or a resource just added: the others are snapshotted.
    trees.write(tmp_path / "results" / "r.txt", b"r1")
    data = tmp_path / "data"
    config = write_config({"data": data, "results": tmp_path / "results"})
    with Workspace.open(config) as ws:
        first = ws.snapshot(tags=["v1"])
        assert first.record is not None and set(first.record.resources) == {"results"}
        [(name, path, error)] = first.left_out
        assert (name, path) == ("data", b"") and "cannot read resource directory" in error
        trees.write(data / "a.csv", b"1")
        second = ws.snapshot(tags=["v2"])
        assert second.record is not None and second.left_out == []
        assert set(second.record.resources) == {"data", "results"}
        ws.restore("v1")  # a snapshot without `data` leaves it alone
        assert (data / "a.csv").read_bytes() == b"1"
    assert "data: cannot read resource directory" in caplog.text
    caplog.clear()


def test_a_snapshot_with_every_resource_missing_fails(
        tmp_path: Path, write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    with Workspace.open(write_config({"data": tmp_path / "data"})) as ws:
        with pytest.raises(CaptureError, match="cannot read resource directory"):
            ws.snapshot(tags=["v1"])
        assert ws.history() == []
    caplog.clear()


def test_a_snapshot_asked_for_by_hand_that_matches_a_periodic_one_is_kept(
        data_dir: Path, write_config: WriteConfig) -> None:
    trees.write(data_dir / "a.csv", b"1")
    config = write_config({"data": data_dir}, extra="retention: {periodic: {last: 1}}\n")
    with Workspace.open(config) as ws:
        periodic = ws.snapshot(kind="periodic").record
        asked = ws.snapshot(message="keep me: trained model v1").record
        assert periodic is not None and asked is not None and asked.id == periodic.id
        assert asked.kind == "manual"  # retention's periodic rule no longer applies
        bare = ws.snapshot(kind="periodic")  # the same content: nothing recorded
        trees.write(data_dir / "a.csv", b"2")
        ws.snapshot(kind="periodic")
        trees.write(data_dir / "a.csv", b"3")
        ws.snapshot(kind="periodic")
        ws.prune()
        assert bare.record is None
        assert asked.id in [r.id for r in ws.history()]


def test_a_resource_pointed_into_the_view_or_the_store_is_not_captured(
        tmp_path: Path, write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    trees.write(tmp_path / "real" / "a.csv", b"1")
    trees.write(tmp_path / "results" / "r.txt", b"r1")
    link = tmp_path / "data"
    link.symlink_to(tmp_path / "real")
    config = write_config({"data": link, "results": tmp_path / "results"})
    config.write_text(config.read_text().replace("mount: null",
                                                 f"mount: {tmp_path / 'view'}"))
    (tmp_path / "view").mkdir()
    with Workspace.open(config) as ws:
        first = ws.snapshot(tags=["v1"]).record
        assert first is not None
        for into in (tmp_path / "view", tmp_path / "store" / "objects"):
            link.unlink()
            link.symlink_to(into)  # `ln -sfn ~/snapshots/latest/data data`
            trees.write(tmp_path / "results" / "r.txt", str(into).encode())
            taken = ws.snapshot(tags=[into.name])
            assert taken.record is not None
            assert taken.record.resources["data"] == first.resources["data"]
            [(_, _, error)] = taken.left_out
            assert error.startswith(f"resource directory {link} leads into ")
    assert "the view's mount point" in caplog.text and "into the store" in caplog.text
    caplog.clear()


def test_a_change_undone_is_a_new_snapshot_and_latest_holds_the_live_files(
        data_dir: Path, write_config: WriteConfig) -> None:
    trees.write(data_dir / "keep", b"keep")
    with Workspace.open(write_config({"data": data_dir})) as ws:
        a = ws.snapshot(tags=["s1"]).record
        trees.write(data_dir / "scratch", b"scratch")
        b = ws.snapshot(tags=["s2"]).record
        (data_dir / "scratch").unlink()
        again = ws.snapshot(tags=["s3"])
        assert a is not None and b is not None and again.record is not None
        assert again.created and again.record.hash == a.hash
        assert ws.get("latest").id == again.record.id
        assert ws.get(a.hash[:8]).id == again.record.id  # the newest of one content
        assert ws.diff("latest") == {"data": []}
        same = ws.snapshot(tags=["s4"])  # equal to the latest: merged, as before
        assert not same.created and same.record is not None
        assert same.record.id == again.record.id
        ws.restore("latest")
        assert not (data_dir / "scratch").exists()
