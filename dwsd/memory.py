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
collector would scan them again and again as they pile up (a tenth of a walk that finds
nothing changed), and `rare_gc` lets it run only every 100,000 objects while one runs.
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
# A capture keeps about 1.2 objects a name until it ends (25,000 at the most for the
# bench set's 21,327 names): with this young generation, one of up to ~80,000 names
# runs no collection at all, and a larger one one per 100,000 objects.
RARE_GC_YOUNG = 100_000


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


class _RareGc:
    """The `rare_gc` blocks running, and the thresholds in force before the first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.before = gc.get_threshold()


_RARE = _RareGc()


@contextlib.contextmanager
def rare_gc(young: int = RARE_GC_YOUNG) -> Iterator[None]:
    """Let the cyclic garbage collector's young generation grow to `young` objects
    during the block before it runs: for work that makes many objects and no
    reference cycles (a capture), while the rest of the process (the view, the control
    server) still has its cycles collected, only less often. Process-wide, and nests
    across threads: the thresholds in force before the first block are back when the
    last one ends."""
    with _RARE.lock:
        _RARE.count += 1
        if _RARE.count == 1:
            _RARE.before = gc.get_threshold()
            gc.set_threshold(max(young, _RARE.before[0]), *_RARE.before[1:])
    try:
        yield
    finally:
        with _RARE.lock:
            _RARE.count -= 1
            if _RARE.count == 0:
                gc.set_threshold(*_RARE.before)
