"""End to end: a real `dwsd` process, driven with the real `dwsctl`, over real trees;
then the scheduler in-process, where a failure must be provoked or the clock faked."""
from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import trio
import trio.testing

from dwsd.errors import StoppingError, StoreError
from dwsd.schedule.scheduler import FIRST_BACKOFF, Scheduler
from dwsd.store.ids import hash_bytes
from dwsd.watch.watcher import Watcher
from dwsd.workspace import Workspace
from tests import trees
from tests.conftest import WriteConfig
from tests.daemonhelp import BIN, TIMEOUT, Daemon, unmount
from tests.fusehelp import require_fuse


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="dwsd-e2e-"))  # unix socket paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write_config(tmp_path: Path, short_dir: Path, *, mount: bool = True, changes: int = 1,
                 quiet: str = "1s", interval: str = "1h", reconcile: str = "1h",
                 exclude: str = "[]", extra: str = "") -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (tmp_path / "results").mkdir(exist_ok=True)
    config = tmp_path / "dwsd.yaml"
    config.write_text(
        f"workspace: e2e\nstore: {tmp_path / 'store'}\n"
        f"mount: {tmp_path / 'view' if mount else 'null'}\n"
        f"socket: {short_dir / 'd.sock'}\n"
        f"resources:\n  - name: data\n    path: {data}\n    role: source-data\n"
        f"    exclude: {exclude}\n"
        f"  - name: results\n    path: {tmp_path / 'results'}\n    role: results\n"
        f"checkpoint: {{interval: {interval}, changes: {changes}, quiet: {quiet}, "
        f"reconcile: {reconcile}}}\n" + extra)
    return config


@pytest.fixture
def daemon(tmp_path: Path, short_dir: Path) -> Iterator[Daemon]:
    require_fuse()
    d = Daemon(write_config(tmp_path, short_dir))
    try:
        yield d.start()
    finally:
        d.stop()
        unmount(tmp_path / "view")


def snapshots(d: Daemon) -> list[dict[str, object]]:
    result: list[dict[str, object]] = d.ctl("list", json_out=True)
    return result


def periodic_since(d: Daemon, count: int) -> dict[str, object] | None:
    """The newest snapshot when there are more than `count` and it is periodic."""
    snaps = snapshots(d)
    return snaps[0] if len(snaps) > count and snaps[0]["kind"] == "periodic" else None


def holds_live_state(d: Daemon, ref: str) -> bool:
    """True when snapshot `ref` equals the live files of every resource."""
    return all(changes == [] for changes in d.ctl("diff", ref, json_out=True).values())


def test_set_and_forget_checkpoint_appears_in_the_view(daemon: Daemon, tmp_path: Path
                                                       ) -> None:
    daemon.wait_until(lambda: daemon.status()["reconciles"] >= 1, "the start-up reconcile")
    assert [s["counts"]["files"] for s in snapshots(daemon)] == [0]  # type: ignore
    trees.write(tmp_path / "data" / "a.csv", b"1,2\n")
    daemon.wait_until(lambda: len(snapshots(daemon)) == 2, "a periodic checkpoint")
    snap = snapshots(daemon)[0]
    assert snap["kind"] == "periodic"
    view = tmp_path / "view"
    assert (view / str(snap["id"]) / "data" / "a.csv").read_bytes() == b"1,2\n"
    assert os.readlink(view / "latest") == snap["id"]
    status = daemon.status()
    assert status["resources"]["data"]["dirty_paths"] == 0


def test_no_writes_no_new_snapshot(tmp_path: Path, short_dir: Path) -> None:
    # A reconcile every second: each one is a checkpoint that finds nothing new.
    d = Daemon(write_config(tmp_path, short_dir, mount=False, reconcile="1s")).start()
    try:
        d.wait_until(lambda: d.status()["reconciles"] >= 1, "the start-up reconcile")
        trees.write(tmp_path / "data" / "a.csv", b"x")
        d.wait_until(lambda: len(snapshots(d)) == 2, "the first checkpoint")
        before = d.status()
        d.wait_until(lambda: d.status()["reconciles"] >= before["reconciles"] + 2,
                     "two more reconciles")
        after = d.status()
        assert len(snapshots(d)) == 2
        assert after["checkpoints"] == before["checkpoints"]
        assert after["skipped"] >= before["skipped"] + 2
        d.ctl("snapshot", "--full")  # same content: merges into the existing one
        assert len(snapshots(d)) == 2
    finally:
        assert d.stop() == 0


ONLY_THE_LAST_CHECKPOINT = ("retention: {periodic: {last: 1}, pre-restore: {last: 0}, "
                            "manual: {}}\n")


def test_on_demand_cycle(tmp_path: Path, short_dir: Path) -> None:
    # No periodic checkpoint but the start-up one: every snapshot is the test's own.
    d = Daemon(write_config(tmp_path, short_dir, mount=False, changes=1_000_000,
                            extra=ONLY_THE_LAST_CHECKPOINT)).start()
    try:
        d.wait_until(lambda: d.status()["reconciles"] >= 1, "the start-up reconcile")
        run_on_demand_cycle(d, tmp_path / "data")
    finally:
        assert d.stop() == 0


def run_on_demand_cycle(daemon: Daemon, data: Path) -> None:
    """snapshot, diff, restore and its undo, delete, prune (pre-restore: none kept)."""
    trees.write(data / "a.csv", b"v1")
    trees.write(data / "keep.txt", b"same")
    daemon.ctl("snapshot", "-t", "v1", "-m", "baseline")
    trees.write(data / "a.csv", b"v2 changed")
    trees.write(data / "new.txt", b"new")
    diff = daemon.ctl("diff", "v1", json_out=True)
    assert sorted((c["path"], c["status"]) for c in diff["data"]) == [
        ("a.csv", "modified"), ("new.txt", "added")]
    restore = daemon.ctl("restore", "v1")
    assert "2/2" in restore.stderr or "files" in restore.stderr  # progress was streamed
    assert (data / "a.csv").read_bytes() == b"v1" and not (data / "new.txt").exists()
    pre = [s for s in snapshots(daemon) if s["kind"] == "pre-restore"]
    assert len(pre) == 1
    daemon.ctl("restore", str(pre[0]["id"]))
    assert (data / "a.csv").read_bytes() == b"v2 changed"
    assert (data / "new.txt").read_bytes() == b"new"
    daemon.ctl("delete", "v1")
    assert "v1" not in {t for s in snapshots(daemon) for t in s["tags"]}  # type: ignore
    # Left: the start-up checkpoint and the two restores' pre-restore snapshots.
    before = snapshots(daemon)
    pre = [s for s in before if s["kind"] == "pre-restore"]
    assert len(before) == 3 and len(pre) == 2
    dry = daemon.ctl("prune", "--dry-run", json_out=True)
    assert dry["dry_run"] is True
    assert sorted(dry["deleted"]) == sorted(s["id"] for s in pre)
    assert snapshots(daemon) == before  # a dry run deletes nothing
    pruned = daemon.ctl("prune", json_out=True)
    assert pruned["deleted"] == dry["deleted"]
    assert [s["id"] for s in snapshots(daemon)] == sorted(dry["kept"], reverse=True)
    check = daemon.ctl("check", "--read-data", json_out=True)
    assert check["ok"] is True


def test_dirty_paths_keep_checkpoints_o_of_changes(tmp_path: Path, short_dir: Path) -> None:
    require_fuse()
    config = write_config(tmp_path, short_dir, changes=5, mount=False)
    paths = trees.make_many_files(tmp_path / "data", 20_000)
    d = Daemon(config).start()
    try:
        d.wait_until(lambda: len(snapshots(d)) == 1, "the start-up reconcile")
        for p in paths[::4000]:
            p.write_bytes(b"edited")
        d.wait_until(lambda: len(snapshots(d)) == 2, "a checkpoint of 5 changes")
        assert_cost_of_edits(d.status()["last_counters"], 5)
        # 4 edits stay under `changes` (and `interval` is an hour): no checkpoint can
        # start on its own; the snapshot's barrier makes sure it sees all 4.
        for p in paths[1::5000]:
            p.write_bytes(b"edited again")
        d.ctl("snapshot", "-t", "manual")
        assert len(snapshots(d)) == 3
        assert_cost_of_edits(d.status()["last_counters"], 4)
    finally:
        d.stop()


def assert_cost_of_edits(counters: dict[str, int], edited: int) -> None:
    """An edit of an existing file names no parent directory: each edited file is
    opened once and lstat'ed once, no directory is listed."""
    assert counters["files_opened"] == edited
    assert counters["dirs_listed"] == 0
    assert counters["lstats"] == edited


def test_changes_while_stopped_are_in_the_first_snapshot(daemon: Daemon, tmp_path: Path
                                                         ) -> None:
    daemon.wait_until(lambda: daemon.status()["reconciles"] >= 1, "the start-up reconcile")
    trees.write(tmp_path / "data" / "a.csv", b"before")
    daemon.wait_until(lambda: len(snapshots(daemon)) == 2, "the first checkpoint")
    assert daemon.stop() == 0
    trees.write(tmp_path / "data" / "a.csv", b"while stopped")
    again = Daemon(daemon.config).start()
    try:
        again.wait_until(lambda: len(snapshots(again)) == 3, "the start-up reconcile")
        latest = snapshots(again)[0]
        view = tmp_path / "view" / str(latest["id"]) / "data" / "a.csv"
        assert view.read_bytes() == b"while stopped"
    finally:
        again.stop()


def test_inotify_overflow_is_survived_and_reported(tmp_path: Path, short_dir: Path) -> None:
    d = Daemon(write_config(tmp_path, short_dir, mount=False, changes=5,
                            quiet="1s")).start()
    data = tmp_path / "data"
    try:
        d.wait_until(lambda: d.status()["reconciles"] >= 1, "the start-up reconcile")
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        files = limit // 2 + 100
        d.signal(signal.SIGSTOP)
        try:
            for i in range(files):  # two events each (create + close)
                (data / f"f{i:05d}").write_bytes(b"x")
            trees.write(data / "born" / "early", b"1")  # after the queue filled up
        finally:
            d.signal(signal.SIGCONT)
        d.wait_until(lambda: d.status()["resources"]["data"]["overflows"] >= 1,
                     "the overflow to be noticed")
        d.wait_for_log("inotify queue overflowed")
        d.wait_until(lambda: periodic_since(d, 1), "a periodic checkpoint")
        first = periodic_since(d, 1)
        assert first is not None and first["counts"]["files"] == files + 1  # type: ignore
        assert holds_live_state(d, str(first["id"]))
        # The directory born during the overflow is watched: writes in it are seen
        # (5 of them: as many as `changes` asks for).
        for i in range(5):
            trees.write(data / "born" / f"later{i}", b"2")
        d.wait_until(lambda: periodic_since(d, 2), "a checkpoint of the writes in born/")
        second = periodic_since(d, 2)
        assert second is not None and second["counts"]["files"] == files + 6  # type: ignore
        assert holds_live_state(d, str(second["id"]))
    finally:
        d.stop()


def start_past_the_watch_limit(config: Path, data: Path) -> Daemon:
    """A daemon in a user namespace allowed 5 inotify watches, over 20 directories.
    (`fs.inotify.max_user_watches` cannot be written there; the per-namespace
    `/proc/sys/user/max_inotify_watches` can.)"""
    for i in range(20):
        trees.write(data / f"d{i}" / "f", b"%d" % i)
    return Daemon(config, wrapper=["unshare", "-U", "-r", "sh", "-c",
                                   "echo 5 > /proc/sys/user/max_inotify_watches && "
                                   "exec \"$@\"", "sh"]).start()


def test_a_replaced_resource_directory_is_snapshotted_as_it_is_now(
        tmp_path: Path, short_dir: Path) -> None:
    d = Daemon(write_config(tmp_path, short_dir, mount=False,
                            changes=1_000_000)).start()
    data = tmp_path / "data"
    try:
        d.wait_until(lambda: d.status()["reconciles"] >= 1, "the start-up reconcile")
        trees.write(data / "a.py", b"v1")
        d.ctl("snapshot", "-t", "t1")
        shutil.rmtree(data)  # what `git clone` over it or an unpacked archive does
        trees.write(data / "a.py", b"v2")
        trees.write(data / "b.py", b"new")
        d.wait_until(lambda: not d.status()["resources"]["data"]["healthy"],
                     "the watcher to see the directory go")
        d.ctl("snapshot", "-t", "t2")
        assert holds_live_state(d, "t2")
        # That snapshot's sync watched the new directory: healthy, its changes followed
        # by their events again (no reconcile needed), nothing left in `status`.
        data_status = d.status()["resources"]["data"]
        assert data_status["healthy"] and data_status["problems"] == []
        trees.write(data / "a.py", b"v3")
        taken = d.ctl("snapshot", "-t", "t3", json_out=True)
        assert taken["counters"]["dirs_listed"] == 0  # the dirty path, not a full walk
        assert holds_live_state(d, "t3")
        d.wait_for_log("data: the resource directory was moved or deleted")
        d.wait_for_log("data: every directory is watched again")
    finally:
        assert d.stop() == 0


def test_watch_limit_is_reported_and_snapshots_stay_right(tmp_path: Path, short_dir: Path
                                                          ) -> None:
    require_fuse()
    config = write_config(tmp_path, short_dir, mount=False)
    d = start_past_the_watch_limit(config, tmp_path / "data")
    try:
        d.wait_until(lambda: not d.status()["resources"]["data"]["healthy"],
                     "the watch limit to be reported")
        trees.write(tmp_path / "data" / "d19" / "f", b"changed where no watch is")
        d.ctl("snapshot", "-t", "check")
        shown = d.ctl("show", "check", json_out=True)
        assert shown["tags"] == ["check"]
        diff = d.ctl("diff", "check", json_out=True)
        assert diff["data"] == []  # the snapshot holds the live state exactly
    finally:
        d.stop()


def test_second_daemon_on_the_same_store_exits_clearly(daemon: Daemon, tmp_path: Path,
                                                       short_dir: Path) -> None:
    other_socket = write_config(tmp_path, short_dir, mount=False)
    text = other_socket.read_text().replace("d.sock", "other.sock")
    other = tmp_path / "other.yaml"
    other.write_text(text)
    proc = subprocess.run([str(BIN / "dwsd"), "--config", str(other)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert f"is in use by pid {daemon.proc.pid}" in proc.stderr  # type: ignore[union-attr]
    assert proc.stderr.count("\n") == 1


def test_sigterm_unmounts_and_exits_0(daemon: Daemon, tmp_path: Path, short_dir: Path
                                     ) -> None:
    assert os.path.ismount(tmp_path / "view")
    assert daemon.stop() == 0
    assert not os.path.ismount(tmp_path / "view")
    assert not (short_dir / "d.sock").exists()


def test_sigterm_during_a_restore_finishes_it_and_answers_its_client(
        tmp_path: Path, short_dir: Path) -> None:
    data = tmp_path / "data"
    config = write_config(tmp_path, short_dir, mount=False, changes=1_000_000)
    for i in range(10):
        trees.write(data / f"f{i}.csv", b"v1")
    # The daemon gets SIGTERM from itself while writing the restore's third file.
    d = Daemon(config, env={"DWSD_CRASH_AT": "restore-file:3:TERM"}).start()
    try:
        d.wait_until(lambda: d.status()["reconciles"] >= 1, "the start-up reconcile")
        d.ctl("snapshot", "-t", "v1")
        for i in range(10):
            trees.write(data / f"f{i}.csv", b"v2")
        restored = d.ctl("restore", "v1")  # answered: the work was under way
        assert restored.stdout.startswith("restored snapshot"), restored
        assert d.proc is not None and d.proc.wait(TIMEOUT) == 0
    finally:
        d.stop()
    assert all((data / f"f{i}.csv").read_bytes() == b"v1" for i in range(10))
    assert not (tmp_path / "store" / "journal" / "restore.json").exists()
    d.wait_for_log("SIGTERM: shutting down")
    d.wait_for_log("restored in place: 10 files written")
    refused = subprocess.run([str(BIN / "dwsctl"), "--socket", str(short_dir / "d.sock"),
                              "status"], capture_output=True, text=True, timeout=TIMEOUT)
    assert refused.returncode == 3  # gone, and its socket with it


def test_sighup_with_a_broken_config_keeps_the_old_one(daemon: Daemon, tmp_path: Path
                                                       ) -> None:
    good = daemon.config.read_text()
    daemon.config.write_text(good + "bogus_key: 1\n")
    daemon.signal(signal.SIGHUP)
    line = daemon.wait_for_log("configuration reload refused")
    assert "bogus_key" in line
    trees.write(tmp_path / "data" / "still.txt", b"works")
    daemon.ctl("snapshot", "-t", "after-hup")
    daemon.config.write_text(good.replace("quiet: 1s", "quiet: 2s"))
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log("configuration reloaded from")


def _raw_exchange(sock_path: Path, payload: bytes) -> bytes:
    import socket
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(sock_path))
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon stopped reading (too large): its reply is still there
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_bad_clients_get_errors_and_50_listers_get_answers_during_a_snapshot(
        tmp_path: Path, short_dir: Path) -> None:
    paths = trees.make_many_files(tmp_path / "data", 10_000, size=4096)
    d = Daemon(write_config(tmp_path, short_dir, mount=False, changes=1_000_000)).start()
    try:
        d.wait_until(lambda: d.status()["reconciles"] >= 1, "the start-up reconcile")
        sock = short_dir / "d.sock"
        assert b'"code":"bad-request"' in _raw_exchange(sock, b"{not json\n")
        assert b'"code":"unknown-op"' in _raw_exchange(
            sock, b'{"v": 1, "id": 1, "op": "explode", "args": {}}\n')
        assert b'"code":"too-large"' in _raw_exchange(sock, b"x" * (2 << 20) + b"\n")
        for i, p in enumerate(paths):  # new content everywhere: a long snapshot
            p.write_bytes(b"%d" % i * 512)
        argv = [str(BIN / "dwsctl"), "--socket", str(sock), "--json"]
        snap = subprocess.Popen([*argv, "snapshot", "-t", "busy"], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert snap.stderr is not None
        assert select.select([snap.stderr], [], [], TIMEOUT)[0], "no progress line"
        started = snap.stderr.readline()  # its first progress line: it is capturing
        assert started.startswith("snapshot:"), started
        listers = [subprocess.Popen([*argv, "list"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for _ in range(50)]
        results = [p.communicate(timeout=120) for p in listers]
        assert [p.returncode for p in listers] == [0] * 50, results[0][1]
        snap.communicate(timeout=120)
        assert snap.returncode == 0
        # Listings without the snapshot were answered while it was being taken.
        during = [out for out, _ in results if '"busy"' not in out]
        assert during, "every lister was answered after the snapshot ended"
        assert d.ctl("show", "busy", json_out=True)["tags"] == ["busy"]
    finally:
        assert d.stop() == 0


def test_a_snapshot_right_after_a_write_holds_it(tmp_path: Path, short_dir: Path) -> None:
    d = Daemon(write_config(tmp_path, short_dir, mount=False, changes=1_000_000)).start()
    try:
        d.wait_until(lambda: d.status()["reconciles"] >= 1, "the start-up reconcile")
        for i in range(50):
            (tmp_path / "data" / f"f{i:02d}").write_bytes(b"%d" % i)
            result = d.ctl("snapshot", "-m", f"round {i}", json_out=True)
            assert result["snapshot"]["counts"]["files"] == i + 1, f"round {i}: {result}"
    finally:
        assert d.stop() == 0


def test_sighup_with_new_excludes_applies_them(tmp_path: Path, short_dir: Path) -> None:
    config = write_config(tmp_path, short_dir, mount=False, exclude='["cache/"]')
    trees.write(tmp_path / "data" / "cache" / "old", b"1")
    d = Daemon(config).start()
    try:
        d.wait_until(lambda: d.status()["reconciles"] >= 1, "the start-up reconcile")
        assert snapshots(d)[0]["counts"]["files"] == 0  # type: ignore[index]
        config.write_text(config.read_text().replace('["cache/"]', "[]"))
        d.signal(signal.SIGHUP)
        d.wait_until(lambda: d.status()["reconciles"] >= 2, "a reconcile forced by it")
        assert snapshots(d)[0]["counts"]["files"] == 1  # type: ignore[index]
        # cache/ is watched now: a write in it makes a checkpoint on its own.
        trees.write(tmp_path / "data" / "cache" / "new", b"2")
        d.wait_until(lambda: periodic_since(d, 2), "a checkpoint of cache/new")
        assert snapshots(d)[0]["counts"]["files"] == 2  # type: ignore[index]
        assert holds_live_state(d, "latest")
    finally:
        assert d.stop() == 0


def test_sd_notify_ready_status_and_stopping(tmp_path: Path, short_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(short_dir / "notify"))
        notify.settimeout(TIMEOUT)
        d = Daemon(write_config(tmp_path, short_dir, mount=False),
                   env={"NOTIFY_SOCKET": str(short_dir / "notify")}).start()
        try:
            ready = notify.recv(4096).decode().split("\n")
            assert ready[0] == "READY=1"
            assert ready[1].startswith("STATUS=watching 2 resources")
            d.wait_until(lambda: d.status()["reconciles"] >= 1, "the start-up reconcile")
            trees.write(tmp_path / "data" / "a.csv", b"1")
            d.wait_until(lambda: len(snapshots(d)) == 2, "a checkpoint")
            latest = snapshots(d)[0]["id"]
            while f"2 snapshots, latest {latest}" not in (msg := notify.recv(4096).decode()):
                assert msg.startswith("STATUS="), msg
        finally:
            assert d.stop() == 0
        messages = []
        notify.setblocking(False)
        while True:
            try:
                messages.append(notify.recv(4096).decode())
            except BlockingIOError:
                break  # the daemon has exited: everything it sent is queued
        assert messages.count("STOPPING=1") == 1, messages
        assert messages[-1] == "STOPPING=1", messages
        assert all(m.startswith("STATUS=") for m in messages[:-1]), messages


def test_a_resource_past_the_watch_limit_is_walked_every_interval(
        tmp_path: Path, short_dir: Path) -> None:
    config = write_config(tmp_path, short_dir, mount=False, interval="2s")
    d = start_past_the_watch_limit(config, tmp_path / "data")
    try:
        d.wait_until(lambda: not d.status()["resources"]["data"]["healthy"],
                     "the watch limit to be reported")
        d.wait_until(lambda: d.status()["reconciles"] >= 1, "the start-up reconcile")
        trees.write(tmp_path / "data" / "d19" / "f", b"changed where no watch is")
        d.wait_until(lambda: periodic_since(d, 1), "a checkpoint without any event")
        assert holds_live_state(d, "latest")
    finally:
        assert d.stop() == 0


# -- the scheduler in-process --------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path, data_dir: Path, write_config: WriteConfig
              ) -> Iterator[Workspace]:
    ws = Workspace.open(write_config(
        {"data": data_dir}, extra="checkpoint: {interval: 1m}\n"
                                  "retention: {periodic: {last: 1}}\n"))
    try:
        yield ws
    finally:
        ws.close()


async def test_a_failing_checkpoint_is_retried_after_a_growing_backoff(
        workspace: Workspace, data_dir: Path, mock_clock: trio.testing.MockClock,
        caplog: pytest.LogCaptureFixture) -> None:
    data_dir.rmdir()  # every capture fails from now on
    scheduler = Scheduler(workspace, Watcher(workspace.config.resources, lambda: None))
    # The clock jumps only after 50 ms of real idleness: a capture running on its
    # worker thread counts as idle to trio, and on a slow machine an instant jump would
    # spend the virtual seconds faster than the captures can fail.
    mock_clock.autojump_threshold = 0.05
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            while scheduler.stats["errors"] < 4:
                await trio.sleep(1)
            nursery.cancel_scope.cancel()
    # Retries after 5, 10 and 20 s (the clock is virtual: no test waits that long).
    assert trio.current_time() >= FIRST_BACKOFF * (1 + 2 + 4)
    assert scheduler.stats["failures"] == 4
    assert "checkpoint failed (retried in 40 s)" in caplog.text
    caplog.clear()


async def test_a_view_that_cannot_reload_does_not_stop_checkpoints(
        workspace: Workspace, data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def broken_view() -> None:
        raise StoreError("catalog unreadable")

    scheduler = Scheduler(workspace, Watcher(workspace.config.resources, lambda: None),
                          on_catalog_change=broken_view)
    with trio.fail_after(30):
        first = await scheduler.checkpoint(reconcile=True)
        trees.write(data_dir / "a.csv", b"1")
        # The second checkpoint prunes the first (periodic: last 1), then tells the view.
        second = await scheduler.checkpoint(reconcile=True)
    assert first is not None and first.record is not None
    assert second is not None and second.record is not None
    assert [r.id for r in workspace.history()] == [second.record.id]
    assert scheduler.stats["checkpoints"] == 2 and scheduler.stats["errors"] == 0
    assert "the view could not show the new catalog: catalog unreadable" in caplog.text
    caplog.clear()


async def test_pruned_objects_are_collected_at_the_next_reconcile(
        workspace: Workspace, data_dir: Path) -> None:
    watcher = Watcher(workspace.config.resources, lambda: None)
    scheduler = Scheduler(workspace, watcher)
    objects = workspace.store.objects
    trees.write(data_dir / "a.csv", b"old content")
    old_blob = hash_bytes(b"old content")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            await scheduler.checkpoint(reconcile=True)
            trees.write(data_dir / "a.csv", b"new content")
            # A checkpoint prunes the first snapshot (periodic: last 1) but does not gc...
            second = await scheduler.checkpoint()
            assert second is not None and second.record is not None
            assert second.counters.lstats == 1  # the dirty path only: no reconcile
            assert [r.id for r in workspace.history()] == [second.record.id]
            assert objects.has("blobs", old_blob) and scheduler.status()["gc_pending"]
            # ...the next reconcile does, once, even when it records nothing.
            third = await scheduler.checkpoint(reconcile=True)
            nursery.cancel_scope.cancel()
    assert third is not None and third.record is None
    assert not objects.has("blobs", old_blob) and not scheduler.status()["gc_pending"]
    assert objects.has("blobs", hash_bytes(b"new content"))
    assert scheduler.stats["errors"] == 0


async def test_prune_collects_what_delete_left(workspace: Workspace, data_dir: Path
                                               ) -> None:
    scheduler = Scheduler(workspace, Watcher(workspace.config.resources, lambda: None))
    objects = workspace.store.objects
    trees.write(data_dir / "big.bin", b"only in the deleted snapshot")
    doomed_blob = hash_bytes(b"only in the deleted snapshot")
    with trio.fail_after(30):
        await scheduler.prune(dry_run=False)  # the gc a start leaves pending
        doomed = await scheduler.snapshot(["with-big"], "", full=True)
        (data_dir / "big.bin").unlink()
        await scheduler.snapshot(["without-big"], "", full=True)
        assert doomed.record is not None
        await scheduler.delete("with-big")
        assert objects.has("blobs", doomed_blob) and scheduler.status()["gc_pending"]
        dry = await scheduler.prune(dry_run=True)
        assert dry.gc is None and objects.has("blobs", doomed_blob)
        # Retention deletes nothing here (manual snapshots are kept), yet the space of
        # the deleted one is freed now, not at the next reconcile.
        pruned = await scheduler.prune(dry_run=False)
    assert pruned.deleted == [] and pruned.gc is not None and pruned.gc.removed >= 1
    assert not objects.has("blobs", doomed_blob) and not scheduler.status()["gc_pending"]
    assert [r.tags for r in workspace.history()] == [("without-big",)]


async def test_a_stopping_scheduler_starts_nothing_new(workspace: Workspace) -> None:
    scheduler = Scheduler(workspace, Watcher(workspace.config.resources, lambda: None))
    scheduler.stop()
    with trio.fail_after(30):
        with pytest.raises(StoppingError, match="shutting down; the operation was not "
                                                "started"):
            await scheduler.snapshot(["late"], "", full=True)
        await scheduler.finish_running()  # nothing running: at once
    assert workspace.history() == [] and scheduler.queue_length == 0


async def test_a_snapshot_asked_for_right_after_a_write_holds_it(
        workspace: Workspace, data_dir: Path) -> None:
    # In-process there is no client start-up between the write and the request to
    # hide the reader thread's delay: only the barrier makes every round hold its file.
    watcher = Watcher(workspace.config.resources, lambda: None)
    scheduler = Scheduler(workspace, watcher)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            for i in range(50):
                (data_dir / f"f{i:02d}").write_bytes(b"%d" % i)
                result = await scheduler.snapshot((), f"round {i}", full=False)
                assert result.record is not None
                assert result.record.counts.files == i + 1, f"round {i}"
            nursery.cancel_scope.cancel()


def test_status_reports_a_restore_that_could_not_be_completed(tmp_path: Path,
                                                              short_dir: Path) -> None:
    config = write_config(tmp_path, short_dir, mount=False)
    data = tmp_path / "data"
    trees.make_many_files(data, 40, per_dir=10)
    with Workspace.open(config) as ws:
        ws.snapshot(tags=["base"])
    for p in sorted(data.rglob("*.txt"))[:10]:
        p.write_bytes(b"edited")
    crashed = subprocess.run(
        [BIN / "python", "-m", "tests.crashdriver", str(config), "restore"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, timeout=TIMEOUT,
        env={**os.environ, "DWSD_CRASH_AT": "restore-file:3"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    data.rename(tmp_path / "away")  # the resource's disk is missing at the next start
    d = Daemon(config).start()
    try:
        unfinished = d.status()["unfinished_restore"]
        assert "could not be completed" in unfinished and "cannot read resource" in unfinished
    finally:
        assert d.stop() == 0
