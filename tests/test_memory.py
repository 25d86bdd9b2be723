"""Freed memory goes back to the system: a long-running daemon keeps what it holds, not
the high-water mark of its largest capture."""
from __future__ import annotations

import threading

from dwsd.memory import release_free_memory, tune_allocator


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) / 1024


def churn_on_a_thread() -> list[bytes]:
    """What a capture worker does to the heap: many mid-sized buffers, then all freed
    but every 64th, which stay (so the arena cannot simply shrink from its top)."""
    kept: list[bytes] = []

    def work() -> None:
        blocks = [bytes(2048) for _ in range(60_000)]
        kept.extend(blocks[::64])
    t = threading.Thread(target=work)
    t.start()
    t.join()
    return kept


def test_freed_heap_memory_is_returned() -> None:
    tune_allocator()
    before = resident_mib()
    kept = churn_on_a_thread()
    churned = resident_mib()
    release_free_memory()
    after = resident_mib()
    assert churned - before > 50  # the churn did leave ~120 MB resident
    assert after < before + 20
    assert len(kept) == 938
