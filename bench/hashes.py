"""Measure candidate hash functions on this machine: `python bench/hashes.py`.

Prints MB/s for one large buffer and for many small ones (the shape of a workspace)."""
import hashlib
import os
import time

import blake3


def rate(fn, bufs, rounds):
    total = sum(len(b) for b in bufs) * rounds
    t0 = time.perf_counter()
    for _ in range(rounds):
        for b in bufs:
            fn(b)
    return total / (time.perf_counter() - t0) / 1e6


def main() -> None:
    big = [os.urandom(64 << 20)]
    small = [os.urandom(16 << 10) for _ in range(4096)]
    cands = {
        "sha256": lambda b: hashlib.sha256(b).digest(),
        "blake2b": lambda b: hashlib.blake2b(b, digest_size=32).digest(),
        "blake3": lambda b: blake3.blake3(b).digest(),
        "blake3 (threads)": lambda b: blake3.blake3(b, max_threads=blake3.blake3.AUTO).digest(),
    }
    print(f"{'hash':18} {'64 MiB MB/s':>12} {'16 KiB MB/s':>12}")
    for name, fn in cands.items():
        print(f"{name:18} {rate(fn, big, 4):12.0f} {rate(fn, small, 4):12.0f}")


if __name__ == "__main__":
    main()
