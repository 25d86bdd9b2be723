#!/bin/bash
# Alternating cold runs of a first snapshot, so machine drift hits each side alike:
# `cp -a` (+ sync), dwsd at an older revision, dwsd as checked out; ROUNDS rounds.
#   bench/ab_first.sh [OLD_REV] [ROUNDS]     (root: drops the page cache)
# Uses the bench data set (/var/tmp/dwsd-bench/data-full; bench.py makes it).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
old=${1:-HEAD~1}; rounds=${2:-3}
src=/var/tmp/dwsd-bench/data-full; work=/var/tmp/dwsd-ab
py=$here/.venv/bin/python
rm -rf "$work"; mkdir -p "$work"
git -C "$here" worktree add -q --detach "$work/old" "$old"
trap 'git -C "$here" worktree remove --force "$work/old"; rm -rf "$work"' EXIT
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
snapshot() {  # $1: source tree of dwsd to run
  rm -rf "$work/store"
  # From $1: a script read from stdin puts the working directory first on sys.path.
  (cd "$1" && PYTHONPATH=$1 "$py" - "$work/store" "$src" <<'PY'
import os, subprocess, sys, time
from pathlib import Path
import dwsd
assert dwsd.__file__.startswith(os.getcwd()), dwsd.__file__
from dwsd.snapshot.capture import capture_resource
from dwsd.snapshot.exclude import ExcludeMatcher
from dwsd.snapshot.statcache import CaptureState
from dwsd.store.store import Store
store = Store.open(Path(sys.argv[1]), create=True)
subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)
t0 = time.perf_counter()
capture_resource(store.objects, Path(sys.argv[2]), CaptureState(), ExcludeMatcher(()))
t1 = time.perf_counter()
store.objects.make_durable()
t2 = time.perf_counter()
print(f"capture {t1 - t0:.2f} s + durable {t2 - t1:.2f} s = {t2 - t0:.2f} s")
PY
  )
}
for i in $(seq "$rounds"); do
  rm -rf "$work/copy"; cold
  s=$(date +%s.%N); cp -a "$src" "$work/copy"; m=$(date +%s.%N); sync; e=$(date +%s.%N)
  printf "round %d  cp -a %.2f s + sync %.2f s\n" "$i" "$(echo "$m - $s" | bc)" "$(echo "$e - $m" | bc)"
  rm -rf "$work/copy"
  echo "round $i  old ($old): $(snapshot "$work/old")"
  echo "round $i  new: $(snapshot "$here")"
done
