"""Freed memory goes back to the system: a long-running daemon keeps what it holds, not
the high-water mark of its largest capture. The cyclic collector runs rarely during a
capture."""
from __future__ import annotations

import gc
import threading
from typing import Iterator

import pytest

from dwsd.memory import (GC_THRESHOLD, rare_gc, release_free_memory, tune_allocator,
                         tune_gc)


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


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    """Python's thresholds, put back after the test."""
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield gc.get_threshold()
    gc.set_threshold(*before)


def test_rare_collections_nest_across_threads(thresholds: tuple[int, int, int]) -> None:
    outer_in = threading.Event()
    outer_out = threading.Event()
    seen: list[tuple[int, int, int]] = []

    def outer() -> None:
        with rare_gc(50_000):
            outer_in.set()
            outer_out.wait(5)
            seen.append(gc.get_threshold())

    t = threading.Thread(target=outer)
    t.start()
    assert outer_in.wait(5)
    with rare_gc(50_000):
        assert gc.get_threshold() == (50_000, 10, 10)
    assert gc.get_threshold() == (50_000, 10, 10)  # the other thread's block still runs
    outer_out.set()
    t.join()
    assert seen == [(50_000, 10, 10)] and gc.get_threshold() == thresholds


def test_rare_collections_never_lower_a_larger_young_generation(
        thresholds: tuple[int, int, int]) -> None:
    gc.set_threshold(200_000, 10, 10)
    with rare_gc(50_000):
        assert gc.get_threshold() == (200_000, 10, 10)
    assert gc.get_threshold() == (200_000, 10, 10)


def test_a_long_running_process_collects_its_young_generation_less_often(
        thresholds: tuple[int, int, int]) -> None:
    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLD and GC_THRESHOLD[0] > thresholds[0]
