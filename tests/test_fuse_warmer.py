"""The warmer process: reads the files it is handed into the page cache, never blocks
its server, and ends with it."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from dwsd.fuse.warmer import Warmer
from tests import trees
from tests.fusehelp import cached_pages, wait_until

SIZE = 64 << 10


def uncached_files(top: Path, count: int) -> list[Path]:
    """Files of SIZE bytes, written out and then dropped from the page cache."""
    paths = [top / f"f{i}.bin" for i in range(count)]
    for path in paths:
        trees.write(path, os.urandom(SIZE))
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return paths


@pytest.fixture
def warmer() -> Warmer:
    w = Warmer()
    yield w
    w.close()


def test_handed_files_end_up_in_the_page_cache_past_odd_ones(tmp_path: Path,
                                                            warmer: Warmer) -> None:
    if os.geteuid() != 0:
        pytest.skip("mincore(2) reports the page cache only to a file's owner")
    paths = uncached_files(tmp_path, 3)
    if cached_pages(paths[0])[0] != 0:
        pytest.skip("this filesystem keeps the pages (tmpfs)")
    os.mkfifo(tmp_path / "fifo")
    odd = [str(tmp_path / "missing"), str(tmp_path / "fifo"), str(tmp_path)]
    assert warmer.warm(odd + [str(p) for p in paths])
    pages = SIZE // os.sysconf("SC_PAGE_SIZE")
    wait_until(lambda: all(cached_pages(p) == (pages, pages) for p in paths), 10,
               "every page cached")


def test_handed_directories_are_listed_past_odd_ones(tmp_path: Path,
                                                    warmer: Warmer) -> None:
    listed = tmp_path / "listed"
    listed.mkdir()
    trees.write(listed / "a", b"a")
    os.mkfifo(tmp_path / "fifo")
    # A listing reads the directory, which sets its access time when that is older
    # than its last change (relatime) or always (strictatime).
    os.utime(listed, (0, os.stat(listed).st_mtime))
    for odd in (tmp_path / "missing", tmp_path / "fifo", tmp_path / "fifo" / "below"):
        assert warmer.list_dir(os.fsencode(odd))
    assert warmer.list_dir(os.fsencode(listed))
    if "noatime" in mount_options(listed):
        pytest.skip("this filesystem keeps no access times")
    wait_until(lambda: os.stat(listed).st_atime > 0, 10, "the directory listed")


def mount_options(path: Path) -> list[str]:
    """The options of the mount `path` is on, from /proc/self/mountinfo."""
    device = os.stat(path).st_dev
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            major, minor = fields[2].split(":")
            if os.makedev(int(major), int(minor)) == device:
                return fields[5].split(",")
    return []


def test_a_long_path_is_dropped_not_written_in_pieces(warmer: Warmer) -> None:
    assert warmer.list_dir(b"/" + b"d" * 4094)  # with "/" and NUL, past PIPE_BUF
    assert warmer.pid is None  # nothing written: the helper was not even started


def test_a_warmer_that_is_behind_refuses_a_batch_without_blocking(
        tmp_path: Path, warmer: Warmer) -> None:
    paths = [str(p) for p in uncached_files(tmp_path, 2)]
    assert warmer.warm(paths)  # started by its first paths
    assert warmer.pid is not None
    os.kill(warmer.pid, signal.SIGSTOP)
    try:
        # The pipe holds 64 KiB: it fills within a few hundred batches.
        results = [warmer.warm(paths) for _ in range(2000)]
    finally:
        os.kill(warmer.pid, signal.SIGCONT)
    assert results[0] and not results[-1]


def test_no_process_starts_before_the_first_paths(warmer: Warmer) -> None:
    assert warmer.pid is None and warmer.close() == 0


def test_the_warmer_ends_by_itself_when_its_input_does(tmp_path: Path,
                                                       warmer: Warmer) -> None:
    assert warmer.warm([str(tmp_path / "missing")])
    assert warmer.close() == 0  # not killed after close's wait
