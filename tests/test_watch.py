"""The inotify watcher on real directories: paths, overflow, watch limit."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import trio

from dwsd.snapshot.exclude import ExcludeMatcher
from dwsd.watch.inotify import TreeWatcher
from tests import trees

ROOT = Path(__file__).resolve().parent.parent


class Collector:
    """Gathers batches from the reader thread; `wait_for` blocks until a predicate holds."""

    def __init__(self) -> None:
        self.paths: set[bytes] = set()
        self.problems: list[str] = []
        self._cond = threading.Condition()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, paths: list[bytes], problem: str | None) -> None:
        self.gate.wait()
        with self._cond:
            self.paths.update(paths)
            if problem:
                self.problems.append(problem)
            self._cond.notify_all()

    def wait_for(self, predicate: object, timeout: float = 10) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), (self.paths, self.problems)


def watching(root: Path, excludes: list[str] | None = None) -> tuple[TreeWatcher, Collector]:
    c = Collector()
    w = TreeWatcher(os.fsencode(root), ExcludeMatcher(excludes or []), c)
    w.start()
    return w, c


def test_changes_become_relative_paths(data_dir: Path) -> None:
    trees.write(data_dir / "sub" / "old.txt", b"1")
    w, c = watching(data_dir)
    try:
        trees.write(data_dir / "sub" / "new.txt", b"2")
        (data_dir / "sub" / "old.txt").unlink()
        trees.write(data_dir / "top.txt", b"3")
        c.wait_for(lambda: {b"sub/new.txt", b"sub/old.txt", b"sub", b"top.txt"} <= c.paths)
    finally:
        w.close()


def test_a_directory_moved_in_is_marked_for_a_whole_walk(data_dir: Path, tmp_path: Path
                                                         ) -> None:
    trees.write(tmp_path / "outside" / "deep" / "f", b"1")
    w, c = watching(data_dir)
    try:
        os.rename(tmp_path / "outside", data_dir / "inside")
        c.wait_for(lambda: b"inside/" in c.paths)
        assert w.watches == 3  # root, inside, inside/deep: the new tree is watched too
        trees.write(data_dir / "inside" / "deep" / "g", b"2")
        c.wait_for(lambda: b"inside/deep/g" in c.paths)
    finally:
        w.close()


def test_excluded_paths_raise_no_events(data_dir: Path) -> None:
    (data_dir / "__pycache__").mkdir()
    w, c = watching(data_dir, ["__pycache__/", "*.tmp"])
    try:
        trees.write(data_dir / "__pycache__" / "m.pyc", b"x")
        trees.write(data_dir / "scratch.tmp", b"x")
        trees.write(data_dir / "kept.txt", b"x")
        c.wait_for(lambda: b"kept.txt" in c.paths)
        assert not any(b"pycache" in p or p.endswith(b".tmp") for p in c.paths)
        assert w.watches == 1
    finally:
        w.close()


def test_queue_overflow_is_reported(data_dir: Path) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    w, c = watching(data_dir)
    try:
        c.gate.clear()  # the reader blocks in its callback: the kernel queue fills up
        trees.write(data_dir / "first", b"0")
        f = data_dir / "churn"
        f.write_bytes(b"")
        with open(f, "r+b", buffering=0) as out:
            # The kernel merges an event identical to the one before it; alternating
            # IN_MODIFY and IN_ATTRIB keeps every one of them in the queue.
            for i in range(limit + 100):
                os.pwrite(out.fileno(), b"x", 0)
                os.utime(out.fileno(), ns=(i, i))
        c.gate.set()
        c.wait_for(lambda: "overflow" in c.problems)
    finally:
        w.close()


def test_watch_limit_is_reported_not_fatal(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for i in range(10):
        (tree / f"d{i}").mkdir(parents=True)
    script = ("import os,sys;from dwsd.watch.inotify import TreeWatcher;"
              "from dwsd.snapshot.exclude import ExcludeMatcher;"
              "open('/proc/sys/user/max_inotify_watches','w').write('5');"
              "got=[];w=TreeWatcher(os.fsencode(sys.argv[1]),ExcludeMatcher([]),"
              "lambda p,e:got.append(e));w.start();w.close();print(got, w.watches)")
    proc = subprocess.run(["unshare", "-U", "-r", sys.executable, "-c", script, str(tree)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("['watch limit reached (the inotify watch limit is "
                                   "reached)'] 5")


async def test_watcher_merges_batches_on_the_trio_thread(data_dir: Path,
                                                         write_config: object) -> None:
    from dwsd.config import load_config
    from dwsd.watch.watcher import Watcher
    config = load_config(write_config({"data": data_dir}))  # type: ignore[operator]
    changed = trio.Event()
    watcher = Watcher(config.resources, on_change=changed.set)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            await trio.to_thread.run_sync(trees.write, data_dir / "a.csv", b"1")
            await changed.wait()
            taken = watcher.take()
            nursery.cancel_scope.cancel()
    assert taken.full == {"data"}  # the first capture is always a reconcile walk
    assert watcher.state["data"].dirty == set() and not watcher.anything_to_capture()
