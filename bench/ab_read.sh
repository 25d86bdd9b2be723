#!/bin/bash
# Alternating cold reads of the whole bench set (every file in path order, 1 MiB reads,
# as the bench's view_read step) through `dwsd mount` at an older revision and as
# checked out, so machine drift hits each side alike. Fresh mount, page cache dropped
# after mounting; prints seconds per class of file. DIR reads one class alone (large,
# medium or small).
#   bench/ab_read.sh [OLD_REV] [ROUNDS] [DIR]     (root: drops the page cache)
# Uses the bench data set and store (/var/tmp/dwsd-bench; bench.py makes them).
set -euo pipefail
. "$(dirname "$0")/ab_mount.sh"
rounds=${2:-3}
ab_setup read "${1:-HEAD~1}"
(cd "$bench/data-full" && find "${3:-.}" -type f | sed 's|^\./||' | LC_ALL=C sort) > "$work/files"
echo "cold read of all files: seconds for large/ medium/ small/ and in all"
measure() {
  "$py" - "$mnt/bench-first/data" "$work/files" <<'PY'
import collections, sys, time
top, names = sys.argv[1], open(sys.argv[2]).read().split("\n")[:-1]
buf, took = bytearray(1 << 20), collections.Counter()
for name in names:
    t0 = time.perf_counter()
    with open(f"{top}/{name}", "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    took[name.split("/")[0]] += time.perf_counter() - t0
print(" ".join(f"{k} {v:.2f}" for k, v in sorted(took.items())), f"all {sum(took.values()):.2f}")
PY
}
ab_cold_rounds "$rounds" measure
