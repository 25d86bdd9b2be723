"""The bench data set: seeded, reproducible, and the "1% change" applied by generation.

About 20,000 files of 1-64 KiB in nested directories, 200 of 1-8 MiB and four of 256 MiB
(`small`: ten times fewer/smaller). File content is a blake3 XOF stream keyed by the seed,
the path and a *generation*: unique, incompressible and fast to make.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import blake3

DATASET_FORMAT = 2  # bump whenever the generated layout or content changes
DEFAULT_SEED = 20261122
KiB, MiB = 1 << 10, 1 << 20
CHUNK = 16 * MiB
GEN_A, GEN_B, GEN_C, GEN_B_WARM, GEN_C_WARM = 0, 1, 2, 3, 4
# Every written file gets mtime = MTIME_EPOCH + the generation's day + its index seconds,
# so generations differ by whole seconds (rsync's quick check compares seconds: a rewrite
# within the same second as the copy's version would go unnoticed). The A/B scripts take
# generations from the clock (new bytes every run: a generation a store has seen writes
# no blobs there); their days wrap below 1000, clear of bench.py's (under 100).
MTIME_EPOCH = 1_767_225_600  # 2026-01-01T00:00:00Z
GENERATION_DAYS = 100, 1000  # bench.py's generations are days; larger ones wrap in here


def _day(gen: int) -> int:
    low, high = GENERATION_DAYS
    return gen if gen < low else low + gen % (high - low)


@dataclass(frozen=True)
class Shape:
    small: int
    medium: int
    large: int
    large_size: int
    fanout: tuple[int, int, int]  # directories per level under small/
    small_range: tuple[int, int] = (1 * KiB, 64 * KiB)
    medium_range: tuple[int, int] = (1 * MiB, 8 * MiB)


SHAPES = {
    "full": Shape(small=20_000, medium=200, large=4, large_size=256 * MiB, fanout=(10, 10, 10)),
    "small": Shape(small=2_000, medium=20, large=4, large_size=256 * MiB // 10,
                   fanout=(5, 5, 4)),
}


@dataclass(frozen=True)
class FileSpec:
    rel: str
    size: int
    index: int


class Dataset:
    """A seeded tree of files under `root`; `apply(gen)` puts the change set at `gen`."""

    def __init__(self, root: Path, variant: str, seed: int) -> None:
        self.root = root
        self.variant = variant
        self.seed = seed
        self.shape = SHAPES[variant]
        self.marker = root.parent / f"{root.name}.json"
        self._key = blake3.blake3(f"dwsd-bench {DATASET_FORMAT} {seed}".encode()).digest()
        self.files, self.changed = self._layout()

    def _layout(self) -> tuple[list[FileSpec], list[FileSpec]]:
        sh = self.shape
        rng = random.Random(self.seed)
        a, b, c = sh.fanout
        files = []
        for i in range(sh.small):
            # Nine in ten files sit in a leaf directory, the rest one level up.
            parts = [f"d{rng.randrange(a):02d}", f"e{rng.randrange(b):02d}"]
            if rng.random() < 0.9:
                parts.append(f"f{rng.randrange(c):02d}")
            size = rng.randint(*sh.small_range)
            files.append(FileSpec("/".join(["small", *parts, f"s{i:05d}.dat"]), size, i))
        small = list(files)
        medium = []
        for j in range(sh.medium):
            medium.append(FileSpec(f"medium/g{j % 10}/m{j:03d}.bin",
                                   rng.randint(*sh.medium_range), len(files) + j))
        files += medium
        files += [FileSpec(f"large/l{k}.bin", sh.large_size, len(files) + k)
                  for k in range(sh.large)]
        pick = random.Random(self.seed + 1)
        changed = (pick.sample(small, max(2, round(len(small) / 100)))
                   + pick.sample(medium, max(2, round(len(medium) / 100))))
        return files, sorted(changed, key=lambda f: f.rel)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def changed_bytes(self) -> int:
        return sum(f.size for f in self.changed)

    def describe(self) -> dict[str, Any]:
        return {"variant": self.variant, "seed": self.seed, "format": DATASET_FORMAT,
                "files": len(self.files), "bytes": self.total_bytes,
                "changed_files": len(self.changed), "changed_bytes": self.changed_bytes,
                "root": str(self.root)}

    def _marker_text(self) -> str:
        return json.dumps({k: v for k, v in self.describe().items() if k != "root"},
                          sort_keys=True)

    def chunks(self, spec: FileSpec, gen: int) -> Iterator[bytes]:
        h = blake3.blake3(f"{spec.rel}\0{gen}".encode(), key=self._key)
        for off in range(0, spec.size, CHUNK):
            yield h.digest(length=min(CHUNK, spec.size - off), seek=off)

    def _write(self, spec: FileSpec, gen: int) -> None:
        path = self.root / spec.rel
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            for chunk in self.chunks(spec, gen):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        mtime = (MTIME_EPOCH + _day(gen) * 86_400 + spec.index) * 1_000_000_000
        os.utime(path, ns=(mtime, mtime), follow_symlinks=False)

    def ensure(self) -> tuple[bool, float]:
        """Generate unless present with the same marker; put the change set at version A.
        Returns (generated, seconds)."""
        t0 = time.perf_counter()
        if self._present():
            self.apply(0)
            return False, time.perf_counter() - t0
        if self.root.exists():
            shutil.rmtree(self.root)
        self.marker.unlink(missing_ok=True)
        for d in sorted({str(Path(f.rel).parent) for f in self.files}):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            # Biggest first so the long ones do not end up last on one thread.
            order = sorted(self.files, key=lambda f: -f.size)
            list(pool.map(lambda f: self._write(f, 0), order, chunksize=64))
        os.sync()
        self.marker.write_text(self._marker_text())
        return True, time.perf_counter() - t0

    def _present(self) -> bool:
        try:
            if self.marker.read_text() != self._marker_text():
                return False
        except FileNotFoundError:
            return False
        count = sum(len(names) for _, _, names in os.walk(self.root))
        return count == len(self.files)

    def apply(self, gen: int) -> None:
        """Rewrite the change set in place with generation `gen` (0 = version A)."""
        for spec in self.changed:
            self._write(spec, gen)

    def dirty_paths(self) -> list[bytes]:
        return [f.rel.encode() for f in self.changed]
