#!/bin/bash
# Alternating cold walks of the bench set's snapshot through `dwsd mount` at an older
# revision and as checked out, so machine drift hits each side alike: the same
# single-threaded scandir + lstat walk as the bench's view_walk step, on a fresh mount
# with the page cache, dentries and inodes dropped after mounting. Prints the walk's
# time and the serving process's CPU time (all its threads).
#   bench/ab_walk.sh [OLD_REV] [ROUNDS]     (root: drops the page cache)
# Uses the bench data set and store (/var/tmp/dwsd-bench; bench.py makes them).
set -euo pipefail
. "$(dirname "$0")/ab_mount.sh"
rounds=${2:-3}
ab_setup walk "${1:-HEAD~1}"
echo "cold walk of bench-first/data: seconds, server CPU seconds"
measure() {
  "$py" - "$mnt/bench-first/data" "$server_pid" <<'PY'
import os, sys, time
top, pid = sys.argv[1], sys.argv[2]
def cpu() -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
c0, t0, pending = cpu(), time.perf_counter(), [top]
while pending:
    with os.scandir(pending.pop()) as listing:
        for entry in listing:
            os.lstat(entry.path)
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
print(f"{time.perf_counter() - t0:.3f} s, CPU {cpu() - c0:.2f} s")
PY
}
ab_cold_rounds "$rounds" measure
