"""End to end: a real `dwsd` process, driven with the real `dwsctl`, over real trees."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests import trees
from tests.daemonhelp import BIN, Daemon, unmount
from tests.fusehelp import require_fuse


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="dwsd-e2e-"))  # unix socket paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write_config(tmp_path: Path, short_dir: Path, *, mount: bool = True, changes: int = 1,
                 quiet: str = "1s", interval: str = "1h", extra: str = "") -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (tmp_path / "results").mkdir(exist_ok=True)
    config = tmp_path / "dwsd.yaml"
    config.write_text(
        f"workspace: e2e\nstore: {tmp_path / 'store'}\n"
        f"mount: {tmp_path / 'view' if mount else 'null'}\n"
        f"socket: {short_dir / 'd.sock'}\n"
        f"resources:\n  - name: data\n    path: {data}\n    role: source-data\n"
        f"  - name: results\n    path: {tmp_path / 'results'}\n    role: results\n"
        f"checkpoint: {{interval: {interval}, changes: {changes}, quiet: {quiet}}}\n" + extra)
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


def test_no_writes_no_new_snapshot(daemon: Daemon, tmp_path: Path) -> None:
    daemon.wait_until(lambda: daemon.status()["reconciles"] >= 1, "the start-up reconcile")
    trees.write(tmp_path / "data" / "a.csv", b"x")
    daemon.wait_until(lambda: len(snapshots(daemon)) == 2, "the first checkpoint")
    before = daemon.status()
    daemon.ctl("snapshot", "--full")  # same content: merges into the existing one
    assert len(snapshots(daemon)) == 2
    assert daemon.status()["checkpoints"] == before["checkpoints"]


def test_on_demand_cycle(daemon: Daemon, tmp_path: Path) -> None:
    data = tmp_path / "data"
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
    dry = daemon.ctl("prune", "--dry-run", json_out=True)
    assert dry["dry_run"] is True
    daemon.ctl("prune")
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
        counters = d.status()["last_counters"]
        assert counters["files_opened"] == 5 and counters["lstats"] <= 5
        for p in paths[1::4000]:
            p.write_bytes(b"edited again")
        d.wait_until(lambda: d.status()["resources"]["data"]["dirty_paths"] == 5,
                     "the watcher to see 5 changes")
        d.ctl("snapshot", "-t", "manual")
        counters = d.status()["last_counters"]
        assert counters["files_opened"] == 5 and counters["lstats"] <= 5
    finally:
        d.stop()


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
    require_fuse()
    d = Daemon(write_config(tmp_path, short_dir, mount=False, changes=1_000_000,
                            quiet="1s")).start()
    try:
        d.wait_until(lambda: d.status()["reconciles"] >= 1, "the start-up reconcile")
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        d.signal(signal.SIGSTOP)
        try:
            for i in range(limit // 2 + 100):  # two events each (create + close)
                (tmp_path / "data" / f"f{i:05d}").write_bytes(b"x")
        finally:
            d.signal(signal.SIGCONT)
        d.wait_until(lambda: d.status()["resources"]["data"]["overflows"] >= 1,
                     "the overflow to be noticed")
        d.ctl("snapshot", "-t", "after")
        snap = snapshots(d)[0]
        assert snap["counts"]["files"] == limit // 2 + 100  # type: ignore[index]
        d.wait_for_log("inotify queue overflowed")
    finally:
        d.stop()


def test_watch_limit_is_reported_and_snapshots_stay_right(tmp_path: Path, short_dir: Path
                                                          ) -> None:
    require_fuse()
    config = write_config(tmp_path, short_dir, mount=False)
    for i in range(20):
        trees.write(tmp_path / "data" / f"d{i}" / "f", b"%d" % i)
    d = Daemon(config, wrapper=["unshare", "-U", "-r", "sh", "-c",
                                "echo 5 > /proc/sys/user/max_inotify_watches && exec \"$@\"",
                                "sh"]).start()
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
    require_fuse()
    trees.make_many_files(tmp_path / "data", 5000, size=4096)
    d = Daemon(write_config(tmp_path, short_dir, mount=False, changes=1_000_000)).start()
    try:
        d.wait_until(lambda: d.status()["reconciles"] >= 1, "the start-up reconcile")
        sock = short_dir / "d.sock"
        assert b'"code":"bad-request"' in _raw_exchange(sock, b"{not json\n")
        assert b'"code":"unknown-op"' in _raw_exchange(
            sock, b'{"v": 1, "id": 1, "op": "explode", "args": {}}\n')
        assert b'"code":"too-large"' in _raw_exchange(sock, b"x" * (2 << 20) + b"\n")
        argv = [str(BIN / "dwsctl"), "--socket", str(sock), "--json"]
        snap = subprocess.Popen([*argv, "snapshot", "--full", "-t", "busy"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        listers = [subprocess.Popen([*argv, "list"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE) for _ in range(50)]
        results = [p.communicate(timeout=120) for p in listers]
        assert [p.returncode for p in listers] == [0] * 50, results[0][1]
        snap.communicate(timeout=120)
        assert snap.returncode == 0
        assert d.ctl("show", "busy", json_out=True)["tags"] == ["busy"]
    finally:
        assert d.stop() == 0
