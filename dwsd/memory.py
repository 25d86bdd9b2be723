"""Keeping the daemon's resident memory near what it holds, not what it once used.

A snapshot reads files on a pool of threads, many of them whole into 1 MiB buffers.
glibc then works against a long-running process twice: after large blocks are freed it
raises its mmap threshold (so later ones come from the heap and fragment it), and it keeps
freed memory in per-thread arenas. `tune_allocator` pins the threshold, so big buffers
always come from mmap and go back when freed; `release_free_memory` (`malloc_trim`)
returns what the arenas hold after a capture. Elsewhere than glibc both do nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 1024  # bytes: blocks this big are mmapped, never heap


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


def release_free_memory() -> None:
    """Return freed heap memory to the system (blocks briefly; call from a worker
    thread)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
