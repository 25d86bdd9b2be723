"""Capture on real trees: fidelity, incremental cost, races, excludes."""
from __future__ import annotations

import dataclasses
import gc
import os
import pickle
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dwsd.memory import RARE_GC_YOUNG
from dwsd.snapshot import capture
from dwsd.snapshot import readers as readers_mod
from dwsd.snapshot.capture import CaptureResult, TreeCache, capture_resource
from dwsd.snapshot.exclude import ExcludeMatcher
from dwsd.snapshot.readers import READ_THREAD_PREFIX, KeptProcesses, ReaderProcesses
from dwsd.snapshot.statcache import CachedFile, CaptureState
from dwsd.store.ids import ObjectId
from dwsd.store.store import Store
from tests import trees

NO_EXCLUDES = ExcludeMatcher(())


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "store", create=True)
    yield s
    s.close()


def test_odd_tree_round_trips_through_the_store(store: Store, odd_tree: Path) -> None:
    result = capture_resource(store.objects, odd_tree, CaptureState(), NO_EXCLUDES)
    assert result.unreadable == [] and result.unstable == []
    source = trees.describe_source(odd_tree)
    stored = trees.describe_snapshot(store.objects, result.root)
    assert set(stored) == set(source)
    for path in source:
        assert stored[path] == source[path], path


def test_a_file_dated_after_2262_is_captured_with_the_latest_time_a_tree_holds(
        store: Store, data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    trees.write(data_dir / "far" / "future.txt", b"from 2400")
    trees.write(data_dir / "now.txt", b"today")
    year_2400_ns = 13_569_465_600 * 10**9
    for path in (data_dir / "far" / "future.txt", data_dir / "far"):
        os.utime(path, ns=(year_2400_ns, year_2400_ns))
    assert os.stat(data_dir / "far").st_mtime_ns == year_2400_ns  # the fs keeps it
    result = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    stored = trees.describe_snapshot(store.objects, result.root)
    assert stored[b"far"]["mtime_ns"] == stored[b"far/future.txt"]["mtime_ns"] == 2**63 - 1
    source = trees.describe_source(data_dir)
    assert stored[b"now.txt"] == source[b"now.txt"]
    assert stored[b"far/future.txt"]["sha256"] == source[b"far/future.txt"]["sha256"]
    assert sorted(r.getMessage().split(" is ")[0] for r in caplog.records) == [
        "the mtime of b'far'", "the mtime of b'future.txt'"]
    caplog.clear()


def test_odd_tree_has_what_it_promises(odd_tree: Path) -> None:
    # Guards the fixture itself: the round-trip test is only as good as this tree.
    names = set(trees.describe_source(odd_tree))
    assert b"latin1-\xe9t\xe9" in names and b"\xff\xfe" in names
    assert any(len(p) > 4096 for p in names)
    assert b"n" * 255 in names


def test_unchanged_tree_gives_same_root_and_writes_nothing(store: Store, data_dir: Path
                                                            ) -> None:
    trees.make_many_files(data_dir, 20_000)
    trees.settle()
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    objects_before = _listing(store.objects.root)
    log = store.objects.start_log()
    second = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES)
    assert second.root == first.root
    assert log.objects_written == 0
    assert second.counters.files_opened == 0
    assert _listing(store.objects.root) == objects_before


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below `root` with its inode and mtime: any write shows."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def test_incremental_full_walk_opens_only_changed_files(store: Store, data_dir: Path
                                                         ) -> None:
    paths = trees.make_many_files(data_dir, 20_000)
    trees.settle()
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    store.objects.make_durable()  # as a snapshot does; trees are written here
    changed = paths[::2000]
    assert len(changed) == 10
    for p in changed:
        p.write_bytes(b"changed " + p.name.encode())
    with trees.OpenCounter(data_dir) as opens:
        log = store.objects.start_log()
        second = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES)
        store.objects.make_durable()
    assert opens.files_opened() == sorted(os.fsencode(p.relative_to(data_dir))
                                          for p in changed)
    assert second.counters.files_opened == 10
    # 10 blobs, 10 directory trees, 1 root tree.
    kinds = sorted(k for k, _ in log.written)
    assert kinds == ["blobs"] * 10 + ["trees"] * 11
    assert second.changed_files == 10


def test_dirty_mode_stats_only_dirty_paths(store: Store, data_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Cached, a sample of lstats takes a few µs each: a margin for a busy machine.
    monkeypatch.setattr(capture, "COLD_LSTAT_S", 1e-3)
    paths = trees.make_many_files(data_dir, 20_000)
    trees.settle()
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    changed = paths[1::4000]
    for p in changed:
        p.write_bytes(b"new content")
    (data_dir / "d0000" / "f000000.txt").unlink()
    (data_dir / "newdir").mkdir()
    (data_dir / "newdir" / "x").write_bytes(b"x")
    dirty = [os.fsencode(p.relative_to(data_dir)) for p in changed]
    dirty += [b"d0000/f000000.txt", b"newdir", b"d0000"]
    second = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES, dirty)
    full = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES)
    assert second.root == full.root
    assert second.counters.files_opened == len(changed) + 1
    # Each dirty path once, plus the one file inside the new directory; and a sample of
    # them timed first, found cached: nothing more is lstat'ed ahead.
    assert second.counters.lstats == len(dirty) + 1
    assert len(dirty) >= capture.WARM_AHEAD_MIN
    assert second.counters.warmed == capture.COLD_SAMPLE
    assert second.state.files.keys() == full.state.files.keys()


def _reader_threads() -> int:
    """Threads taking reader processes' replies (one a process)."""
    return sum(t.name.startswith("capture-reader") for t in threading.enumerate())


def test_a_capture_reads_its_first_files_itself_and_more_in_reader_processes(
        store: Store, data_dir: Path) -> None:
    paths = [data_dir / f"d{i}" / "f.txt" for i in range(20)]
    for p in paths:
        trees.write(p, b"old")
    readers: list[int] = []

    def note_readers(size: int) -> None:  # called as each file is settled
        readers.append(_reader_threads())

    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES,
                             on_file=note_readers, processes_after=20)
    assert readers == [0] * 20
    readers.clear()
    again = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES,
                             on_file=note_readers, processes_after=19, processes=2)
    assert readers == [2] * 20
    assert again.root == first.root and again.counters.files_opened == 20
    assert _reader_threads() == 0 and trees.child_pids() == []  # none outlives its capture
    readers.clear()
    for p in paths:
        p.write_bytes(b"new")
    dirty = [os.fsencode(p.relative_to(data_dir)) for p in paths]
    second = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES, dirty,
                              on_file=note_readers)
    assert readers == [0] * 20
    assert second.changed_files == 20
    assert second.root == capture_resource(store.objects, data_dir, first.state,
                                           NO_EXCLUDES).root


def test_reader_processes_store_and_count_what_the_walking_thread_would(
        tmp_path: Path, data_dir: Path) -> None:
    trees.make_many_files(data_dir, 300)
    for i in range(3):  # streamed in pieces, not read whole
        trees.write(data_dir / "big" / f"b{i}.bin", os.urandom(3 << 20))
    trees.write(data_dir / "empty", b"")
    trees.write(data_dir / "noted.txt", b"x")
    os.setxattr(data_dir / "noted.txt", "user.origin", b"lab")
    os.link(data_dir / "noted.txt", data_dir / "linked.txt")
    results = {}
    for name, after in [("here", 10**6), ("processes", 0)]:
        readers: set[int] = set()
        with Store.open(tmp_path / name, create=True) as s:
            result = capture_resource(s.objects, data_dir, CaptureState(), NO_EXCLUDES,
                                      processes_after=after,
                                      on_file=lambda size: readers.add(_reader_threads()))
            # Every file was settled with (here: without) reader processes running.
            assert (readers == {0}) if name == "here" else (0 not in readers)
            blobs = {oid for kind, oid in s.objects.log.written if kind == "blobs"}
            assert blobs == set(s.objects.iter_ids("blobs"))  # the log has them all
            assert all(s.objects.verify("blobs", oid) for oid in blobs)
            s.objects.make_durable()
            results[name] = (result.root, result.state.files, result.counters,
                             s.objects.log.objects_written, s.objects.log.bytes_written)
    assert results["here"] == results["processes"]


def test_reader_processes_leave_a_stop_or_reload_signal_to_the_capture_that_runs_them(
        store: Store, data_dir: Path) -> None:
    trees.make_many_files(data_dir, 1000)
    signalled: set[int] = set()
    done = threading.Event()

    def stop_readers() -> None:  # as systemd stops a unit, or ^C a group: at any time,
        while not done.is_set():  # the first moments of a process included
            for pid in set(trees.child_pids()) - signalled:
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGINT)
                os.kill(pid, signal.SIGHUP)  # the daemon's reload; a hangup's too
                signalled.add(pid)
    stopper = threading.Thread(target=stop_readers)
    stopper.start()
    try:
        result = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES,
                                  processes_after=0, processes=2)
    finally:
        done.set()
        stopper.join()
    assert len(signalled) == 2
    assert result.counters.files_opened == 1000 and len(result.state.files) == 1000
    assert trees.child_pids() == []


def test_a_capture_whose_reader_processes_die_fails_and_leaves_nothing_behind(
        store: Store, data_dir: Path) -> None:
    from dwsd.errors import CaptureError
    trees.make_many_files(data_dir, 2000)
    killed: list[int] = []

    def kill_readers(size: int) -> None:
        while not killed:  # at the first file settled
            for pid in trees.child_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(CaptureError, match="reader process"):
        capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES,
                         on_file=kill_readers, processes_after=0, processes=2)
    assert len(killed) == 2
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert trees.child_pids() == [] and _reader_threads() == 0
    # What they stored and answered for is in the log, to be rolled back.
    published = {oid for kind, oid in store.objects.log.written}
    assert published <= set(store.objects.iter_ids("blobs"))


@pytest.fixture
def read_here(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the files read in this process (on the walking thread or on threads),
    not in reader processes: one item a file."""
    counted: list[int] = []
    real = readers_mod.read_open_file

    def counting(objects: Any, fd: int) -> Any:
        counted.append(fd)
        return real(objects, fd)
    monkeypatch.setattr(readers_mod, "read_open_file", counting)
    return counted


def test_a_full_walk_finds_the_changes_to_its_stat_cache_as_comparing_would(
        store: Store, data_dir: Path) -> None:
    import shutil
    paths = trees.make_many_files(data_dir, 250)  # d0000 .. d0002
    trees.settle()
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    for p in paths[:3]:
        p.write_bytes(b"edited")
    for p in paths[3:7]:
        p.unlink()
    shutil.rmtree(data_dir / "d0002")  # 50 files
    trees.write(data_dir / "d0000" / "new.txt", b"new")
    second = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES)
    # Comparing the two caches: an entry not the very same object is a change.
    before, after = first.state.files, second.state.files
    compared = {k: v for k, v in after.items() if before.get(k) is not v}
    compared.update((k, None) for k in before if k not in after)
    assert second.changes == compared
    assert len(second.changes) == 3 + 4 + 50 + 1
    assert (second.changed_files, second.removed_files) == (4, 54)



def test_a_full_walk_takes_an_old_entry_only_when_a_new_one_would_equal_it(
        store: Store, data_dir: Path) -> None:
    """The stat cache can hold a key the old tree's entry was not built from: a file
    read after its other name went (its entry keeps the link id), or a chmod on a
    filesystem that leaves the ctime. Forged here: each cache entry made to match the
    file as it is now. The walk must then build the entry anew, as a walk from scratch
    would."""
    trees.write(data_dir / "d" / "linked", b"linked")
    os.link(data_dir / "d" / "linked", data_dir / "d" / "other-name")
    trees.write(data_dir / "d" / "chmod", b"mode")
    trees.write(data_dir / "d" / "chown", b"owner")
    trees.write(data_dir / "d" / "same", b"unchanged")
    trees.settle()
    cache = TreeCache()
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES,
                             trees=cache)
    os.unlink(data_dir / "d" / "other-name")
    os.chmod(data_dir / "d" / "chmod", 0o600)
    os.chown(data_dir / "d" / "chown", 1234, 5678)
    trees.settle()
    for name in (b"d/linked", b"d/chmod", b"d/chown"):
        now = os.lstat(data_dir / os.fsdecode(name))
        first.state.files[name] = first.state.files[name]._replace(ctime_ns=now.st_ctime_ns)
    warm = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES, trees=cache)
    cold = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES,
                            trees=TreeCache())
    assert warm.counters.files_opened == 0  # every stat key matched the cache
    assert warm.root == cold.root
    by_name = {e.name: e for e in trees.entries(store.objects, warm.root, b"d")}
    assert by_name[b"linked"].ino == 0 and by_name[b"chmod"].mode == 0o600
    assert (by_name[b"chown"].uid, by_name[b"chown"].gid) == (1234, 5678)
    # The unchanged file's entry is the old tree's own object, not one built anew;
    # the others are new.
    before, after = cache.get(first.state.dirs[b"d"]), cache.get(warm.state.dirs[b"d"])
    assert before is not None and after is not None and before is not after
    assert after[b"same"] is before[b"same"]
    assert all(after[n] is not before[n] for n in (b"linked", b"chmod", b"chown"))


def _capture_keeping(store: Store, data_dir: Path, kept: KeptProcesses
                     ) -> tuple[CaptureResult, list[int]]:
    """A first capture of `data_dir` (its files settled first: not read again next
    time) whose reads start two reader processes, left in `kept`; and their pids."""
    trees.settle()
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES,
                             processes_after=0, processes=2, kept=kept)
    pids = kept.pids()
    assert len(pids) == 2 and sorted(trees.child_pids()) == sorted(pids)
    return first, pids


def test_reader_processes_kept_read_the_next_full_walk_from_its_first_file(
        store: Store, data_dir: Path, read_here: list[int]) -> None:
    paths = [data_dir / f"d{i}" / "f.txt" for i in range(30)]
    for p in paths:
        trees.write(p, b"old")
    kept = KeptProcesses()
    try:
        first, pids = _capture_keeping(store, data_dir, kept)
        for p in paths[:20]:
            p.write_bytes(b"new")
        # Few files to read, far below PROCESSES_AFTER: alone it would read them here.
        second = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES,
                                  kept=kept)
        assert second.counters.files_opened == 20 and second.changed_files == 20
        assert read_here == []  # all 20 read there
        assert kept.pids() == pids  # the same processes, kept again
        alone = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES)
        assert len(read_here) == 20
        assert second.root == alone.root and second.state.files == alone.state.files
    finally:
        kept.close()
    assert kept.pids() == [] and trees.child_pids() == [] and _reader_threads() == 0
    # Closed, it keeps none that a capture (running as it was closed) gives it.
    capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES, processes_after=0,
                     kept=kept)
    assert kept.pids() == [] and trees.child_pids() == []


def test_reader_processes_with_a_file_not_yet_read_are_stopped_not_kept(
        store: Store, data_dir: Path) -> None:
    trees.write(data_dir / "a.txt", b"a")
    before = sorted(os.listdir("/proc/self/fd"))
    kept = KeptProcesses()
    processes = ReaderProcesses(store.objects, 2)
    future = processes.submit(os.open(data_dir / "a.txt", os.O_RDONLY), 1)  # not sent
    kept.keep(processes)  # (a batch waits for more files)
    assert kept.pids() == [] and trees.child_pids() == [] and future.cancelled()
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_a_full_walk_of_a_large_state_starts_processes_to_keep(
        store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
        read_here: list[int]) -> None:
    trees.make_many_files(data_dir, 40)
    trees.settle()  # older than the racy window: not read again
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    (data_dir / "new.txt").write_bytes(b"new")
    kept = KeptProcesses()
    try:
        monkeypatch.setattr(capture, "START_KEPT_FROM", 41)  # above the state's 40 files
        capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES, kept=kept)
        assert kept.pids() == [] and trees.child_pids() == []
        read_here.clear()
        monkeypatch.setattr(capture, "START_KEPT_FROM", 40)
        result = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES,
                                  processes=2, kept=kept)
        assert result.counters.files_opened == 1 and read_here == []
        assert len(kept.pids()) == 2
    finally:
        kept.close()
    assert trees.child_pids() == []


def test_a_kept_reader_process_that_died_is_not_used_again(
        store: Store, data_dir: Path, read_here: list[int]) -> None:
    trees.make_many_files(data_dir, 30)
    kept = KeptProcesses()
    try:
        first, (dead, alive) = _capture_keeping(store, data_dir, kept)
        os.kill(dead, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while dead in trees.child_pids():  # not reaped yet (by its reply thread, or
            assert time.monotonic() < deadline  # by the check of `take`: either will do)
            time.sleep(0.01)
        (data_dir / "new.txt").write_bytes(b"new")
        second = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES,
                                  kept=kept)
        assert read_here != []  # read here, as without processes
        assert second.counters.files_opened == 1 and second.changed_files == 1
        assert kept.pids() == [] and trees.child_pids() == []  # the live one was stopped too
        assert trees.describe_snapshot(store.objects, second.root) == \
            trees.describe_source(data_dir)
    finally:
        kept.close()


def test_a_capture_that_raises_leaves_its_reader_processes_stopped_or_idle(
        store: Store, data_dir: Path) -> None:
    trees.make_many_files(data_dir, 400)
    kept = KeptProcesses()

    def fail(size: int) -> None:  # at the first file settled, with batches in flight
        raise RuntimeError("stop here")
    before = sorted(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES,
                             on_file=fail, processes_after=0, processes=2, kept=kept)
        # Processes still reading were stopped; any kept had answered every batch, and
        # read the next capture's files as well as new ones would.
        assert sorted(trees.child_pids()) == sorted(kept.pids())
        again = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES,
                                 processes_after=0, processes=2, kept=kept)
        assert again.counters.files_opened == 400
        assert trees.describe_snapshot(store.objects, again.root) == \
            trees.describe_source(data_dir)
    finally:
        kept.close()
    assert trees.child_pids() == []
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_a_dirty_capture_of_enough_paths_takes_the_kept_processes(
        store: Store, data_dir: Path, read_here: list[int]) -> None:
    enough = capture.DIRTY_KEPT_MIN
    paths = trees.make_many_files(data_dir, 2 * enough)
    kept = KeptProcesses()
    try:
        first, pids = _capture_keeping(store, data_dir, kept)
        state = first.state
        for count in (enough - 1, enough):
            changed = paths[:count]
            for p in changed:
                p.write_bytes(b"changed %d" % count)
            dirty = [os.fsencode(p.relative_to(data_dir)) for p in changed]
            del read_here[:]
            result = capture_resource(store.objects, data_dir, state, NO_EXCLUDES, dirty,
                                      kept=kept)
            assert result.changed_files == count and not result.walked_all
            # Fewer than DIRTY_KEPT_MIN: read here, far below PROCESSES_AFTER; as many:
            # every one there, as opened.
            assert len(read_here) == (count if count < enough else 0)
            assert kept.pids() == pids  # left idle, or taken and kept again; none new
            state = result.state
    finally:
        kept.close()


def test_a_reader_process_forgets_what_its_parent_makes_durable(
        store: Store, data_dir: Path) -> None:
    from dwsd.snapshot import reader_process
    from dwsd.store.objects import ObjectStore
    trees.write(data_dir / "a.txt", b"content for a new blob")
    child = ObjectStore(store.objects.root, readonly=True)  # as the process opens it
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reply_r, reply_w = os.pipe()
    served = threading.Thread(target=reader_process.serve, args=(theirs, reply_w, child))
    served.start()
    try:
        fd = os.open(data_dir / "a.txt", os.O_RDONLY)
        socket.send_fds(ours, [reader_process.BATCH_HEADER.pack(1)], [fd])
        os.close(fd)
        with os.fdopen(reply_r, "rb") as replies:
            (length,) = reader_process.FRAME_HEADER.unpack(replies.read(4))
            reply = pickle.loads(replies.read(length))
            ours.shutdown(socket.SHUT_WR)
            served.join()
    finally:
        ours.close()
        theirs.close()
        os.close(reply_w)
        child.close()
    assert reply.batch == 1 and len(reply.published) == 1
    # Kept for a daemon's life, it must not hold every blob it wrote: the parent
    # adopts them (the reply) and flushes them.
    assert child._unsynced == set()


def test_reader_processes_that_cannot_start_ahead_are_tried_and_reported_once(
        store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, read_here: list[int]) -> None:
    import sys
    trees.make_many_files(data_dir, 5)
    trees.settle()
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    monkeypatch.setattr(capture, "START_KEPT_FROM", 1)
    monkeypatch.setattr(sys, "executable", "")  # nothing to start them with
    kept = KeptProcesses()
    for i in range(2):
        (data_dir / f"new{i}.txt").write_bytes(b"new")
        read_here.clear()
        result = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES,
                                  kept=kept)
        assert read_here != [] and result.counters.files_opened == i + 1
    warned = [r for r in caplog.records if "cannot start reader processes" in r.message]
    assert len(warned) == 1 and kept.pids() == []
    caplog.clear()


def _read_threads() -> int:
    return sum(t.name.startswith(READ_THREAD_PREFIX) for t in threading.enumerate())


def test_a_dirty_capture_on_threads_stores_and_counts_what_one_thread_would(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = trees.make_many_files(data_dir, 400)
    changed = paths[::3] + [data_dir / "big.bin"]
    trees.write(data_dir / "noted.txt", b"x")
    os.link(data_dir / "noted.txt", data_dir / "linked.txt")
    dirty = [os.fsencode(p.relative_to(data_dir)) for p in changed] + [b"noted.txt"]
    results = {}
    for name, warm_min in [("here", 10**6), ("threads", capture.WARM_AHEAD_MIN)]:
        monkeypatch.setattr(capture, "WARM_AHEAD_MIN", warm_min)
        monkeypatch.setattr(capture, "COLD_LSTAT_S", 0.0)  # the paths count as not cached
        (data_dir / "big.bin").write_bytes(b"big" * (1 << 20))  # streamed in pieces
        trees.settle()
        readers: list[int] = []
        with Store.open(tmp_path / name, create=True) as s:
            first = capture_resource(s.objects, data_dir, CaptureState(), NO_EXCLUDES)
            s.objects.make_durable()
            for p in changed:
                p.write_bytes(f"{p.name} changed for {name[:4]}".encode())
            os.setxattr(data_dir / "noted.txt", "user.origin", name[:4].encode())
            result = capture_resource(s.objects, data_dir, first.state, NO_EXCLUDES, dirty,
                                      on_file=lambda size: readers.append(_read_threads()))
            assert (max(readers) == 0) if name == "here" else (max(readers) > 0)
            assert _read_threads() == 0  # none outlives its capture
            assert result.root == capture_resource(s.objects, data_dir, first.state,
                                                   NO_EXCLUDES).root
            blobs = {oid for kind, oid in s.objects.log.written if kind == "blobs"}
            assert all(s.objects.verify("blobs", oid) for oid in blobs)
            counters = dataclasses.replace(result.counters, warmed=0)
            results[name] = (result.changed_files, counters, s.objects.log.objects_written,
                             len(result.state.files))
    assert results["here"] == results["threads"]
    assert results["here"][0] == len(changed)


def test_the_files_a_full_walk_leaves_to_read_are_read_on_threads_when_enough(
        tmp_path: Path, data_dir: Path) -> None:
    """Once the walk is over, its last batch of opened files is read on threads (its
    thread then only settles their outcomes and writes trees); a few are read as before,
    on the walking thread. Either way the same content is stored."""
    paths = trees.make_many_files(data_dir, 200, per_dir=20)
    trees.settle()
    for changed in (capture.READ_AFTER_WALK_MIN, capture.READ_AFTER_WALK_MIN - 1):
        with Store.open(tmp_path / f"s{changed}", create=True) as s:
            first = capture_resource(s.objects, data_dir, CaptureState(), NO_EXCLUDES)
            for p in paths[:changed]:
                p.write_bytes(f"{p.name} now {changed}".encode())
            threads: list[int] = []
            result = capture_resource(s.objects, data_dir, first.state, NO_EXCLUDES,
                                      on_file=lambda size: threads.append(_read_threads()))
            # Unchanged files are reported during the walk, read ones after it.
            during, after = threads[:len(paths) - changed], threads[len(paths) - changed:]
            assert during == [0] * len(during)
            threaded = changed >= capture.READ_AFTER_WALK_MIN
            assert after == ([capture.READ_AFTER_WALK_THREADS] if threaded else [0]) * changed
            assert _read_threads() == 0  # none outlives its capture
            assert result.counters.files_opened == result.changed_files == changed
            assert result.root == capture_resource(s.objects, data_dir, CaptureState(),
                                                   NO_EXCLUDES).root
            for p in paths[:changed]:
                blob = result.state.files[os.fsencode(p.relative_to(data_dir))].blob
                assert s.objects.get("blobs", blob) == p.read_bytes()


class _FullAfterFive(trees.HookedStore):
    """A store that fails as a full disk does from its sixth blob on."""
    stored = 0

    def store_bytes(self, kind: Any, data: bytes) -> Any:
        from dwsd.errors import StoreError
        self.stored += 1
        if self.stored > 5:
            raise StoreError("the store is full")
        return super().store_bytes(kind, data)


def _fills_up_leaving_no_file_open(store: Store, capture_into: Any) -> None:
    """`capture_into(objects)` captures into `store` as a store that fills up: the
    store's error comes out, and no file it opened, no read thread, is left."""
    from dwsd.errors import StoreError
    before = set(os.listdir("/proc/self/fd"))
    full = _FullAfterFive(store.objects.root)
    with pytest.raises(StoreError, match="the store is full"):
        capture_into(full)
    full.close()
    # None opened since is left (an earlier test's file the collector closes meanwhile
    # may be gone too).
    assert set(os.listdir("/proc/self/fd")) <= before
    assert _read_threads() == 0


def test_a_full_walk_failing_on_its_read_threads_leaves_no_file_open(
        store: Store, data_dir: Path) -> None:
    paths = trees.make_many_files(data_dir, 100)
    trees.settle()
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    for p in paths:
        p.write_bytes(b"changed")
    threads: list[int] = []
    _fills_up_leaving_no_file_open(store, lambda objects: capture_resource(
        objects, data_dir, first.state, NO_EXCLUDES,
        on_file=lambda size: threads.append(_read_threads())))
    assert threads and min(threads) > 0  # the reads that got through ran on the threads


def test_a_cold_dirty_capture_reads_the_tree_database_ahead(
        store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While it warms its paths, a dirty-path capture that finds them not cached has the
    tree database read in (its commit looks the new trees' ids up there); one that
    finds them cached does not. Counted in bytes read from the disk and with mincore(2)."""
    from tests.fusehelp import disk_reads_during, drop_pages, page_vector, wait_until
    trees.add_random_trees(store.objects, 1500)
    paths = trees.make_many_files(data_dir, 40)
    trees.settle()
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    store.objects.make_durable()
    store.objects.trees.wait_checkpointed()  # else it may hold the checkpoint lock
    db = store.objects.root / "trees.db"
    with sqlite3.connect(db) as con:  # the trees into the file itself, out of the log
        assert con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    size = db.stat().st_size
    assert size > 200 * 4096

    def capture_changed(cold: bool, n: int) -> int:
        monkeypatch.setattr(capture, "COLD_LSTAT_S", 0.0 if cold else 10.0)
        for p in paths[:n]:
            p.write_bytes(f"{p.name} changed {cold} {n}".encode())
        if drop_pages(db) > 0:
            pytest.skip("this file system keeps a dropped file's pages (tmpfs?)")
        dirty = [os.fsencode(p.relative_to(data_dir)) for p in paths[:n]]
        return disk_reads_during(lambda: capture_resource(
            store.objects, data_dir, first.state, NO_EXCLUDES, dirty))

    assert capture_changed(cold=False, n=10) < size // 2  # its commit's lookups only
    assert capture_changed(cold=True, n=12) >= size // 2
    wait_until(lambda: all(page_vector(db)), timeout=10, what="the whole database cached")


def test_a_dirty_capture_failing_on_threads_leaves_no_file_open(
        store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture, "COLD_LSTAT_S", 0.0)  # the paths count as not cached
    paths = trees.make_many_files(data_dir, 300)
    trees.settle()
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    for p in paths:
        p.write_bytes(b"changed")
    dirty = [os.fsencode(p.relative_to(data_dir)) for p in paths]
    _fills_up_leaving_no_file_open(store, lambda objects: capture_resource(
        objects, data_dir, first.state, NO_EXCLUDES, dirty))


def test_dirty_mode_keeps_unmarked_directories_metadata_without_reading_it(
        store: Store, data_dir: Path) -> None:
    deep = data_dir / "a" / "b"
    trees.write(deep / "f.txt", b"one")
    os.setxattr(data_dir / "a", "user.note", b"kept")
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    (deep / "f.txt").write_bytes(b"two")
    xattr_reads: list[object] = []
    real_listxattr = os.listxattr

    def counting_listxattr(*args: object, **kwargs: object) -> list[str]:
        xattr_reads.append(args[0])
        return real_listxattr(*args, **kwargs)  # type: ignore[arg-type]
    os.listxattr = counting_listxattr  # type: ignore[assignment]
    try:
        second = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES,
                                  [b"a/b/f.txt"])
    finally:
        os.listxattr = real_listxattr
    assert len(xattr_reads) == 1  # the changed file's, not a/ nor a/b/
    full = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES)
    assert second.root == full.root
    a = next(e for e in trees.entries(store.objects, second.root) if e.name == b"a")
    assert a.xattrs == ((b"user.note", b"kept"),)


def test_a_full_walk_keeps_a_bounded_number_of_reads_outstanding(
        store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory must not follow the tree: reads are settled while the walk goes on."""
    trees.make_many_files(data_dir, 3_000)
    outstanding: list[int] = []
    real_finish = capture._Walker.finish

    def counting_finish(self: Any, job: Any) -> Any:
        if not outstanding:  # the root: the walk is over, nothing is settled by finish yet
            outstanding.append(sum(1 for j in self._jobs if not j.settled))
        return real_finish(self, job)
    monkeypatch.setattr(capture._Walker, "finish", counting_finish)
    result = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    assert result.counters.files_opened == 3_000
    assert outstanding == [capture.SETTLE_AFTER]
    assert len(result.state.files) == 3_000


def test_hard_links_settled_apart_keep_one_content(
        store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture, "SETTLE_AFTER", 1)  # the first name settles before the last
    trees.write(data_dir / "a.bin", b"linked content")
    for i in range(5):
        trees.write(data_dir / f"m{i}.txt", b"%d" % i)
    os.link(data_dir / "a.bin", data_dir / "z.bin")
    result = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    by_name = {e.name: e for e in trees.entries(store.objects, result.root)}
    a, z = by_name[b"a.bin"], by_name[b"z.bin"]
    assert a.ref == z.ref and a.ino == z.ino != 0
    assert store.objects.get("blobs", a.ref) == b"linked content"  # type: ignore[arg-type]


def test_a_full_walk_reusing_unchanged_trees_equals_a_walk_from_scratch(
        store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for d in ("a", "b", "c", "d", "e", "e/sub", "f", "g"):
        trees.write(data_dir / d / "f.txt", d.encode())
    os.symlink("f.txt", data_dir / "d" / "link")
    trees.settle()
    cache = TreeCache()
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES,
                             trees=cache)
    os.chmod(data_dir / "a" / "f.txt", 0o600)                  # metadata only
    os.chown(data_dir / "f" / "f.txt", 1234, 5678)             # the owner only
    mtime = (data_dir / "g" / "f.txt").stat().st_mtime_ns
    (data_dir / "g" / "f.txt").write_bytes(b"G")               # same size and mtime
    os.utime(data_dir / "g" / "f.txt", ns=(mtime, mtime))
    os.setxattr(data_dir / "b" / "f.txt", "user.k", b"v")      # an xattr
    os.rename(data_dir / "c" / "f.txt", data_dir / "c" / "g.txt")
    os.unlink(data_dir / "d" / "link")
    os.symlink("elsewhere", data_dir / "d" / "link")           # a retargeted symlink
    (data_dir / "e" / "sub" / "empty").mkdir()                 # deep, a new directory
    warm = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES,
                            trees=cache)
    cold = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES,
                            trees=TreeCache())
    assert warm.root == cold.root != first.root
    assert set(first.state.dirs) == {b"", b"a", b"b", b"c", b"d", b"e", b"e/sub", b"f",
                                     b"g"}
    # The files whose ctime moved: the others' entries are the old trees' own.
    assert warm.counters.files_opened == 5  # a, b, c/g.txt, f and g
    encoded: list[object] = []
    real_encode = capture.encode_tree

    def counting_encode(entries: Any) -> bytes:
        encoded.append(entries)
        return real_encode(entries)
    monkeypatch.setattr(capture, "encode_tree", counting_encode)
    again = capture_resource(store.objects, data_dir, warm.state, NO_EXCLUDES, trees=cache)
    assert again.root == warm.root
    assert encoded == []  # every directory kept its tree id without being encoded


@pytest.mark.parametrize("processes_after", [None, 0], ids=["default", "processes"])
def test_a_capture_that_fails_leaves_no_file_open(store: Store, data_dir: Path,
                                                  processes_after: int | None) -> None:
    from dwsd.errors import StoreError
    trees.make_many_files(data_dir, 600)  # more than one batch of reads

    class FailingTrees(trees.HookedStore):
        def put(self, kind: Any, data: bytes) -> Any:
            if kind == "trees":
                raise StoreError("no room for trees")
            return super().put(kind, data)
    before = sorted(os.listdir("/proc/self/fd"))
    failing = FailingTrees(store.objects.root)
    with pytest.raises(StoreError, match="no room for trees"):
        capture_resource(failing, data_dir, CaptureState(), NO_EXCLUDES,
                         processes_after=processes_after)
    failing.close()
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert trees.child_pids() == []


def test_excluded_paths_are_not_captured(store: Store, data_dir: Path) -> None:
    for rel in ["keep.csv", "x.tmp", "sub/y.tmp", "__pycache__/m.pyc", "sub/__pycache__/n",
                "build/out", "sub/build/kept"]:
        trees.write(data_dir / rel, b"1")
    matcher = ExcludeMatcher(["*.tmp", "__pycache__/", "/build"])
    result = capture_resource(store.objects, data_dir, CaptureState(), matcher)
    names = set(trees.describe_snapshot(store.objects, result.root))
    assert names == {b"keep.csv", b"sub", b"sub/build", b"sub/build/kept", b"sub/__pycache__"
                     } - {b"sub/__pycache__"}


@pytest.mark.parametrize("processes_after", [None, 0], ids=["here", "processes"])
def test_file_rewritten_during_capture_is_never_torn(store: Store, data_dir: Path,
                                                     processes_after: int | None) -> None:
    size = 64 << 20
    target = data_dir / "busy.bin"
    target.write_bytes(b"A" * size)
    stop = threading.Event()

    def rewrite() -> None:
        fill = b"B"
        with open(target, "r+b", buffering=0) as f:
            while not stop.is_set():
                f.seek(0)
                for _ in range(size // (1 << 20)):
                    f.write(fill * (1 << 20))
                fill = b"A" if fill == b"B" else b"B"

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        result = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES,
                                  processes_after=processes_after)
    finally:
        stop.set()
        writer.join()
    assert result.unstable == [b"busy.bin"]
    stored = trees.describe_snapshot(store.objects, result.root)
    if b"busy.bin" in stored:  # kept only when one read held still
        blob = [e for e in trees.entries(store.objects, result.root)
                if e.name == b"busy.bin"][0].ref
        data = store.objects.get("blobs", blob)
        assert data in (b"A" * size, b"B" * size)


def test_file_changed_once_during_read_is_reread_and_flagged(store: Store, data_dir: Path
                                                              ) -> None:
    target = data_dir / "once.bin"
    target.write_bytes(b"1" * (32 << 20))
    changed = threading.Event()

    class OnceAfterFirstRead(trees.HookedStore):
        def on_chunk(self) -> None:
            if not changed.is_set():
                changed.set()
                target.write_bytes(b"2" * (32 << 20))

    hooked = OnceAfterFirstRead(store.objects.root)
    result = capture_resource(hooked, data_dir, CaptureState(), NO_EXCLUDES)
    hooked.close()  # commits its trees for `store` to read
    assert result.unstable == [b"once.bin"]
    blob = trees.entries(store.objects, result.root)[0].ref
    assert store.objects.get("blobs", blob) == b"2" * (32 << 20)


def test_file_rewritten_mid_read_is_stored_whole_and_flagged(
        store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Read on this thread, where the rewriter watches the reader's file offset.
    monkeypatch.setattr(capture, "PROCESSES_AFTER_BYTES", 1 << 40)
    size = 128 << 20
    target = data_dir / "big.bin"
    for _ in range(3):  # the rewrite must land while capture's read is under way
        target.write_bytes(b"A" * size)
        rewriter = _RewriteMidRead(target, size, b"B")
        rewriter.start()
        try:
            result = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
        finally:
            rewriter.stop.set()
            rewriter.join()
        if rewriter.landed:
            break
    assert rewriter.landed, "the rewrite never caught capture mid-read"
    assert result.unstable == [b"big.bin"]
    blob = trees.entries(store.objects, result.root)[0].ref
    assert blob is not None and store.objects.get("blobs", blob) == b"B" * size
    # The torn first read left nothing behind, and durability does not look for it.
    assert set(store.objects.iter_ids("blobs")) == {blob}
    store.objects.make_durable()


class _RewriteMidRead(threading.Thread):
    """Watches capture's open file (its offset in /proc/self/fdinfo) and rewrites the
    whole file in place once, while that offset is strictly inside the file."""

    def __init__(self, target: Path, size: int, fill: bytes) -> None:
        super().__init__(daemon=True)
        self.target, self.size, self.fill = str(target), size, fill
        self.landed = False
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and not self.landed:
            pos = self._reader_position()
            if pos is not None and 0 < pos < self.size:
                with open(self.target, "r+b") as f:
                    f.write(self.fill * self.size)
                self.landed = True

    def _reader_position(self) -> int | None:
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") != self.target:
                    continue
                with open(f"/proc/self/fdinfo/{fd}") as info:
                    return int(info.readline().split()[1])
            except (OSError, ValueError, IndexError):
                continue
        return None


def test_unreadable_entries_are_reported_not_fatal() -> None:
    data_dir = trees.world_readable_dir("dwsd-unreadable-")
    trees.write(data_dir / "ok.txt", b"fine")
    trees.write(data_dir / "secret.txt", b"hidden", 0o600)
    trees.write(data_dir / "locked" / "inside.txt", b"hidden")
    os.chmod(data_dir / "locked", 0o700)
    result = trees.capture_as_nobody(data_dir)
    assert sorted(p for p, _ in result["unreadable"]) == ["locked", "secret.txt"]
    assert result["names"] == ["ok.txt"]


def test_dirty_path_with_slash_walks_a_moved_in_directory(store: Store, data_dir: Path
                                                           ) -> None:
    trees.write(data_dir / "sub" / "a", b"old a")
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    os.rename(data_dir / "sub", data_dir / "away")
    trees.write(data_dir / "other" / "b", b"b")
    os.rename(data_dir / "other", data_dir / "sub")  # same name, other content
    dirty = [b"away/", b"sub/"]
    second = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES, dirty)
    full = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    assert second.root == full.root


def test_dirty_write_through_one_hard_link_updates_its_partners(store: Store, data_dir: Path
                                                                ) -> None:
    trees.write(data_dir / "a" / "x", b"old")
    trees.write(data_dir / "b" / "unrelated", b"u")
    os.link(data_dir / "a" / "x", data_dir / "b" / "y")
    trees.settle()
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    with open(data_dir / "a" / "x", "r+b") as f:  # in place: inotify names only a/x
        f.write(b"new")
    second = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES, [b"a/x"])
    full = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    assert second.root == full.root
    stored = {e.name: store.objects.get("blobs", e.ref) for e in
              trees.entries(store.objects, second.root, b"b") if e.ref is not None}
    assert stored[b"y"] == b"new"
    # The same after a full walk that kept both names unchanged from the cache.
    trees.settle()
    trusted = capture_resource(store.objects, data_dir, full.state, NO_EXCLUDES)
    walked = capture_resource(store.objects, data_dir, trusted.state, NO_EXCLUDES)
    assert walked.counters.files_opened == 0
    assert set(walked.state.files) >= {b"a/x", b"b/y"} and walked.removed_files == 0
    with open(data_dir / "a" / "x", "r+b") as f:
        f.write(b"NEW")
    third = capture_resource(store.objects, data_dir, walked.state, NO_EXCLUDES, [b"a/x"])
    stored = {e.name: store.objects.get("blobs", e.ref) for e in
              trees.entries(store.objects, third.root, b"b") if e.ref is not None}
    assert stored[b"y"] == b"NEW"


def test_dirty_new_hard_link_makes_its_unchanged_partner_a_link_too(
        store: Store, data_dir: Path) -> None:
    trees.write(data_dir / "deep" / "solo", b"content")
    (data_dir / "empty").mkdir()
    trees.settle()
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    os.link(data_dir / "deep" / "solo", data_dir / "empty" / "solo-link")
    # inotify names the new link and its directory, never deep/solo (only its link
    # count changed): the capture must find it, or the two names would be two files.
    second = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES,
                              [b"empty", b"empty/solo-link"])
    full = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    assert second.root == full.root
    [solo] = trees.entries(store.objects, second.root, b"deep")
    [link] = trees.entries(store.objects, second.root, b"empty")
    assert solo.ino and solo.ino == link.ino


def test_hard_links_on_a_filesystem_mounted_inside_get_their_own_group(
        store: Store, data_dir: Path) -> None:
    inner = data_dir / "mnt"
    inner.mkdir()
    trees.mount_tmpfs(inner)
    try:
        trees.write(inner / "p", b"inner")
        os.link(inner / "p", inner / "q")
        trees.write(data_dir / "outer", b"outer")
        os.link(data_dir / "outer", data_dir / "outer2")
        result = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    finally:
        trees.unmount(inner)
    top = {e.name: e for e in trees.entries(store.objects, result.root)}
    sub = {e.name: e for e in trees.entries(store.objects, result.root, b"mnt")}
    assert top[b"outer"].ino == top[b"outer2"].ino == (data_dir / "outer").stat().st_ino
    assert sub[b"p"].ino == sub[b"q"].ino != top[b"outer"].ino
    assert sub[b"p"].ino >= 2**63  # never equal to an inode number of the resource's own


def test_the_next_dirty_capture_reads_no_tree_back(store: Store, data_dir: Path) -> None:
    paths = trees.make_many_files(data_dir, 2_000)
    trees.settle()
    cache = TreeCache()
    state = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES,
                             trees=cache).state
    for round_ in range(3):
        paths[round_].write_bytes(b"round %d" % round_)
        reads = store.objects.reads["trees"]
        dirty = [os.fsencode(paths[round_].relative_to(data_dir))]
        state = capture_resource(store.objects, data_dir, state, NO_EXCLUDES, dirty,
                                 trees=cache).state
        assert store.objects.reads["trees"] == reads  # the trees it needs are cached
    full = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    assert state.root == full.root


def test_the_tree_cache_is_bounded_by_entries() -> None:
    cache = TreeCache(limit=10)
    ids = [ObjectId(f"{i:064x}") for i in range(4)]
    for oid in ids:
        cache.put(oid, {b"%d" % n: None for n in range(4)})  # four entries each
    assert cache.get(ids[0]) is None and cache.get(ids[1]) is None
    assert cache.get(ids[2]) is not None and cache.get(ids[3]) is not None


def test_capture_state_totals_follow_every_change() -> None:
    def cached(size: int) -> CachedFile:
        return CachedFile(size, 0, 0, 0, ObjectId("0" * 64), ())
    files = {b"a": cached(1), b"d/x": cached(10), b"d/y": cached(100)}
    state = CaptureState(files=files)
    assert state.totals() == (3, 111)
    derived = state.derive()
    derived.put(b"a", cached(5))
    derived.put(b"new", cached(1000))
    derived.drop(b"missing")
    derived.drop_under(b"d")
    assert derived.totals() == (2, 1005) == (len(derived.files),
                                             sum(f.size for f in derived.files.values()))
    assert sorted(derived.files) == [b"a", b"new"] and b"d/x" not in derived.files
    # Untouched until the derived state is kept: a failed snapshot drops it.
    assert state.totals() == (3, 111) and files == {b"a": cached(1), b"d/x": cached(10),
                                                     b"d/y": cached(100)}
    derived.keep()
    # Kept, its changes went into the same dict: no copy of the whole cache, ever.
    assert derived.files is files and files == {b"a": cached(5), b"new": cached(1000)}
    again = derived.derive()
    again.drop(b"a")
    assert again.files.get(b"a") is None and derived.files[b"a"] == cached(5)
    assert again.derive().totals() == (1, 1000)  # deriving keeps the state first
    assert files == {b"new": cached(1000)}




def test_a_state_summed_late_gives_the_same_totals() -> None:
    """A full walk fills a new state without running totals; they are summed when
    asked, and kept running after that."""
    state = CaptureState()
    for i in range(5):
        state.put(b"f%d" % i, CachedFile(i, 0, 0, 0, ObjectId("0" * 64), ()))
    state.put(b"f4", CachedFile(40, 0, 0, 0, ObjectId("0" * 64), ()))
    state.drop(b"f0")
    assert state.totals() == (4, 1 + 2 + 3 + 40)
    state.drop(b"f1")
    state.put(b"g", CachedFile(7, 0, 0, 0, ObjectId("0" * 64), ()))
    assert state.totals() == (4, 2 + 3 + 40 + 7)


def test_the_garbage_collector_runs_rarely_during_a_capture(
        store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture makes ~5 tuples a name and no cycles: the collector would only scan
    them, again and again (a tenth of a walk that finds nothing changed)."""
    for d in range(10):
        (data_dir / f"d{d}").mkdir()
        for f in range(30):
            (data_dir / f"d{d}" / f"f{f}").write_bytes(b"%d/%d" % (d, f))
    first = capture_resource(store.objects, data_dir, CaptureState(), NO_EXCLUDES)
    collections: list[int] = []
    young_while_finishing: list[int] = []
    real_finish = capture._Walker.finish

    def finish(walker: Any, job: Any) -> ObjectId:
        young_while_finishing.append(gc.get_threshold()[0])
        return real_finish(walker, job)

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    monkeypatch.setattr(capture._Walker, "finish", finish)
    old_threshold, was_on = gc.get_threshold(), gc.isenabled()
    gc.set_threshold(50)  # a collection every 50 objects, left as it is: some 30 here
    gc.enable()
    gc.collect()  # none due before the capture starts
    gc.callbacks.append(count)
    try:
        again = capture_resource(store.objects, data_dir, first.state, NO_EXCLUDES)
        assert len(collections) <= 1  # the one due as it ends
        assert gc.get_threshold()[0] == 50
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*old_threshold)
        if not was_on:
            gc.disable()
    assert young_while_finishing == [RARE_GC_YOUNG] * 11
    assert again.root == first.root and again.counters.lstats == 310


def _warm_threads() -> int:
    return sum(t.name.startswith(capture.WARM_THREAD_PREFIX) for t in threading.enumerate())


def test_a_full_walk_of_uncached_inodes_lstats_them_ahead_on_threads(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = trees.make_many_files(data_dir, 1000)
    trees.settle()
    with Store.open(tmp_path / "store", create=True) as s:
        first = capture_resource(s.objects, data_dir, CaptureState(), NO_EXCLUDES)
        for p in paths[::100]:
            p.write_bytes(b"changed")
        (data_dir / "new.txt").write_bytes(b"new")
        paths[1].unlink()
        trees.settle()  # both captures trust the changed files' stat keys
        monkeypatch.setattr(capture, "COLD_LSTAT_S", 1e-3)  # cached: a margin for a busy CI
        cached = capture_resource(s.objects, data_dir, first.state, NO_EXCLUDES)
        monkeypatch.setattr(capture, "COLD_LSTAT_S", 0.0)  # every lstat counts as slow
        warming: list[int] = []
        warmed_paths: list[bytes] = []
        real_lstat = capture._lstat_quietly

        def lstat_quietly(dfd: int, path: bytes) -> None:
            if threading.current_thread().name.startswith(capture.WARM_THREAD_PREFIX):
                warmed_paths.append(path)
            real_lstat(dfd, path)

        monkeypatch.setattr(capture, "_lstat_quietly", lstat_quietly)
        before = sorted(os.listdir("/proc/self/fd"))
        cold = capture_resource(s.objects, data_dir, first.state, NO_EXCLUDES,
                                on_file=lambda size: warming.append(_warm_threads()))
        assert sorted(os.listdir("/proc/self/fd")) == before
    assert cached.counters.warmed == capture.COLD_SAMPLE  # a sample, found cached
    assert cold.counters.warmed == capture.COLD_SAMPLE + len(first.state.files) == 1004
    assert max(warming) > 0 and _warm_threads() == 0  # none outlives the walk
    # The threads lstat'ed the known files, in the walk's order (the walk may finish
    # before they do: what they had not started is dropped).
    assert warmed_paths and set(warmed_paths) <= set(first.state.files)
    known = list(first.state.files)
    assert warmed_paths[0] in known[:capture.WARM_CHUNK * capture.WALK_WARM_THREADS]
    assert cold.root == cached.root and cold.changed_files == cached.changed_files == 11
    assert cold.counters.lstats == cached.counters.lstats  # the walk's own, not counted
    assert cold.state.files == cached.state.files
