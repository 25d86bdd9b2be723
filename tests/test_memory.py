"""Freed memory goes back to the system: a long-running daemon keeps what it holds, not
the high-water mark of its largest capture. The cyclic collector pauses for a capture."""
from __future__ import annotations

import gc
import threading
from typing import Iterator

import pytest

from dwsd.memory import GC_THRESHOLD, paused_gc, release_free_memory, tune_allocator, tune_gc


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
def collector_on() -> Iterator[None]:
    was_on = gc.isenabled()
    gc.enable()
    yield
    if not was_on:
        gc.disable()


def test_pauses_of_the_collector_nest_across_threads(collector_on: None) -> None:
    outer_in = threading.Event()
    outer_out = threading.Event()
    seen: list[bool] = []

    def outer() -> None:
        with paused_gc():
            outer_in.set()
            outer_out.wait(5)
            seen.append(gc.isenabled())

    t = threading.Thread(target=outer)
    t.start()
    assert outer_in.wait(5)
    with paused_gc():
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread's pause still runs
    outer_out.set()
    t.join()
    assert seen == [False] and gc.isenabled()


def test_a_pause_leaves_a_collector_that_was_off_off(collector_on: None) -> None:
    gc.disable()
    with paused_gc():
        pass
    assert not gc.isenabled()


def test_a_long_running_process_collects_its_young_generation_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLD and GC_THRESHOLD[0] > before[0]
    finally:
        gc.set_threshold(*before)
