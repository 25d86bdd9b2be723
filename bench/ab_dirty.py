"""Alternating dirty-path snapshots of the bench set's 1% change, read on one thread and
as dwsd chooses (threads when the paths are not cached), so machine drift hits both alike.

    .venv/bin/python bench/ab_dirty.py warm|cold [ROUNDS]      (cold: root, drops caches)

Uses the bench data set and store (/var/tmp/dwsd-bench; bench.py makes them) and puts
the data set back to version A at the end. Each round applies a new generation of the
change, so every snapshot writes new blobs.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from dataset import GEN_A, Dataset  # noqa: E402
from harness import drop_caches, prime  # noqa: E402

from dwsd.snapshot import capture  # noqa: E402
from dwsd.workspace import Workspace  # noqa: E402

WORK = Path("/var/tmp/dwsd-bench")
SEED = 20261122
# From the clock: new bytes in every run (a generation the store has seen before writes
# no blobs there), clear of the generations bench.py uses.
FIRST_GEN = int(time.time()) * 1000


def main() -> None:
    cache = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    assert cache in ("warm", "cold"), cache
    ds = Dataset(WORK / "data-full", "full", SEED)
    ws = Workspace.open(WORK / "dwsd" / "config.yaml")
    chosen = capture.WARM_AHEAD_MIN
    took: dict[str, list[float]] = {"one thread": [], "dwsd's choice": []}
    try:
        ws.snapshot(tags=[])  # the stat cache as the data set is now
        gen = FIRST_GEN
        for _ in range(rounds):
            for mode, samples in took.items():
                capture.WARM_AHEAD_MIN = 10**9 if mode == "one thread" else chosen
                gen += 1
                ds.apply(gen)
                prepare(ds, cache)
                t0 = time.perf_counter()
                ws.snapshot(tags=[], dirty={"data": ds.dirty_paths()})
                samples.append(time.perf_counter() - t0)
    finally:
        capture.WARM_AHEAD_MIN = chosen
        ds.apply(GEN_A)
        ws.snapshot(tags=[])
        ws.close()
    for mode, samples in took.items():
        print(f"{cache} {mode:14} median {statistics.median(samples):.3f} s  runs "
              + " ".join(f"{s:.3f}" for s in samples))


def prepare(ds: Dataset, cache: str) -> None:
    os.sync()
    if cache == "cold":
        drop_caches()
    else:
        prime(ds.root)


if __name__ == "__main__":
    main()
