"""Mounting and serving the view: `serve_view` and dead-mount clean-up.

pyfuse3 keeps its session in module globals: one view per process.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import re
import shutil
import stat
from pathlib import Path

import pyfuse3
import trio

from dwsd.errors import MountError
from dwsd.fuse.follow import catalog_key, follow_catalog
from dwsd.fuse.ops import ViewOps
from dwsd.fuse.vfs import Inode
from dwsd.fuse.warmer import Warmer
from dwsd.store.store import Store

log = logging.getLogger(__name__)

# The kernel reads a FUSE file ahead 128 KiB at a time by default, one request each.
# 4 MiB windows let it ask for 1 MiB per request: a cold read of a 256 MB file through
# the view went from 684-767 to 745-988 MB/s (alternating runs on one mount).
READ_AHEAD_KB = 4096


def mount_options(allow_other: bool) -> set[str]:
    """FUSE mount options: the kernel checks permissions (`default_permissions`) always;
    other users reach the view only with `allow_other`. `ro` makes the kernel refuse
    writes before they reach us (the handlers refuse them too)."""
    options = {"default_permissions", "ro", "fsname=dwsd", "subtype=dwsd"}
    if allow_other:
        options.add("allow_other")
    return options


async def serve_view(store_path: Path | str, mountpoint: Path | str, *,
                     allow_other: bool = False, follow: bool = False,
                     task_status: trio.TaskStatus[ViewOps] = trio.TASK_STATUS_IGNORED
                     ) -> None:
    """Mount the read-only view of the store at `mountpoint` and serve it.

    A dead mount left there by a crashed server is cleared first. Reports the `ViewOps`
    through `task_status` once mounted; the daemon calls its `reload_catalog()` after each
    catalog change. With `follow`, the view follows catalog.json by itself (for `dwsd
    mount`, which runs without the daemon). Returns when the view is unmounted from outside;
    on cancellation unmounts and re-raises. Raises StoreError, MountError.
    """
    store = await trio.to_thread.run_sync(
        functools.partial(Store.open, store_path, readonly=True))
    mountpoint = Path(mountpoint).absolute()
    await prepare_mountpoint(mountpoint)
    warmer = Warmer()
    try:
        ops = ViewOps(store, invalidate=_invalidate_entry,
                      store_pages=pyfuse3.notify_store, warm=warmer.warm,
                      list_ahead=functools.partial(_list_below, warmer,
                                                   os.fsencode(mountpoint)))
        first_key = await trio.to_thread.run_sync(catalog_key, store.catalog.path)
        await ops.reload_catalog()
        try:
            pyfuse3.init(ops, str(mountpoint), mount_options(allow_other))
        except RuntimeError as exc:
            raise MountError(f"cannot mount the view at {mountpoint}: {exc}") from exc
        log.info("view of %s mounted at %s%s", store.root, mountpoint,
                 " (allow_other)" if allow_other else "")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_run_fuse, mountpoint, nursery.cancel_scope)
                nursery.start_soon(_widen_read_ahead_once_initialized, ops, mountpoint)
                if follow:
                    nursery.start_soon(follow_catalog, ops, first_key)
                task_status.started(ops)
        finally:
            ops.shutdown()
            # Blocks briefly (umount2, or fusermount3 when not root); it must run even
            # when cancelled, and nothing else is served by now.
            pyfuse3.close(unmount=True)
            log.info("view at %s unmounted", mountpoint)
    finally:
        warmer.close()  # blocks briefly: the helper ends at the end of its input


def _list_below(warmer: Warmer, mountpoint: bytes, path: bytes) -> bool:
    return warmer.list_dir(os.path.join(mountpoint, path))


async def _run_fuse(mountpoint: Path, scope: trio.CancelScope) -> None:
    await pyfuse3.main()
    log.info("the view at %s was unmounted from outside", mountpoint)
    scope.cancel()


async def _widen_read_ahead_once_initialized(ops: ViewOps, mountpoint: Path) -> None:
    # Not before: the kernel sets the window from the answer to its INIT.
    await ops.initialized.wait()
    await trio.to_thread.run_sync(widen_read_ahead, mountpoint)


def widen_read_ahead(mountpoint: Path) -> None:
    """Set the read-ahead window of the FUSE mount at `mountpoint` to READ_AHEAD_KB
    (its backing device's `read_ahead_kb` in sysfs; root only, else left as it is).
    Never stats the mount point: its server may not be answering yet."""
    device = mount_device(mountpoint)
    if device is None:
        log.debug("no mount at %s in /proc/self/mountinfo", mountpoint)
        return
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("read-ahead of the view left as it is: %s", exc.strerror)


def mount_device(mountpoint: Path) -> str | None:
    """The "major:minor" of the last mount at `mountpoint`, from /proc/self/mountinfo,
    or None."""
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if _unescape(fields[4]) == os.fsencode(mountpoint):
                found = fields[2].decode()
    return found


def _unescape(field: bytes) -> bytes:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes.
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def _invalidate_entry(parent: Inode, name: bytes) -> None:
    # Queued to pyfuse3's notify thread: invalidating from the trio thread could
    # deadlock against a lookup of the same directory that this thread must answer.
    pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)


# -- the mount point ----------------------------------------------------------------------

async def prepare_mountpoint(path: Path) -> None:
    """Make `path` ready to mount on: create it when missing, clear a dead FUSE mount
    (ENOTCONN) with `fusermount3 -u -z`, refuse a live mount or a
    non-directory. Raises MountError."""
    try:
        st = await trio.to_thread.run_sync(_probe, path)
    except FileNotFoundError:
        await trio.to_thread.run_sync(functools.partial(path.mkdir, parents=True))
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise MountError(f"cannot use mount point {path}: {exc.strerror}") from exc
        await clear_dead_mount(path)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {path} is not a directory")
    if await trio.to_thread.run_sync(os.path.ismount, path):
        raise MountError(f"{path} is already mounted (is another dwsd serving it?)")


def _probe(path: Path) -> os.stat_result:
    """stat `path`; raises ENOTCONN for a dead FUSE mount. statvfs is asked too: FUSE
    never caches it, while a stat may be answered from the kernel's attribute cache
    for a while after the server died. Blocks."""
    st = os.stat(path)
    os.statvfs(path)
    return st


async def clear_dead_mount(path: Path) -> None:
    """Lazily unmount a dead FUSE mount at `path`. Raises MountError if that fails."""
    fusermount = shutil.which("fusermount3") or "fusermount3"
    result = await trio.run_process([fusermount, "-u", "-z", str(path)], check=False,
                                    capture_stdout=True, capture_stderr=True)
    if result.returncode != 0:
        raise MountError(f"cannot clear the dead mount at {path}: "
                         f"{result.stderr.decode(errors='replace').strip()}")
    log.warning("cleared a dead mount at %s (left by a server that crashed)", path)
