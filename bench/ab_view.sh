#!/bin/bash
# Alternating reads of the bench set's small files (< 100 KiB, path order, 1 MiB reads)
# through `dwsd mount` at an older revision and as checked out, so machine drift hits
# each side alike. Three cases a round, each on a fresh mount except the last:
#   cold   page cache, dentries and inodes dropped first
#   fresh  the store's blobs in the page cache (the cold read put them there), new mount
#   again  the same mount read again (the kernel's cache of the view is warm)
#   bench/ab_view.sh [OLD_REV] [ROUNDS]     (root: drops the page cache)
# Uses the bench data set and store (/var/tmp/dwsd-bench; bench.py makes them).
set -euo pipefail
. "$(dirname "$0")/ab_mount.sh"
rounds=${2:-2}
ab_setup view "${1:-HEAD~1}"
"$py" - "$bench/data-full" > "$work/files" <<'PY'
import os, sys
for d, dirs, files in os.walk(sys.argv[1]):
    dirs.sort()
    for name in sorted(files):
        path = os.path.join(d, name)
        if os.path.getsize(path) < 100 << 10:
            print(os.path.relpath(path, sys.argv[1]))
PY
read_files() {  # prints µs per file
  "$py" - "$mnt/latest/data" "$work/files" <<'PY'
import sys, time
top, names = sys.argv[1], open(sys.argv[2]).read().split("\n")[:-1]
buf = bytearray(1 << 20)
t0 = time.perf_counter()
for name in names:
    with open(f"{top}/{name}", "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
print(f"{(time.perf_counter() - t0) / len(names) * 1e6:.0f}")
PY
}
echo "µs per small file ($(wc -l < "$work/files") files): cold / fresh mount / again"
for i in $(seq "$rounds"); do
  for side in old new; do
    src=$here; [ "$side" = old ] && src=$work/old
    mount_view "$src"; sync; echo 3 > /proc/sys/vm/drop_caches; cold=$(read_files)
    fusermount3 -u "$mnt"; sleep 1
    mount_view "$src"; fresh=$(read_files); again=$(read_files)
    fusermount3 -u "$mnt"; sleep 1
    echo "round $i $side ($( [ "$side" = old ] && echo "$old" || echo checked out )): $cold / $fresh / $again"
  done
done
