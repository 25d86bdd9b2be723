#!/bin/bash
# Alternating incremental snapshots of the bench set's 1% change: dwsd at an older
# revision, dwsd as checked out, and (full walks) `rsync -a --delete` of the same change,
# so machine drift hits each side alike. Each dwsd side opens the workspace once, as the
# daemon does, takes one untimed snapshot, then times EACH snapshots, every one after a
# new generation of the change; prints the seconds of each, and the median.
#   bench/ab_incremental.sh [OLD_REV] [ROUNDS] [full|dirty] [warm|cold] [EACH]
# cold drops the page cache before each snapshot (root); warm primes the data set's
# inodes, as the bench's warm steps do. Uses the bench data set, store and cp -a copy
# (/var/tmp/dwsd-bench; bench.py makes them); the data set ends at version A.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
old=${1:-HEAD~1}; rounds=${2:-3}; mode=${3:-full}; cache=${4:-warm}; each=${5:-3}
bench=/var/tmp/dwsd-bench; work=/var/tmp/dwsd-ab-incremental
py=$here/.venv/bin/python
rm -rf "$work"; mkdir -p "$work"
git -C "$here" worktree add -q --detach "$work/old" "$old"
trap 'git -C "$here" worktree remove --force "$work/old"; rm -rf "$work"' EXIT
# Generations from the clock: new bytes in every run (one the store has seen before
# writes no blobs there), clear of the ones bench.py uses.
gen=$(( $(date +%s) * 1000 ))

side() {  # $1: label, $2: dwsd source tree or "rsync"
  local src=$2; [ "$src" = rsync ] && src=$here
  # From $src: a script read from stdin puts the working directory first on sys.path.
  (cd "$src" && PYTHONPATH=$src "$py" - "$here/bench" "$bench" "$1" "$2" "$mode" \
     "$cache" "$each" "$gen" <<'PY'
import os, statistics, subprocess, sys, time
from pathlib import Path
sys.path.insert(1, sys.argv[1])
from dataset import GEN_A, Dataset
from harness import drop_caches, prime
bench, label, what, mode, cache = Path(sys.argv[2]), *sys.argv[3:7]
each, gen = int(sys.argv[7]), int(sys.argv[8])
ds = Dataset(bench / "data-full", "full", 20261122)
copy = f"{bench / 'cp-copy'}/"

def prepare() -> None:
    os.sync()
    if cache == "cold":
        drop_caches()
    else:
        prime(ds.root)

took = []
if what == "rsync":
    for i in range(each):
        ds.apply(gen + i)
        prepare()
        t0 = time.perf_counter()
        subprocess.run(["rsync", "-a", "--delete", f"{ds.root}/", copy], check=True)
        took.append(time.perf_counter() - t0)
    ds.apply(GEN_A)
    subprocess.run(["rsync", "-a", "--delete", f"{ds.root}/", copy], check=True)
else:
    from dwsd.workspace import Workspace
    ws = Workspace.open(bench / "dwsd" / "config.yaml")
    ws.snapshot(tags=[])
    for i in range(each):
        ds.apply(gen + i)
        dirty = {"data": ds.dirty_paths()} if mode == "dirty" else None
        prepare()
        t0 = time.perf_counter()
        ws.snapshot(tags=[], dirty=dirty)
        took.append(time.perf_counter() - t0)
    ds.apply(GEN_A)
    ws.snapshot(tags=[])
    ws.close()
print(f"{label:28} median {statistics.median(took):.3f} s   "
      + " ".join(f"{t:.3f}" for t in took))
PY
  )
  gen=$((gen + each))
}

echo "$mode-walk snapshots of the 1% change, $cache: seconds"
for i in $(seq "$rounds"); do
  side "round $i old ($old)" "$work/old"
  side "round $i new (checked out)" "$here"
  if [ "$mode" = full ]; then side "round $i rsync -a --delete" rsync; fi
done
