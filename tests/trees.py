"""Test helpers: build odd trees, and describe a tree (on disk or in the store) as a
comparable dict of bytes path -> attributes."""
from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

from dwsd.snapshot.statcache import RACY_WINDOW_NS
from dwsd.store.ids import ObjectId
from dwsd.store.objects import ObjectStore
from dwsd.store.tree import DIR, FILE, SYMLINK, decode_tree
from dwsd.store.treedb import TreeDB

BIG_FILE_SIZE = 300 * 1000 * 1000
DEEP_NAME = b"d" * 200
DEEP_LEVELS = 25          # 25 * 201 bytes: deeper than PATH_MAX (4096)
OLD_NS = -1_234_567_890_123_456_789   # 1930
FUTURE_NS = 4_102_444_800_123_456_789  # 2100


def settle() -> None:
    """Wait out the racy-timestamp window so fresh files count as settled (see
    statcache.RACY_WINDOW_NS): this is a precondition of exact work counts, not a
    wait for readiness."""
    time.sleep(2 * RACY_WINDOW_NS / 1e9)


def write(path: Path, data: bytes, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mode is not None:
        os.chmod(path, mode)


def make_odd_tree(root: Path) -> None:
    """Every kind of odd file the capture must get right."""
    root.mkdir(parents=True)
    write(root / "empty", b"")
    (root / "emptydir").mkdir()
    write(root / "sub" / "hello.txt", b"hello\n")
    block = os.urandom(1 << 20)
    with open(root / "big.bin", "wb") as f:
        for i in range(BIG_FILE_SIZE // len(block)):
            f.write(block[i % 7:] + block[:i % 7])
        f.write(block[:BIG_FILE_SIZE % len(block)])
    os.symlink("does-not-exist", root / "dangling")
    os.symlink("/etc/hostname", root / "absolute")
    os.symlink("../outside", root / "sub" / "dotdot")
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    os.symlink("self", root / "self")
    write(root / "link-1", b"hard linked\n")
    os.link(root / "link-1", root / "sub" / "link-2")
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "socket"))
    sock.close()
    write(Path(os.fsdecode(bytes(root) + b"/latin1-\xe9t\xe9")), b"non-utf8 name\n")
    write(Path(os.fsdecode(bytes(root) + b"/\xff\xfe")), b"")
    write(root / ("n" * 255), b"long name\n")
    write(root / "mode000", b"secret\n", 0o000)
    write(root / "mode600", b"private\n", 0o600)
    write(root / "mode4755", b"#!/bin/sh\n", 0o4755)
    write(root / "xattr.txt", b"with xattrs\n")
    os.setxattr(root / "xattr.txt", "user.origin", b"lab-7")
    os.setxattr(root / "xattr.txt", "user.empty", b"")
    os.setxattr(root / "sub", "user.kind", b"directory")
    write(root / "old", b"from 1930\n")
    os.utime(root / "old", ns=(OLD_NS, OLD_NS))
    write(root / "future", b"from 2100\n")
    os.utime(root / "future", ns=(FUTURE_NS, FUTURE_NS))
    try:
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pass
    make_deep_path(root / "deep", b"bottom.txt", b"deeper than PATH_MAX\n")


def make_deep_path(top: Path, leaf: bytes, content: bytes) -> None:
    """A file whose path is longer than PATH_MAX, built with directory fds."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(DEEP_LEVELS):
            os.mkdir(DEEP_NAME, dir_fd=fd)
            nfd = os.open(DEEP_NAME, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        out = os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, content)
        os.close(out)
    finally:
        os.close(fd)


def describe_source(root: Path) -> dict[bytes, dict[str, Any]]:
    """Every entry below `root`: kind, mode, owner, mtime, size, content hash/target,
    user xattrs and hard-link group. Works past PATH_MAX."""
    out: dict[bytes, dict[str, Any]] = {}
    links: dict[int, bytes] = {}
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _describe_dir(fd, b"", out, links)
    finally:
        os.close(fd)
    return out


def _describe_dir(dfd: int, rel: bytes, out: dict[bytes, dict[str, Any]],
                  links: dict[int, bytes]) -> None:
    for name in sorted(os.fsencode(n) for n in os.listdir(dfd)):
        path = rel + b"/" + name if rel else name
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        d: dict[str, Any] = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
                             "mtime_ns": st.st_mtime_ns}
        if stat.S_ISREG(st.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
            try:
                d["sha256"] = _sha256_fd(fd)
                d["xattrs"] = _xattrs(fd)
            finally:
                os.close(fd)
            d["size"] = st.st_size
            if st.st_nlink > 1:
                d["link"] = links.setdefault(st.st_ino, path)
        elif stat.S_ISLNK(st.st_mode):
            d["target"] = os.readlink(name, dir_fd=dfd)
        elif stat.S_ISDIR(st.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            try:
                d["xattrs"] = _xattrs(sub)
                _describe_dir(sub, path, out, links)
            finally:
                os.close(sub)
        else:
            d["rdev"] = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) \
                else 0
        out[path] = d
    return None


def describe_snapshot(objects: ObjectStore, tree: ObjectId) -> dict[bytes, dict[str, Any]]:
    """The same description, read back from the store."""
    out: dict[bytes, dict[str, Any]] = {}
    links: dict[int, bytes] = {}
    _describe_tree(objects, tree, b"", out, links)
    return out


def _describe_tree(objects: ObjectStore, tree: ObjectId, rel: bytes,
                   out: dict[bytes, dict[str, Any]], links: dict[int, bytes]) -> None:
    for e in decode_tree(objects.get("trees", tree), tree):
        path = rel + b"/" + e.name if rel else e.name
        d: dict[str, Any] = {"mode": e.st_mode, "uid": e.uid, "gid": e.gid,
                             "mtime_ns": e.mtime_ns}
        if e.kind == FILE:
            assert e.ref is not None
            d["sha256"] = hashlib.sha256(objects.get("blobs", e.ref)).hexdigest()
            d["xattrs"] = dict(e.xattrs)
            d["size"] = e.size
            if e.ino:
                d["link"] = links.setdefault(e.ino, path)
        elif e.kind == SYMLINK:
            d["target"] = e.target
        elif e.kind == DIR:
            assert e.ref is not None
            d["xattrs"] = dict(e.xattrs)
            _describe_tree(objects, e.ref, path, out, links)
        else:
            d["rdev"] = e.rdev
        out[path] = d


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _xattrs(fd: int) -> dict[bytes, bytes]:
    try:
        return {os.fsencode(n): os.getxattr(fd, n) for n in os.listxattr(fd)
                if n.startswith("user.")}
    except OSError as exc:
        if exc.errno == errno.ENOTSUP:
            return {}
        raise


def make_many_files(root: Path, count: int, per_dir: int = 100, size: int = 64) -> list[Path]:
    """`count` small files in directories of `per_dir`; returns their paths."""
    paths = []
    for i in range(count):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        p = d / f"f{i:06d}.txt"
        p.write_bytes(f"file {i}\n".encode().ljust(size, b"."))
        paths.append(p)
    return paths


def add_random_trees(objects: ObjectStore, count: int) -> list[ObjectId]:
    """Write `count` trees of 20 random names each (rows that do not compress into a
    few pages: a tree database of many pages) and make them durable; their ids."""
    from dwsd.store.tree import Entry, encode_tree
    ids = [objects.put("trees", encode_tree(
        [Entry(os.urandom(24).hex().encode(), FILE, 0o644, 0, 0, i, 1, ref="ab" * 32)
         for _ in range(20)])) for i in range(count)]
    objects.make_durable()
    return ids


def entries(objects: ObjectStore, tree: ObjectId, subdir: bytes = b"") -> list[Any]:
    """The entries of `tree`, or of the directory `subdir` (a/b) below it."""
    for name in [n for n in subdir.split(b"/") if n]:
        tree = next(e.ref for e in decode_tree(objects.get("trees", tree), tree)
                    if e.name == name)
    return decode_tree(objects.get("trees", tree), tree)


def mount_tmpfs(where: Path, size: str = "16m") -> None:
    """Mount a fresh tmpfs (needs root): a small disk, or another filesystem in a tree."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True)


def unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], check=True)


def drop_tree(objects_root: Path, oid: str) -> None:
    """Delete a tree row behind the back of any open store (a damaged store)."""
    db = TreeDB(objects_root / "trees.db")
    try:
        db.delete(ObjectId(oid))
        db.commit()
    finally:
        db.close()


class HookedStore(ObjectStore):
    """A real object store that calls `on_chunk` as each streamed blob starts: lets a test
    change a file between capture's fstat-before and its read, deterministically."""

    def on_chunk(self) -> None:
        pass

    def put_stream(self, kind: Any, fd: int, buf: bytearray) -> Any:
        self.on_chunk()
        return super().put_stream(kind, fd, buf)


class OpenCounter:
    """Counts real opens of files below a directory through inotify (IN_OPEN): an
    oracle independent of dwsd's own counters."""

    IN_OPEN, IN_CLOSE_WRITE, IN_ISDIR, IN_NONBLOCK = 0x20, 0x08, 0x40000000, 0o4000

    def __init__(self, root: Path, mask: int = IN_OPEN) -> None:
        self.mask = mask
        import ctypes
        import ctypes.util
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.root = root
        self._fd = -1
        self._dirs: dict[int, bytes] = {}

    def __enter__(self) -> "OpenCounter":
        self._fd = self._libc.inotify_init1(self.IN_NONBLOCK)
        assert self._fd >= 0
        for dirpath, _, _ in os.walk(os.fsencode(self.root)):
            wd = self._libc.inotify_add_watch(self._fd, dirpath, self.mask)
            assert wd >= 0
            self._dirs[wd] = os.path.relpath(dirpath, os.fsencode(self.root))
        return self

    def __exit__(self, *exc: object) -> None:
        self._events = self._drain()
        os.close(self._fd)

    def _drain(self) -> list[bytes]:
        import struct
        out: list[bytes] = []
        while True:
            try:
                data = os.read(self._fd, 1 << 20)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data, pos)
                name = data[pos + 16:pos + 16 + length].rstrip(b"\0")
                pos += 16 + length
                if mask & self.mask and not mask & self.IN_ISDIR and name:
                    d = self._dirs[wd]
                    out.append(name if d == b"." else d + b"/" + name)

    def files_opened(self) -> list[bytes]:
        """Paths of the events seen (opens, or closes after writing with that mask)."""
        return sorted(self._events)


def capture_as_nobody(data_dir: Path) -> dict[str, Any]:
    """Capture `data_dir` in a child process running as uid/gid 65534 into a fresh store;
    return {"unreadable": [[path, error]], "names": [...]} (paths as str)."""
    import json
    import subprocess
    import sys
    import tempfile
    work = Path(tempfile.mkdtemp(prefix="dwsd-nobody-"))
    os.chmod(work, 0o777)
    script = (
        "import json,sys;from pathlib import Path;"
        "from dwsd.store.objects import ObjectStore;"
        "from dwsd.snapshot.capture import capture_resource;"
        "from dwsd.snapshot.exclude import ExcludeMatcher;"
        "from dwsd.snapshot.statcache import CaptureState;"
        "from dwsd.store.tree import decode_tree;"
        "o=ObjectStore.create(Path(sys.argv[1])/'objects');"
        "r=capture_resource(o,Path(sys.argv[2]),CaptureState(),ExcludeMatcher(()));"
        "print(json.dumps({'unreadable':[[p.decode(),e] for p,e in r.unreadable],"
        "'names':[e.name.decode() for e in decode_tree(o.get('trees',r.root))]}))")
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
         "-c", script, str(work), str(data_dir)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def world_readable_dir(prefix: str) -> Path:
    """A fresh directory another user can reach (pytest's tmp_path is 0700 root's)."""
    import tempfile
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    return d


def child_pids() -> list[int]:
    """The pids of this process's children (reader processes, in these tests)."""
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(pid) for pid in f.read().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return pids
