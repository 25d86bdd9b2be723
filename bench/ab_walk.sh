#!/bin/bash
# Alternating cold walks of the bench set's snapshot through `dwsd mount` at an older
# revision and as checked out, so machine drift hits each side alike: the same
# single-threaded scandir + lstat walk as the bench's view_walk step, on a fresh mount
# with the page cache, dentries and inodes dropped after mounting. Prints the walk's
# time and the serving process's CPU time (all its threads).
#   bench/ab_walk.sh [OLD_REV] [ROUNDS]     (root: drops the page cache)
# Uses the bench data set and store (/var/tmp/dwsd-bench; bench.py makes them).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
old=${1:-HEAD~1}; rounds=${2:-3}
bench=/var/tmp/dwsd-bench; work=/var/tmp/dwsd-ab-walk; mnt=$bench/mnt/ab-walk
py=$here/.venv/bin/python
rm -rf "$work"; mkdir -p "$work" "$mnt"
git -C "$here" worktree add -q --detach "$work/old" "$old"
sed "s|^mount: .*|mount: \"$mnt\"|" "$bench/dwsd/config.yaml" > "$work/view.yaml"
trap 'fusermount3 -u -z "$mnt" 2>/dev/null || true
      git -C "$here" worktree remove --force "$work/old"; rm -rf "$work"' EXIT
echo "cold walk of bench-first/data: seconds, server CPU seconds"
for i in $(seq "$rounds"); do
  for side in old new; do
    src=$here; [ "$side" = old ] && src=$work/old
    (cd "$src" && PYTHONPATH=$src exec "$py" -m dwsd.cli.dwsd mount \
       --config "$work/view.yaml" > "$work/mount.log" 2>&1) &
    pid=$!
    for _ in $(seq 100); do mountpoint -q "$mnt" && break; sleep 0.1; done
    mountpoint -q "$mnt" || { cat "$work/mount.log"; exit 1; }
    ls "$mnt" > /dev/null
    sync; echo 3 > /proc/sys/vm/drop_caches
    took=$("$py" - "$mnt/bench-first/data" "$pid" <<'PY'
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
)
    fusermount3 -u "$mnt"; wait "$pid" || true
    echo "round $i $side ($( [ "$side" = old ] && echo "$old" || echo checked out )): $took"
  done
done
