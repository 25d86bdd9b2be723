"""The inotify watcher on real directories: paths, overflow, watch limit, the barrier."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import AsyncIterator

import pytest
import trio

from dwsd.config import load_config
from dwsd.snapshot.exclude import ExcludeMatcher
from dwsd.watch import inotify
from dwsd.watch.inotify import ROOT_ELSEWHERE, ROOT_GONE, Batch, TreeWatcher
from dwsd.watch.watcher import Taken, Watcher
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

    def __call__(self, batch: Batch) -> None:
        self.gate.wait()
        with self._cond:
            self.paths.update(batch.changed)
            self.paths.update(batch.parents)
            self.problems.extend(batch.problems)
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


def overflow_queue(c: Collector, directory: Path) -> None:
    """Fill the kernel's queue past its limit while the reader is held in its callback."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    c.gate.clear()
    trees.write(directory / "first", b"0")
    f = directory / "churn"
    f.write_bytes(b"")
    with open(f, "r+b", buffering=0) as out:
        # The kernel merges an event identical to the one before it; alternating
        # IN_MODIFY and IN_ATTRIB keeps every one of them in the queue.
        for i in range(limit + 100):
            os.pwrite(out.fileno(), b"x", 0)
            os.utime(out.fileno(), ns=(i, i))


def test_queue_overflow_is_reported(data_dir: Path) -> None:
    w, c = watching(data_dir)
    try:
        overflow_queue(c, data_dir)
        c.gate.set()
        c.wait_for(lambda: "overflow" in c.problems)
    finally:
        w.close()


def test_a_directory_created_during_an_overflow_is_watched_after_it(data_dir: Path
                                                                    ) -> None:
    w, c = watching(data_dir)
    try:
        overflow_queue(c, data_dir)
        (data_dir / "born").mkdir()  # its IN_CREATE is lost: the queue is full
        c.gate.set()
        c.wait_for(lambda: "overflow" in c.problems)
        assert w.watches == 2
        trees.write(data_dir / "born" / "inside", b"1")
        c.wait_for(lambda: b"born/inside" in c.paths)
    finally:
        w.close()


def test_a_sync_hands_over_every_write_made_before_it(data_dir: Path) -> None:
    w, c = watching(data_dir)
    try:
        for i in range(200):
            name = b"f%03d" % i
            trees.write(data_dir / os.fsdecode(name), b"x")
            synced = threading.Event()
            seen: list[bool] = []

            def done(problem: str | None, name: bytes = name,
                     synced: threading.Event = synced, seen: list[bool] = seen) -> None:
                seen.append(name in c.paths)
                synced.set()
            w.request_sync(False, done)
            assert synced.wait(10)
            assert seen == [True], f"round {i}: {name!r} not handed over before the sync"
    finally:
        w.close()


def test_a_sync_after_close_answers_at_once(data_dir: Path) -> None:
    w, _ = watching(data_dir)
    w.close()
    answers: list[str | None] = []
    w.request_sync(True, answers.append)
    assert answers == [None]


def test_watch_limit_is_reported_not_fatal(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for i in range(10):
        (tree / f"d{i}").mkdir(parents=True)
    script = ("import os,sys;from dwsd.watch.inotify import TreeWatcher;"
              "from dwsd.snapshot.exclude import ExcludeMatcher;"
              "open('/proc/sys/user/max_inotify_watches','w').write('5');"
              "got=[];w=TreeWatcher(os.fsencode(sys.argv[1]),ExcludeMatcher([]),"
              "lambda b:got.extend(b.problems));w.start();w.close();print(got, w.watches)")
    proc = subprocess.run(["unshare", "-U", "-r", sys.executable, "-c", script, str(tree)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("['watch limit reached (the inotify watch limit is "
                                   "reached)'] 5")


def test_watches_missing_after_the_limit_are_added_by_a_rescan(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for i in range(10):
        (tree / f"d{i}").mkdir(parents=True)
    script = ("import os,sys,threading;from dwsd.watch.inotify import TreeWatcher;"
              "from dwsd.snapshot.exclude import ExcludeMatcher;"
              "limit='/proc/sys/user/max_inotify_watches';open(limit,'w').write('5');"
              "w=TreeWatcher(os.fsencode(sys.argv[1]),ExcludeMatcher([]),lambda b:None);"
              "w.start();before=w.watches;open(limit,'w').write('100');"
              "got=[];done=threading.Event();"
              "w.request_sync(True,lambda p:(got.append(p),done.set()));"
              "assert done.wait(10);w.close();print(before,got,w.watches)")
    proc = subprocess.run(["unshare", "-U", "-r", sys.executable, "-c", script, str(tree)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "5 [None] 11"


def test_a_rescan_drops_watches_of_newly_excluded_directories(data_dir: Path) -> None:
    (data_dir / "keep").mkdir()
    (data_dir / "cache").mkdir()
    w, c = watching(data_dir)
    try:
        assert w.watches == 3
        w.set_excludes(ExcludeMatcher(["cache/"]))
        synced = threading.Event()
        w.request_sync(True, lambda problem: synced.set())
        assert synced.wait(10)
        assert w.watches == 2
    finally:
        w.close()


def rescanned(w: TreeWatcher) -> list[str | None]:
    answers: list[str | None] = []
    synced = threading.Event()
    w.request_sync(True, lambda problem: (answers.append(problem), synced.set()))
    assert synced.wait(10)
    return answers


def test_a_replaced_resource_directory_is_a_problem_until_a_rescan(data_dir: Path
                                                                   ) -> None:
    (data_dir / "sub").mkdir()
    w, c = watching(data_dir)
    try:
        assert w.watches == 2
        shutil.rmtree(data_dir)
        data_dir.mkdir()  # a new directory at the resource's path: nothing watches it
        c.wait_for(lambda: "the resource directory was moved or deleted" in c.problems)
        assert w.watches == 0
        assert rescanned(w) == [None] and w.watches == 1
        trees.write(data_dir / "new.txt", b"seen again")
        c.wait_for(lambda: b"new.txt" in c.paths)
    finally:
        w.close()


def test_a_resource_directory_moved_away_is_no_longer_followed(data_dir: Path,
                                                               tmp_path: Path) -> None:
    (data_dir / "sub").mkdir()
    w, c = watching(data_dir)
    try:
        data_dir.rename(tmp_path / "old")
        c.wait_for(lambda: "the resource directory was moved or deleted" in c.problems)
        trees.write(tmp_path / "old" / "sub" / "written-after.txt", b"elsewhere")
        assert rescanned(w) == ["cannot watch the resource directory (No such file or "
                                "directory)"]
        assert w.watches == 0 and not any(b"written-after" in p for p in c.paths)
    finally:
        w.close()


def test_a_resource_directory_that_cannot_be_watched_is_reported(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"a file, not a directory")
    (tmp_path / "dangling").symlink_to("missing")
    for root in (tmp_path / "missing", tmp_path / "file", tmp_path / "dangling"):
        w, c = watching(root)
        w.close()
        assert len(c.problems) == 1 and w.watches == 0
        assert c.problems[0].startswith("cannot watch the resource directory ("), root


def test_a_symlinked_resource_directory_is_watched_through(tmp_path: Path) -> None:
    trees.write(tmp_path / "disk" / "data" / "sub" / "a.csv", b"1")
    (tmp_path / "data").symlink_to(tmp_path / "disk" / "data")
    w, c = watching(tmp_path / "data")
    try:
        assert w.watches == 2 and not w.root_replaced()
        trees.write(tmp_path / "disk" / "data" / "sub" / "b.csv", b"2")
        c.wait_for(lambda: b"sub/b.csv" in c.paths)
        trees.write(tmp_path / "disk" / "other" / "c.csv", b"3")
        (tmp_path / "data").unlink()  # `ln -sfn`: no event reports it
        (tmp_path / "data").symlink_to(tmp_path / "disk" / "other")
        assert w.root_replaced()
        assert rescanned(w) == [None] and not w.root_replaced() and w.watches == 1
        trees.write(tmp_path / "disk" / "other" / "d.csv", b"4")
        c.wait_for(lambda: b"d.csv" in c.paths)
        assert c.problems == []
    finally:
        w.close()


def test_a_resource_symlink_pointed_elsewhere_is_reported_when_idle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inotify, "ROOT_CHECK_S", 0.05)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    (tmp_path / "current").symlink_to("v1")
    w, c = watching(tmp_path / "current")
    try:
        (tmp_path / "next").symlink_to("v2")
        (tmp_path / "next").rename(tmp_path / "current")  # no event, no sync asked
        c.wait_for(lambda: c.problems == ["the resource's path leads to another "
                                          "directory"])
        threading.Event().wait(0.3)  # several more idle checks: reported once
        assert c.problems == ["the resource's path leads to another directory"]
    finally:
        w.close()


@contextlib.asynccontextmanager
async def watching_resource(path: Path, write_config: object) -> AsyncIterator[Watcher]:
    """A running Watcher of resource "data" at `path`, its first take done (the first
    capture is a reconcile walk)."""
    config = load_config(write_config({"data": path}))  # type: ignore[operator]
    watcher = Watcher(config.resources, on_change=lambda: None)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            watcher.take()
            yield watcher
            nursery.cancel_scope.cancel()


def sees(taken: Taken, path: bytes) -> bool:
    """Whether the capture handed `taken` looks at `path` of resource "data": it walks
    the resource whole, or the path is dirty, or a directory above it is to be walked
    whole (a new directory is dirty as "name/")."""
    dirty = taken.dirty.get("data", set())
    parts = path.split(b"/")
    above = {b"/".join(parts[:i]) + b"/" for i in range(1, len(parts))}
    return "data" in taken.full or path in dirty or bool(above & dirty)


async def test_a_replaced_resource_is_walked_whole_until_the_next_sync_watches_it(
        data_dir: Path, write_config: object, caplog: pytest.LogCaptureFixture) -> None:
    async with watching_resource(data_dir, write_config) as watcher:
        await trio.to_thread.run_sync(shutil.rmtree, data_dir)
        data_dir.mkdir()  # `rm -rf results && mkdir results`, as a pipeline does
        await watcher.sync()
        assert watcher.take().full == {"data"}  # what changed meanwhile was not seen
        # Written while maybe nothing watches the new directory yet: the next capture
        # must see it all the same (it walks whole whatever the re-scan missed).
        await trio.to_thread.run_sync(trees.write, data_dir / "d" / "early.txt", b"1")
        await watcher.sync()  # the next capture's (no reconcile): watched again by now
        assert watcher.all_healthy() and watcher.state["data"].problems == []
        assert sees(watcher.take(), b"d/early.txt")
        await trio.to_thread.run_sync(trees.write, data_dir / "new.txt", b"seen")
        await watcher.sync()
        taken = watcher.take()
        assert taken.full == set() and b"new.txt" in taken.dirty["data"]  # by its events
    assert f"data: {ROOT_GONE}; checkpoints walk it all until it is watched again" \
        in caplog.text
    caplog.clear()


async def test_a_resource_that_stays_missing_is_walked_whole_and_tried_at_each_sync(
        data_dir: Path, tmp_path: Path, write_config: object,
        caplog: pytest.LogCaptureFixture) -> None:
    async with watching_resource(data_dir, write_config) as watcher:
        data_dir.rename(tmp_path / "unplugged")
        await watcher.sync()
        for _ in range(2):
            await watcher.sync()
            assert not watcher.all_healthy() and watcher.take().full == {"data"}
        (tmp_path / "unplugged").rename(data_dir)
        await watcher.sync()
        assert watcher.all_healthy()
        assert watcher.take().full == {"data"}  # once, for what happened unwatched
        await watcher.sync()
        assert watcher.take().full == set()
    caplog.clear()


async def test_a_resource_missing_at_start_is_watched_once_it_appears(
        tmp_path: Path, write_config: object, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "late-disk"
    async with watching_resource(data, write_config) as watcher:
        await watcher.sync()
        assert not watcher.all_healthy() and watcher.take().full == {"data"}
        data.mkdir()  # the disk is mounted
        await watcher.sync()
        assert watcher.all_healthy() and watcher.state["data"].watches == 1
    assert "data: cannot watch the resource directory (No such file or directory); " \
        "checkpoints walk it all until it is watched again" in caplog.text
    caplog.clear()


async def test_a_resource_symlink_pointed_elsewhere_is_walked_whole(
        tmp_path: Path, write_config: object, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    link = tmp_path / "current"
    link.symlink_to("v1")
    async with watching_resource(link, write_config) as watcher:
        await watcher.sync()
        assert watcher.all_healthy() and watcher.take().full == set()
        tmp = tmp_path / "current.new"
        tmp.symlink_to("v2")
        tmp.rename(link)  # `ln -sfn v2 current`: no watched directory sees it
        await watcher.sync()
        assert not watcher.all_healthy() and watcher.take().full == {"data"}
        await watcher.sync()  # the next capture's: v2 is watched now, walked once
        assert watcher.all_healthy() and watcher.take().full == {"data"}
        await watcher.sync()
        assert watcher.take().full == set()
    assert f"data: {ROOT_ELSEWHERE}" in caplog.text
    caplog.clear()


async def test_changes_count_distinct_paths_not_events(data_dir: Path,
                                                       write_config: object) -> None:
    (data_dir / "sub").mkdir()
    config = load_config(write_config({"data": data_dir}))  # type: ignore[operator]
    watcher = Watcher(config.resources, on_change=lambda: None)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            for i in range(10):  # create + modify + close, then again: 6 events a file
                await trio.to_thread.run_sync(trees.write, data_dir / "sub" / f"{i}", b"1")
                await trio.to_thread.run_sync(trees.write, data_dir / "sub" / f"{i}", b"2")
            await watcher.sync()
            nursery.cancel_scope.cancel()
    assert watcher.pending_changes() == 10
    assert watcher.state["data"].dirty == {b"sub/%d" % i for i in range(10)} | {b"sub"}


async def test_watcher_merges_batches_on_the_trio_thread(data_dir: Path,
                                                         write_config: object) -> None:
    config = load_config(write_config({"data": data_dir}))  # type: ignore[operator]
    changed = trio.Event()
    watcher = Watcher(config.resources, on_change=changed.set)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            await trio.to_thread.run_sync(trees.write, data_dir / "a.csv", b"1")
            await changed.wait()
            await watcher.sync()  # the write's later events too (it creates, then writes)
            taken = watcher.take()
            nursery.cancel_scope.cancel()
    assert taken.full == {"data"}  # the first capture is always a reconcile walk
    assert watcher.state["data"].dirty == set() and not watcher.anything_to_capture()
