"""The mounted view over time and under trouble: live catalog changes, corrupt objects,
open readers of deleted snapshots, other users, signals, crashes and outside unmounts.
Each test runs its own `dwsd mount` subprocess over a small store."""
from __future__ import annotations

import concurrent.futures
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from dwsd.fuse.mount import READ_AHEAD_KB, mount_device
from dwsd.fuse.ops import listing_threshold
from dwsd.store.store import Store
from tests import trees
from tests.conftest import WriteConfig
from tests.fusehelp import REPO, STOP_TIMEOUT, ViewServer, abort_fuse_connection, \
    cached_pages, delete_snapshot, is_mounted, require_fuse, run, serving, tag_snapshot, \
    take_snapshot, unmount, untag_snapshot, wait_until

NOBODY = 65534
# The standalone server follows catalog.json through inotify; its fallback check runs
# every 30 s, so passing within this proves the push.
UPDATE_TIMEOUT = 5.0


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    trees.write(root / "public.txt", b"for everyone\n", 0o644)
    trees.write(root / "private.txt", b"owner only\n", 0o600)
    trees.write(root / "other.txt", b"another file\n")
    trees.write(root / "big.bin", os.urandom(1 << 20))
    return root


@pytest.fixture
def store(tmp_path: Path, source: Path) -> Path:
    require_fuse()
    take_snapshot(tmp_path / "store", {"data": source}, tags=["v1"])
    return tmp_path / "store"


@pytest.fixture
def mountpoint() -> Iterator[Path]:
    """A mount point other users can reach (pytest's tmp_path is root's, 0700)."""
    top = trees.world_readable_dir("dwsd-view-")
    yield top / "view"
    unmount(top / "view")


def root_names(mountpoint: Path) -> set[str]:
    return set(os.listdir(mountpoint))


def test_a_new_snapshot_appears_and_latest_moves_at_once(
        store: Path, source: Path, mountpoint: Path) -> None:
    with serving(store, mountpoint):
        first = os.readlink(mountpoint / "latest")
        os.stat(mountpoint / "latest" / "data")  # the kernel now caches `latest`
        trees.write(source / "new.txt", b"new\n")
        second = take_snapshot(store, {"data": source}, tags=["v2"])
        wait_until(lambda: {second.id, "v2"} <= root_names(mountpoint), UPDATE_TIMEOUT,
                   "the new snapshot in the root")
        assert os.readlink(mountpoint / "latest") == second.id != first
        assert (mountpoint / "latest" / "data" / "new.txt").read_bytes() == b"new\n"


def test_deleted_snapshots_and_moved_tags_update_the_root(
        store: Path, source: Path, mountpoint: Path) -> None:
    with serving(store, mountpoint):
        first = os.readlink(mountpoint / "latest")
        trees.write(source / "new.txt", b"new\n")
        second = take_snapshot(store, {"data": source})
        tag_snapshot(store, second.id, "v2")
        wait_until(lambda: "v2" in root_names(mountpoint), UPDATE_TIMEOUT, "tag v2")
        os.stat(mountpoint / "v1" / "data" / "other.txt")
        delete_snapshot(store, first)
        wait_until(lambda: first not in root_names(mountpoint), UPDATE_TIMEOUT,
                   "the deleted snapshot gone")
        assert root_names(mountpoint) == {second.id, "v2", "latest"}
        wait_until(lambda: not (mountpoint / "v1").exists(), UPDATE_TIMEOUT,
                   "the cached entry of the deleted tag gone")
        with pytest.raises(FileNotFoundError):
            os.stat(mountpoint / "v1" / "data" / "other.txt")


def test_an_untagged_name_disappears_while_the_snapshot_stays(
        store: Path, mountpoint: Path) -> None:
    with serving(store, mountpoint):
        snapshot_id = os.readlink(mountpoint / "latest")
        os.stat(mountpoint / "v1" / "data" / "public.txt")  # cached by the kernel now
        untag_snapshot(store, "v1")
        wait_until(lambda: "v1" not in root_names(mountpoint), UPDATE_TIMEOUT,
                   "the tag gone")
        # The kernel's cached entry goes once the queued invalidation is delivered.
        wait_until(lambda: not (mountpoint / "v1").exists(), UPDATE_TIMEOUT,
                   "the cached entry of the tag gone")
        with pytest.raises(FileNotFoundError):
            os.stat(mountpoint / "v1" / "data" / "public.txt")
        assert (mountpoint / snapshot_id / "data" / "public.txt").read_bytes() == \
            b"for everyone\n"


def test_an_open_reader_survives_the_deletion_of_its_snapshot(
        store: Path, mountpoint: Path) -> None:
    with serving(store, mountpoint):
        snapshot_id = os.readlink(mountpoint / "latest")
        with open(mountpoint / "v1" / "data" / "big.bin", "rb") as f:
            head = f.read(4096)
            with Store.open(store, readonly=True) as s:
                blobs = list(s.objects.iter_ids("blobs"))
                for blob in blobs:
                    os.unlink(s.objects.path("blobs", blob))
            delete_snapshot(store, snapshot_id)
            wait_until(lambda: root_names(mountpoint) == set(), UPDATE_TIMEOUT,
                       "an empty root")
            rest = f.read()
        assert len(head + rest) == 1 << 20


def test_opening_a_small_file_puts_its_content_in_the_kernels_cache(
        store: Path, mountpoint: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mincore(2) reports the page cache only to a file's owner")
    with serving(store, mountpoint):
        # Never read before through this mount: only the open can have put it there.
        assert cached_pages(mountpoint / "v1" / "data" / "big.bin") == (256, 256)


def test_the_view_reads_ahead_in_windows_of_read_ahead_kb(store: Path,
                                                        mountpoint: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root may set a device's read-ahead")
    with serving(store, mountpoint):
        device = os.stat(mountpoint).st_dev
        setting = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}"
                       "/read_ahead_kb")
        # Set once the kernel's INIT is answered, which the stat above waited for.
        wait_until(lambda: int(setting.read_text()) == READ_AHEAD_KB, UPDATE_TIMEOUT,
                   f"read_ahead_kb = {READ_AHEAD_KB}")
        with open(mountpoint / "v1" / "data" / "big.bin", "rb") as f:
            assert f.read() == (store.parent / "src" / "big.bin").read_bytes()


def server_read_calls(server: ViewServer) -> int:
    """read(2)-like calls the server made so far (/proc/PID/io syscr): it makes one to
    take each request from the kernel."""
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("syscr:"))


def test_a_reader_of_names_one_by_one_gets_their_directory_listed_ahead(
        tmp_path: Path, mountpoint: Path) -> None:
    require_fuse()
    names = [f"f{i:03}" for i in range(400)]
    for name in names:
        trees.write(tmp_path / "src" / "many" / name, name.encode())
    take_snapshot(tmp_path / "store", {"data": tmp_path / "src"}, tags=["v1"])
    with serving(tmp_path / "store", mountpoint) as server:
        top = os.open(mountpoint / "v1" / "data" / "many", os.O_RDONLY | os.O_DIRECTORY)
        try:
            first = listing_threshold(len(names))
            for name in names[:first]:  # opened by name, as from a file list: no readdir
                fd = os.open(name, os.O_RDONLY, dir_fd=top)
                assert os.read(fd, 16) == name.encode()
                os.close(fd)
            # Names are stat'ed from the directory's fd, so no root name (short
            # timeouts) is looked up again. A name the kernel has from the listing
            # needs no request; each probe takes a new name, from the end, until one
            # needs none.
            probes = list(reversed(names[first:]))

            def probe_needs_no_request() -> bool:
                assert len(probes) > 100, "the listing did not come"
                before = server_read_calls(server)
                os.stat(probes.pop(0), dir_fd=top)
                return server_read_calls(server) == before
            wait_until(probe_needs_no_request, UPDATE_TIMEOUT, "the directory listed")
            before = server_read_calls(server)
            sizes = [os.stat(name, dir_fd=top).st_size for name in probes]
            # 100 or more LOOKUPs without the listing; a few requests of its own may
            # still come in (its last, empty READDIRPLUS and its RELEASEDIR).
            assert server_read_calls(server) - before < 10
            assert sizes == [4] * len(probes)
        finally:
            os.close(top)


def test_mount_device_finds_a_mount_whose_path_mountinfo_escapes(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    where = tmp_path / "a b\\c\td"
    where.mkdir()
    trees.mount_tmpfs(where)
    try:
        device = os.stat(where).st_dev
        assert mount_device(where) == f"{os.major(device)}:{os.minor(device)}"
    finally:
        trees.unmount(where)
    assert mount_device(where) is None


def test_many_readers_of_the_same_small_files_at_once_all_get_their_bytes(
        store: Path, source: Path, mountpoint: Path) -> None:
    """An open pushes a small file's pages into the kernel's cache only while no other
    handle of it is open: a push into a page that a concurrent read holds locked, while
    it waits for the server, would hang the server. Dropping the pages before each read
    makes every read a request, so opens and reads of one file interleave."""
    names = ["public.txt", "other.txt"]
    want = {name: (source / name).read_bytes() for name in names}

    def reader(worker: int) -> int:
        for i in range(200):
            name = names[(worker + i) % len(names)]
            fd = os.open(mountpoint / "v1" / "data" / name, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                assert os.pread(fd, 4096, 0) == want[name]
            finally:
                os.close(fd)
        return 200

    with serving(store, mountpoint):
        device = os.stat(mountpoint).st_dev  # while the server answers
        pool = concurrent.futures.ThreadPoolExecutor(8)
        reads = [pool.submit(reader, worker) for worker in range(8)]
        done, hung = concurrent.futures.wait(reads, timeout=30)
        if hung:
            abort_fuse_connection(device)  # frees the readers stuck in the kernel
        pool.shutdown(wait=True)
        assert not hung, "readers hung: the server stopped answering"
        assert sum(f.result() for f in done) == 1600


def test_a_flipped_byte_in_one_blob_is_eio_for_that_file_only(
        store: Path, mountpoint: Path) -> None:
    with Store.open(store, readonly=True) as s:
        target = s.objects.path("blobs", find_blob(s, b"other.txt"))
    os.chmod(target, 0o644)
    with open(target, "r+b") as f:
        f.write(b"A")
    with serving(store, mountpoint) as server:
        data = mountpoint / "v1" / "data"
        for _ in range(2):
            with pytest.raises(OSError) as exc:
                (data / "other.txt").read_bytes()
            assert exc.value.errno == errno.EIO
        assert (data / "public.txt").read_bytes() == b"for everyone\n"
        assert len((data / "big.bin").read_bytes()) == 1 << 20
        assert sorted(os.listdir(data)) == ["big.bin", "other.txt", "private.txt",
                                            "public.txt"]
        errors = [line for line in server.log().splitlines() if "ERROR" in line]
        assert len(errors) == 1 and target.parent.name + target.name in errors[0]


def find_blob(store: Store, name: bytes) -> str:
    from dwsd.store.tree import decode_tree
    rec = store.catalog.resolve("latest")
    tree = rec.resources["data"]
    entry = next(e for e in decode_tree(store.objects.get("trees", tree)) if e.name == name)
    assert entry.ref is not None
    return entry.ref


@pytest.mark.parametrize("allow_other", [False, True])
def test_another_user_cannot_read_a_0600_file(store: Path, mountpoint: Path,
                                              allow_other: bool) -> None:
    extra = ("--allow-other",) if allow_other else ()
    with serving(store, mountpoint, *extra):
        data = mountpoint / "v1" / "data"
        private = run(["cat", data / "private.txt"], user=NOBODY)
        assert private.returncode != 0 and b"Permission denied" in private.stderr
        public = run(["cat", data / "public.txt"], user=NOBODY)
        if allow_other:
            assert public.stdout == b"for everyone\n", public.stderr
        else:  # without allow_other the kernel refuses every other user outright
            assert b"Permission denied" in public.stderr
        assert (data / "private.txt").read_bytes() == b"owner only\n"  # the owner can


def test_after_kill_9_the_next_start_clears_the_dead_mount(
        store: Path, mountpoint: Path) -> None:
    crashed = ViewServer(store, mountpoint)
    try:
        crashed.start()
        assert crashed.proc is not None
        helpers = start_the_warmer(store, mountpoint, crashed.proc.pid)
    finally:
        crashed.kill()  # the mount stays behind, dead (the fixture clears it at the end)
    # The warmer ends with the end of its input, the pipe from the server.
    wait_until(lambda: not Path(f"/proc/{helpers[0]}").exists(), STOP_TIMEOUT,
               "the warmer gone")
    with pytest.raises(OSError) as exc:
        os.statvfs(mountpoint)  # stat may still be answered from the attribute cache
    assert exc.value.errno == errno.ENOTCONN
    with serving(store, mountpoint) as server:
        assert (mountpoint / "v1" / "data" / "public.txt").read_bytes() == \
            b"for everyone\n"
        assert "cleared a dead mount" in server.log()


def start_the_warmer(store: Path, mountpoint: Path, server: int) -> list[int]:
    """Read the first file of the snapshot cold, so that the server hands the next ones
    to its warmer process, which starts then; return the server's children."""
    for blob in (store / "objects" / "blobs").glob("*/*"):
        fd = os.open(blob, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    assert children(server) == []  # not started with the server
    (mountpoint / "v1" / "data" / "big.bin").read_bytes()
    helpers = children(server)
    assert len(helpers) == 1, helpers
    return helpers


def children(pid: int) -> list[int]:
    """The child processes of `pid`, started by any of its threads."""
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_unmounts_cleanly(store: Path, mountpoint: Path, signum: int) -> None:
    server = ViewServer(store, mountpoint)
    try:
        server.start()
        assert server.proc is not None
        helpers = start_the_warmer(store, mountpoint, server.proc.pid)
        server.proc.send_signal(signum)
        assert server.proc.wait(timeout=STOP_TIMEOUT) == 0, server.log()
        assert not is_mounted(mountpoint)
        # The warmer ended and was reaped before the server exited.
        assert not any(Path(f"/proc/{pid}").exists() for pid in helpers)
    finally:
        server.close()


def test_an_outside_unmount_ends_the_server(store: Path, mountpoint: Path) -> None:
    server = ViewServer(store, mountpoint)
    try:
        server.start()
        assert server.proc is not None
        assert run(["fusermount3", "-u", mountpoint]).returncode == 0
        assert server.proc.wait(timeout=STOP_TIMEOUT) == 0, server.log()
    finally:
        server.close()


def test_a_live_mount_is_not_mounted_over(store: Path, mountpoint: Path) -> None:
    with serving(store, mountpoint):
        second = run([sys.executable, "-m", "dwsd.cli.dwsd", "mount", "--store", store,
                      "--mount", mountpoint], cwd=REPO, timeout=STOP_TIMEOUT)
        assert second.returncode == 1
        assert b"already mounted" in second.stderr


def test_dwsd_mount_reads_store_and_mount_from_the_config(
        store: Path, source: Path, mountpoint: Path, write_config: WriteConfig) -> None:
    config = write_config({"data": source}, store=store)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dwsd.cli.dwsd", "mount", "--config", str(config),
         "--mount", str(mountpoint)], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"mounted ")
        assert os.listdir(mountpoint / "v1") == ["data"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
        unmount(mountpoint)


def test_dwsd_without_a_config_says_which_file_it_tried(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "dwsd.cli.dwsd"], cwd=REPO, env=env,
                         capture_output=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr == (f"dwsd: {tmp_path}/dwsd/config.yaml: cannot read config: "
                          "No such file or directory\n").encode()


def test_dwsd_mount_of_a_missing_store_is_one_line(tmp_path: Path) -> None:
    res = run([sys.executable, "-m", "dwsd.cli.dwsd", "mount", "--store",
               tmp_path / "none", "--mount", tmp_path / "view"], cwd=REPO)
    assert res.returncode == 1
    assert res.stderr.decode().strip().splitlines() == [
        f"dwsd: {tmp_path / 'none'} is not a dwsd store (no format file)"]


def test_dwsd_mount_imports_none_of_the_daemon() -> None:
    """`dwsd mount` is timed from its start until the root lists: the CLI and the view
    must not import the watcher, capture, restore, scheduler or control server."""
    probe = ("import sys, dwsd.cli.dwsd, dwsd.fuse.mount; "
             "print(' '.join(sorted(m for m in sys.modules if m.startswith('dwsd'))))")
    res = run([sys.executable, "-c", probe], cwd=REPO)
    assert res.returncode == 0, res.stderr
    imported = set(res.stdout.decode().split())
    daemon_only = {"dwsd.daemon", "dwsd.workspace", "dwsd.control", "dwsd.schedule",
                   "dwsd.watch", "dwsd.snapshot.capture", "dwsd.snapshot.restore"}
    assert imported & daemon_only == set()
    assert {"dwsd.fuse.mount", "dwsd.config"} <= imported
