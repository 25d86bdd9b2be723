"""Helpers for the FUSE tests: skip-or-fail when FUSE is missing, stores with snapshots
(written through the store API, as the workspace does), and a `dwsd mount` server in a
subprocess that is always torn down with `fusermount3 -u -z`."""
from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import mmap
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping, Sequence

import pytest

from dwsd.snapshot.capture import capture_resource
from dwsd.snapshot.exclude import ExcludeMatcher
from dwsd.snapshot.statcache import CaptureState
from dwsd.store.catalog import SnapshotRecord, hostname, manifest_hash
from dwsd.store.store import Store

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def fuse_missing() -> str | None:
    """Why real mounts cannot run here, or None when they can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (no FUSE in this kernel or container)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


def require_fuse() -> None:
    """Skip with the precise reason when FUSE is missing; fail instead when
    DWSD_REQUIRE_FUSE=1 (CI)."""
    reason = fuse_missing()
    if reason is None:
        return
    if os.environ.get("DWSD_REQUIRE_FUSE") == "1":
        pytest.fail(f"DWSD_REQUIRE_FUSE=1 but {reason}")
    pytest.skip(reason)


def abort_fuse_connection(device: int) -> None:
    """Abort the FUSE connection of the mount whose st_dev is `device` (through fusectl,
    mounted here when it is not): its requests in flight fail at once, freeing the
    clients of a hung server, which `fusermount3 -u` and kill -9 cannot."""
    control = Path("/sys/fs/fuse/connections")
    if not any(control.iterdir()):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(control)], check=False)
    (control / str(os.minor(device)) / "abort").write_text("1")


def take_snapshot(store: Path, resources: Mapping[str, Path], tags: Sequence[str] = (),
                  time: dt.datetime | None = None) -> SnapshotRecord:
    """Capture `resources` into `store` (created when missing) as one manual snapshot:
    objects made durable, then the catalog committed."""
    now = time or dt.datetime.now(dt.timezone.utc)
    with Store.open(store, create=True) as s:
        captures = {name: capture_resource(s.objects, path, CaptureState(),
                                           ExcludeMatcher(()))
                    for name, path in resources.items()}
        roots = {name: c.root for name, c in captures.items()}
        s.objects.make_durable()
        with s.changing_catalog() as cat:
            return cat.add(SnapshotRecord(
                id=cat.new_id(now), hash=manifest_hash(roots), number=0, kind="manual",
                tags=tuple(tags), message="", hostname=hostname(), time=now,
                resources=roots,
                root_meta={name: c.root_meta for name, c in captures.items()}))


def delete_snapshot(store: Path, ref: str) -> SnapshotRecord:
    with Store.open(store) as s, s.changing_catalog() as cat:
        return cat.remove(cat.resolve(ref).id)


def tag_snapshot(store: Path, ref: str, tag: str) -> SnapshotRecord:
    with Store.open(store) as s, s.changing_catalog() as cat:
        return cat.tag(ref, tag)


def untag_snapshot(store: Path, tag: str) -> SnapshotRecord:
    with Store.open(store) as s, s.changing_catalog() as cat:
        return cat.untag(tag)


def unmount(mountpoint: Path) -> None:
    """Lazy unmount; quiet when nothing is mounted there."""
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True,
                   timeout=STOP_TIMEOUT)


def is_mounted(mountpoint: Path) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


class ViewServer:
    """`dwsd mount --store S --mount M` in a subprocess (pyfuse3 allows one mount per
    process, and the test process must stay free to do blocking I/O on the view)."""

    def __init__(self, store: Path, mountpoint: Path, *extra: str) -> None:
        self.store = store
        self.mountpoint = mountpoint
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] = tempfile.TemporaryFile()

    def start(self) -> "ViewServer":
        """Start the server and wait for its readiness line (never a sleep)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dwsd.cli.dwsd", "mount", "--store", str(self.store),
             "--mount", str(self.mountpoint), *self.extra],
            stdout=subprocess.PIPE, stderr=self._log, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert self.proc.stdout is not None
        line = _readline(self.proc.stdout, START_TIMEOUT)
        assert line.startswith(b"mounted "), f"no readiness line: {line!r}\n{self.log()}"
        assert is_mounted(self.mountpoint), self.log()
        return self

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> int:
        """SIGTERM, wait, return the exit code (the mount must be gone by then)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL: the server dies without unmounting (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)

    def close(self) -> None:
        """Tear down whatever is left: the process, then the mount."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        finally:
            unmount(self.mountpoint)
            self._log.close()


@contextlib.contextmanager
def serving(store: Path, mountpoint: Path, *extra: str) -> Iterator[ViewServer]:
    """A started ViewServer; stopped with SIGTERM (exit code 0 checked) at the end."""
    server = ViewServer(store, mountpoint, *extra)
    try:
        server.start()
        yield server
        assert server.stop() == 0, server.log()
        assert not is_mounted(mountpoint), "the view is still mounted after SIGTERM"
    finally:
        server.close()


def _readline(stream: IO[bytes], timeout: float) -> bytes:
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            return b"<timeout>"
    return stream.readline()


def run(cmd: Sequence[str | Path], cwd: Path | None = None, user: int | None = None,
        timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    """Run an outside tool (optionally as another uid/gid via setpriv)."""
    argv = [str(c) for c in cmd]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, cwd=cwd, capture_output=True, timeout=timeout)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0,
               what: str = "condition") -> None:
    """Poll `condition` until it holds (a bounded wait for a state change the view
    announces only through the filesystem, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def cached_pages(path: Path) -> tuple[int, int]:
    """(pages of `path` in the page cache, pages of `path`): see page_vector."""
    vec = page_vector(path)
    return sum(vec), len(vec)


def drop_pages(path: Path) -> int:
    """Drop `path`'s (clean) pages from the page cache; how many are still there (more
    than 0 on a filesystem that keeps them, tmpfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return sum(page_vector(path))


def disk_reads_during(action: Callable[[], object]) -> int:
    """Bytes this process had read from storage while `action` ran, the tree database
    read-ahead threads it started included (joined first). From /proc/self/io's
    read_bytes, which counts a read when it is submitted: a read-ahead's pages reach
    the page cache later (mincore sees few of them when its thread ends)."""
    before = _disk_read_bytes()
    action()
    for thread in threading.enumerate():
        if thread.name == "trees read ahead":
            thread.join(10)
    return _disk_read_bytes() - before


def _disk_read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def page_vector(path: Path) -> list[bool]:
    """Whether each page of `path` is in the page cache, asked with mincore(2) of a
    mapping that is never touched: asking reads nothing. Run as root (mincore reports
    the page cache only to a file's owner or writer)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pages = -(-size // mmap.PAGESIZE)
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapping:
            start = ctypes.c_char.from_buffer(mapping)
            vec = (ctypes.c_ubyte * pages)()
            ok = libc.mincore(ctypes.byref(start), ctypes.c_size_t(size), vec)
            del start  # the mapping cannot close while exported
            assert ok == 0, os.strerror(ctypes.get_errno())
    return [bool(v & 1) for v in vec]
