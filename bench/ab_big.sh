#!/bin/bash
# Alternating cold reads of the bench set's first 256 MB file through `dwsd mount` at an
# older revision and as checked out, so machine drift hits each side alike: one 1 MiB
# read after another, as the bench's view_big step, on a fresh mount with the page
# cache dropped after mounting. Prints the read's time and rate.
#   bench/ab_big.sh [OLD_REV] [ROUNDS]     (root: drops the page cache)
# Uses the bench data set and store (/var/tmp/dwsd-bench; bench.py makes them).
set -euo pipefail
. "$(dirname "$0")/ab_mount.sh"
ab_setup big "${1:-HEAD~1}"
echo "cold read of bench-first/data/large/l0.bin"
measure() {
  "$py" - "$mnt/bench-first/data/large/l0.bin" <<'PY'
import sys, time
t0, size = time.perf_counter(), 0
with open(sys.argv[1], "rb", buffering=0) as f:
    while chunk := f.read(1 << 20):
        size += len(chunk)
took = time.perf_counter() - t0
print(f"{took:.3f} s, {size / took / 1e6:.0f} MB/s")
PY
}
ab_cold_rounds "${2:-3}" measure
