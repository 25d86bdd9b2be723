#!/bin/bash
# Alternating cold walks (the bench's view_walk: scandir + lstat, one thread) of the
# bench data set itself, of bench/floor_view.py serving a copy of its metadata from
# memory (the floor of any pyfuse3 view here), and of dwsd's view of its snapshot, so
# machine drift hits each alike. Caches are dropped after mounting. Prints each round's
# seconds, then each side's median.
#   bench/floor_walk.sh [ROUNDS]     (root: drops the page cache)
# Uses the bench data set and store (/var/tmp/dwsd-bench; bench.py makes them).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bench=/var/tmp/dwsd-bench; py=$here/.venv/bin/python; rounds=${1:-5}
work=/var/tmp/dwsd-floor; mnt=$bench/mnt/floor
rm -rf "$work"; mkdir -p "$work" "$mnt"
sed "s|^mount: .*|mount: \"$mnt\"|" "$bench/dwsd/config.yaml" > "$work/view.yaml"
trap 'fusermount3 -u -z "$mnt" 2>/dev/null || true; rm -rf "$work"' EXIT

walk() {  # the bench's own walk (steps_view.walk)
  "$py" - "$here/bench" "$1" <<'PY'
import sys, time
sys.path.insert(0, sys.argv[1])
from steps_view import walk
t0 = time.perf_counter()
walk(sys.argv[2])
print(f"{time.perf_counter() - t0:.3f}")
PY
}

serve() {  # $1: floor or dwsd; sets pid, top
  if [ "$1" = floor ]; then
    PYTHONPATH=$here "$py" "$here/bench/floor_view.py" "$bench/data-full" "$mnt" \
      > "$work/serve.log" 2>&1 &
    top=$mnt
  else
    "$py" -m dwsd.cli.dwsd mount --config "$work/view.yaml" > "$work/serve.log" 2>&1 &
    top=$mnt/bench-first/data
  fi
  pid=$!
  for _ in $(seq 300); do mountpoint -q "$mnt" && return; sleep 0.1; done
  cat "$work/serve.log"; exit 1
}

cold() { ls "$1" > /dev/null; sync; echo 3 > /proc/sys/vm/drop_caches; }

declare -A times
for i in $(seq "$rounds"); do
  cold "$bench/data-full"; s=$(walk "$bench/data-full")
  serve floor; cold "$mnt"; f=$(walk "$top"); fusermount3 -u "$mnt"; wait "$pid" || true
  serve dwsd; cold "$mnt"; d=$(walk "$top"); fusermount3 -u "$mnt"; wait "$pid" || true
  echo "round $i: source $s s, floor $f s, dwsd $d s"
  times[source]+=" $s"; times[floor]+=" $f"; times[dwsd]+=" $d"
done
for side in source floor dwsd; do
  echo "$side median: $(printf '%s\n' ${times[$side]} | sort -n |
    awk '{v[NR]=$1} END {print (NR % 2 ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2)}') s"
done
