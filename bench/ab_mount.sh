# Shared by the bench/ab_*.sh scripts (sourced, not run): an older revision checked out
# in a worktree, a view config that mounts the bench store, clean-up on exit.
#   ab_setup NAME OLD_REV   sets here, bench, work, mnt, py, old; the worktree is
#                           $work/old
#   mount_view SRC          serves the view with dwsd's source tree SRC, waits for the
#                           mount; sets server_pid
#   ab_cold_rounds N MEASURE  N rounds of: the old revision, then the checked-out one,
#                           each on a fresh mount with the caches dropped after
#                           mounting; MEASURE (a function) prints the round's result

ab_setup() {
  here=$(cd "$(dirname "$0")/.." && pwd)
  bench=/var/tmp/dwsd-bench; work=/var/tmp/dwsd-ab-$1; mnt=$bench/mnt/ab-$1
  py=$here/.venv/bin/python; old=$2
  rm -rf "$work"; mkdir -p "$work" "$mnt"
  git -C "$here" worktree add -q --detach "$work/old" "$2"
  sed "s|^mount: .*|mount: \"$mnt\"|" "$bench/dwsd/config.yaml" > "$work/view.yaml"
  trap 'fusermount3 -u -z "$mnt" 2>/dev/null || true
        git -C "$here" worktree remove --force "$work/old"; rm -rf "$work"' EXIT
}

mount_view() {
  (cd "$1" && PYTHONPATH=$1 exec "$py" -m dwsd.cli.dwsd mount \
     --config "$work/view.yaml" > "$work/mount.log" 2>&1) &
  server_pid=$!
  for _ in $(seq 100); do mountpoint -q "$mnt" && return; sleep 0.1; done
  cat "$work/mount.log"; exit 1
}

ab_cold_rounds() {
  local i side src took
  for i in $(seq "$1"); do
    for side in old new; do
      src=$here; [ "$side" = old ] && src=$work/old
      mount_view "$src"
      ls "$mnt" > /dev/null
      sync; echo 3 > /proc/sys/vm/drop_caches
      took=$("$2")
      fusermount3 -u "$mnt"; wait "$server_pid" || true
      echo "round $i $side ($( [ "$side" = old ] && echo "$old" || echo checked out )): $took"
    done
  done
}
