"""Keeping the daemon's resident memory near what it holds, not what it once used.

A snapshot reads files on a pool of threads, many of them whole into 1 MiB buffers.
glibc then works against a long-running process twice: after large blocks are freed it
raises its mmap threshold (so later ones come from the heap and fragment it), and it keeps
freed memory in per-thread arenas. `tune_allocator` pins the threshold, so big buffers
always come from mmap and go back when freed; `release_free_memory` (`malloc_trim`)
returns what the arenas hold after a capture. Elsewhere than glibc both do nothing.

The cyclic garbage collector is the other cost of many objects. The daemon and the view
keep tens of thousands of small long-lived ones (stat caches, decoded trees, inodes) and
make more on every listing; `tune_gc` makes its young generation larger. A capture makes
some 100,000 tuples, none of them in a reference cycle, most living until it ends: the
collector would scan them again and again as they pile up, and `paused_gc` keeps it off
while one runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import threading
from typing import Any, Iterator

_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 1024  # bytes: blocks this big are mmapped, never heap

# With Python's default young generation (700 allocations) a walk of the bench set
# through the view (21,327 entries) ran ~180 collections that freed next to nothing,
# 0.07 s of CPU; with these thresholds it runs ~75, 0.025 s.
GC_THRESHOLD = (5000, 20, 20)


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # glibc's; absent elsewhere
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def tune_allocator() -> None:
    """Pin glibc's mmap threshold (call once, at start; never blocks)."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def tune_gc() -> None:
    """Set the garbage collector's thresholds for a long-running dwsd process (the
    daemon, `dwsd mount`): process-wide, so not for a library call."""
    gc.set_threshold(*GC_THRESHOLD)


def release_free_memory() -> None:
    """Return freed heap memory to the system (blocks briefly; call from a worker
    thread)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)



class _Pauses:
    """The `paused_gc` blocks running, and whether the collector was on before them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.was_on = True


_PAUSES = _Pauses()


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Keep the cyclic garbage collector off for the block: for work that makes many
    objects and no reference cycles (a capture). Process-wide, and nests across threads:
    the collector is on again when the last pause ends, unless it was off before the
    first. Reference counting frees memory as usual meanwhile; only cycles wait."""
    with _PAUSES.lock:
        _PAUSES.count += 1
        if _PAUSES.count == 1:
            _PAUSES.was_on = gc.isenabled()
            gc.disable()
    try:
        yield
    finally:
        with _PAUSES.lock:
            _PAUSES.count -= 1
            if _PAUSES.count == 0 and _PAUSES.was_on:
                gc.enable()
