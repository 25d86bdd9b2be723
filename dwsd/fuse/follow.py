"""Following the catalog from outside the daemon: `dwsd mount` shows what another
process commits to the store, as it commits it.

The catalog is replaced by a rename into the store directory, so one inotify watch on
that directory (IN_MOVED_TO) says when to reload. trio waits on the inotify fd itself
(`wait_readable`): no thread, no polling. A slow periodic check stays as a fallback for
filesystems where inotify sees nothing (network filesystems, another mount namespace).
"""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import trio

from dwsd.errors import DwsdError
from dwsd.fuse.ops import ViewOps

log = logging.getLogger(__name__)

FALLBACK_CHECK = 30.0  # seconds between checks when inotify stays silent
CatalogKey = tuple[int, int, int] | None

_IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x8, 0x80, 0x100
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000
# By soname: `ctypes.util.find_library` runs `ldconfig -p` in a subprocess, which would
# delay every `dwsd mount` by a few milliseconds (more with a cold page cache).
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def catalog_key(path: Path) -> CatalogKey:
    """What changes whenever the catalog is replaced: (inode, mtime, size); None when
    absent. The catalog is replaced by rename, so the inode changes on every commit even
    within one mtime tick. Blocks."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def open_directory_watch(directory: Path) -> int:
    """A non-blocking inotify fd reporting names created, written or renamed into
    `directory`; the caller closes it. Raises OSError."""
    fd: int = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    mask = _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE
    if _libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"cannot watch {directory}: {os.strerror(err)}")
    return fd


async def follow_catalog(ops: ViewOps, last: CatalogKey,
                         fallback: float = FALLBACK_CHECK) -> None:
    """Reload the view's catalog whenever catalog.json is replaced (`last` is the key of
    the catalog shown now). A failed reload is logged and the view keeps showing the
    previous catalog. Runs until cancelled."""
    path = ops.store.catalog.path
    try:
        fd = open_directory_watch(path.parent)
    except OSError as exc:
        log.warning("view: %s; checking the catalog every %.0f s instead", exc, fallback)
        fd = -1
    try:
        while True:
            await _wait_for_events(fd, fallback)
            key = await trio.to_thread.run_sync(catalog_key, path, limiter=ops.meta_limiter)
            if key != last and await _reload(ops):
                last = key
    finally:
        if fd >= 0:
            os.close(fd)


async def _wait_for_events(fd: int, timeout: float) -> None:
    """Return once `fd` has events (drained, they only say "look again") or after
    `timeout` seconds."""
    with trio.move_on_after(timeout):
        if fd < 0:
            await trio.sleep_forever()
        await trio.lowlevel.wait_readable(fd)
        try:
            while os.read(fd, 65536):
                pass
        except BlockingIOError:
            pass


async def _reload(ops: ViewOps) -> bool:
    try:
        await ops.reload_catalog()
    except DwsdError as exc:
        log.warning("view: cannot reload the catalog: %s", exc)
        return False
    return True
