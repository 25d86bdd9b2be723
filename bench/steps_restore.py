"""Issue 3's figures: restore (full, one subdirectory, after a 1% change) against cp -a,
restic restore and borg extract.

What is timed, the same way for every tool (and as `cp_first` does): the command or the
`Workspace.restore` call alone, from a cold cache (`sync; echo 3 > drop_caches` just
before), into a new, empty directory. Restoring is write-bound and none of the tools
syncs, so `sync` is run right after and timed *separately*: it is in each result's detail
("then sync") and in `extra` as `sync_after_s` and `with_sync_s` (restore + sync). Ratios
are on the restore alone, as for `cp_first`.

Every restore is checked after the clock stops: the number of files and bytes that came
out must match the data set (`ok`); dwsd's copies are also compared with the live files by
`rsync -aHAXni --delete` (nothing printed = identical). Restored copies are deleted at the
end of each step.

The snapshot restored is version A of the data set: dwsd's `bench-first`, restic's oldest
snapshot, borg's `first` archive.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from dataset import GEN_A
from harness import Bench, Result, mb, step, timed
from steps_snapshot import _borg_env, _changed, _phase_text, _restic_env

SUBDIR = "small/d00"  # the subdirectory restored on its own: 1/10 of the small files
# The in-place restore's change: a generation no other step writes, so the pre-restore
# snapshot has new bytes to store (as it would after real work).
GEN_RESTORE, GEN_RESTORE_WALK = 5, 6  # (+10 per repetition: see Bench.gen)
DWSD_REF = "bench-first"  # dwsd_first's snapshot of version A


# -- measuring helpers --------------------------------------------------------------------

@contextlib.contextmanager
def _scratch(b: Bench, name: str) -> Iterator[Path]:
    """A new, empty directory `name` under the bench directory, deleted afterwards."""
    path = b.dir / name
    b.fresh(path)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        b.fresh(path)


def _sync_seconds() -> float:
    t0 = time.perf_counter()
    os.sync()
    return time.perf_counter() - t0


def _tree_counts(root: Path) -> tuple[int, int]:
    """(regular files, their bytes) under `root`; (0, 0) when it does not exist."""
    files = size = 0
    for d, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(d, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return files, size


def _expected(b: Bench, sub: str = "") -> tuple[int, int]:
    """(files, bytes) of the data set, or of its subdirectory `sub`."""
    specs = [f for f in b.ds.files if not sub or f.rel.startswith(sub + "/")]
    return len(specs), sum(f.size for f in specs)


def _written(b: Bench, seconds: float, sync_s: float, out: Path, sub: str = "",
             detail: str = "", extra: dict[str, Any] | None = None,
             ok: bool = True) -> Result:
    """The result of a restore into `out` (which should hold the data set, or its `sub`)."""
    files, size = _tree_counts(out)
    want = _expected(b, sub)
    facts = {"files": files, "bytes": size, "expected_files": want[0],
             "expected_bytes": want[1], "sync_after_s": round(sync_s, 3),
             "with_sync_s": round(seconds + sync_s, 3), **(extra or {})}
    text = f"{files} files, {mb(size)}{detail}; then sync {sync_s:.2f} s"
    if (files, size) != want:
        text += f" (expected {want[0]} files, {mb(want[1])})"
    return Result(seconds, text, facts, ok=ok and (files, size) == want)


def _rsync_differences(copy: Path, live: Path) -> list[str]:
    """What `rsync -aHAXni --delete` would change to make `live` out of `copy`."""
    proc = subprocess.run(["rsync", "-aHAXni", "--delete", f"{live}/", f"{copy}/"],
                          capture_output=True, text=True, check=True)
    return proc.stdout.splitlines()


# -- cp -----------------------------------------------------------------------------------

@step("cp_subdir")
def cp_subdir(b: Bench) -> Result:
    """cp -a of one subdirectory (small/d00) into an empty directory (cold cache)."""
    with _scratch(b, "restore-cp-subdir") as out:
        b.prepare("cold")
        seconds, _ = b.run(["cp", "-a", str(b.ds.root / SUBDIR), str(out / "copy")])
        sync_s = _sync_seconds()
        return _written(b, seconds, sync_s, out / "copy", SUBDIR)


# -- restic and borg ----------------------------------------------------------------------
#
# Both restore absolute paths below their target (<target>/<data set path>/...).

def _restic_first_snapshot(b: Bench) -> str:
    """The id of the repository's oldest snapshot (restic_first's backup of version A)."""
    _, out = b.run(["restic", "snapshots", "--json"], _restic_env(b), setup=True)
    snaps = sorted(json.loads(out), key=lambda s: s["time"])
    return str(snaps[0]["id"])


def _restic_restore(b: Bench, name: str, sub: str = "") -> Result:
    snap = _restic_first_snapshot(b)
    include = ["--include", str(b.ds.root / sub)] if sub else []
    with _scratch(b, name) as out:
        b.prepare("cold")
        seconds, _ = b.run(["restic", "restore", snap, "--target", str(out), *include],
                           _restic_env(b))
        sync_s = _sync_seconds()
        return _written(b, seconds, sync_s, out / b.ds.root.relative_to("/") / sub, sub)


def _borg_extract(b: Bench, name: str, sub: str = "") -> Result:
    rel = b.ds.root.relative_to("/")  # borg stores paths without the leading slash
    with _scratch(b, name) as out:
        b.prepare("cold")
        seconds, _ = b.run(["borg", "extract", "::first",
                            *([str(rel / sub)] if sub else [])], _borg_env(b), cwd=out)
        sync_s = _sync_seconds()
        return _written(b, seconds, sync_s, out / rel / sub, sub)


@step("restic_restore", requires=("restic_first",), ref="cp_first")
def restic_restore(b: Bench) -> Result:
    """restic restore of the whole set into an empty directory (cold cache)."""
    return _restic_restore(b, "restore-restic")


@step("borg_restore", requires=("borg_first",), ref="cp_first")
def borg_restore(b: Bench) -> Result:
    """borg extract of the whole set into an empty directory (cold cache)."""
    return _borg_extract(b, "restore-borg")


# -- dwsd ---------------------------------------------------------------------------------
#
# In-process through the workspace API on the store dwsd_first made. Only the `restore()`
# call is timed; with phase timers on it is split into the pre-restore snapshot (in place
# only; the harness's capture/record/durable timers split that further), planning and
# applying.


@contextlib.contextmanager
def _restore_phases(b: Bench) -> Iterator[dict[str, float]]:
    """Wrap restore's parts for the block (with phase timers on); yields their seconds,
    together with the harness's snapshot phases."""
    import dwsd.workspace as wsmod
    b.phases.clear()
    phases: dict[str, float] = {}
    parts = [("pre_restore", wsmod.Workspace, "snapshot"), ("plan", wsmod, "plan_restore"),
             ("apply", wsmod, "apply_plan")]
    saved = [(owner, attr, getattr(owner, attr)) for _, owner, attr in parts]
    if b.args.phases:
        for (label, owner, attr), (_, _, fn) in zip(parts, saved):
            setattr(owner, attr, timed(phases, label, fn))
    try:
        yield phases
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)
        phases.update(b.phases)


def _dwsd_restore(b: Bench, name: str, **kwargs: Any) -> tuple[float, Any, dict[str, float]]:
    """Time `Workspace.restore(DWSD_REF, **kwargs)`; (seconds, result, phases)."""
    ws = b.workspace()
    with b.profiled(name), _restore_phases(b) as phases:
        with b.timing() as took:
            res = ws.restore(DWSD_REF, **kwargs)
    return took[0], res, phases


def _dwsd_facts(res: Any, phases: dict[str, float]) -> dict[str, Any]:
    return {"files_written": res.files_written, "removed": res.removed,
            "bytes_planned": sum(p.bytes for p in res.plans.values()),
            "errors": len(res.errors),
            "pre_restore": res.pre_restore.id if res.pre_restore else None,
            "phases_s": {k: round(v, 3) for k, v in phases.items()}}


def _dwsd_to_target(b: Bench, name: str, sub: str = "") -> Result:
    """Restore snapshot A (or its `sub`) into an empty directory; check it with rsync."""
    b.workspace()  # opened (if it was not) before the clock starts
    paths = [f"data/{sub}"] if sub else None
    with _scratch(b, name) as out:
        b.prepare("cold")
        seconds, res, phases = _dwsd_restore(b, name, target=out, paths=paths)
        sync_s = _sync_seconds()
        copy = out / "data" / sub
        diffs = _rsync_differences(copy, b.ds.root / sub)
        facts = {**_dwsd_facts(res, phases), "rsync_differences": diffs[:20]}
        detail = (f" ({res.files_written} written)"
                  + (f", rsync: {len(diffs)} differences" if diffs else "")
                  + _phase_text(phases))
        return _written(b, seconds, sync_s, copy, sub, detail, facts,
                        ok=not diffs and not res.errors)


@step("dwsd_restore", requires=("dwsd_first",), ref="cp_first", limit=1.1)
def dwsd_restore(b: Bench) -> Result:
    """dwsd restore of the whole set into an empty directory (--target; cold cache)."""
    return _dwsd_to_target(b, "restore-dwsd")


@step("restic_restore_subdir", requires=("restic_first",), ref="cp_subdir")
def restic_restore_subdir(b: Bench) -> Result:
    """restic restore --include of one subdirectory (small/d00; cold cache)."""
    return _restic_restore(b, "restore-restic-subdir", SUBDIR)


@step("borg_restore_subdir", requires=("borg_first",), ref="cp_subdir")
def borg_restore_subdir(b: Bench) -> Result:
    """borg extract of one subdirectory (small/d00; cold cache)."""
    return _borg_extract(b, "restore-borg-subdir", SUBDIR)


@step("dwsd_restore_subdir", requires=("dwsd_first",), ref="cp_subdir", limit=1.2)
def dwsd_restore_subdir(b: Bench) -> Result:
    """dwsd restore --path of one subdirectory (small/d00) into an empty directory (cold)."""
    return _dwsd_to_target(b, "restore-dwsd-subdir", SUBDIR)


def _changed_files_at(b: Bench, gen: int) -> bool:
    """Do the files of the change set hold generation `gen`'s content?"""
    return all((b.ds.root / spec.rel).read_bytes() == b"".join(b.ds.chunks(spec, gen))
               for spec in b.ds.changed)


def _restore_in_place(b: Bench, name: str, gen: int, dirty: bool) -> Result:
    """Apply generation `gen` to the change set, then restore snapshot A in place; with
    `dirty`, the pre-restore snapshot looks only at the changed files (as in the daemon,
    whose watcher names them), else it walks the whole data set."""
    out: list[Any] = []
    kwargs = {"dirty": {"data": b.ds.dirty_paths()}} if dirty else {}

    def run() -> tuple[float, str]:
        seconds, res, phases = _dwsd_restore(b, name, **kwargs)
        out.extend([res, phases, _sync_seconds(), _changed_files_at(b, GEN_A)])
        return seconds, ""
    b.workspace()
    seconds, _ = _changed(b, gen, "cold", run)
    res, phases, sync_s, restored = out
    facts = _dwsd_facts(res, phases)
    want = len(b.ds.changed)
    facts.update(sync_after_s=round(sync_s, 3), with_sync_s=round(seconds + sync_s, 3),
                 expected_files=want, content_restored=restored)
    detail = (f"wrote {res.files_written}/{want} files, {mb(facts['bytes_planned'])}, "
              f"removed {res.removed}" + ("" if restored else ", content NOT version A")
              + _phase_text(phases) + f"; then sync {sync_s:.2f} s")
    ok = (res.files_written == want and res.removed == 0 and restored
          and res.pre_restore is not None and not res.errors)
    return Result(seconds, detail, facts, ok=ok)


@step("dwsd_restore_1pct", requires=("dwsd_first",), ref="dwsd_restore", limit=0.1)
def dwsd_restore_1pct(b: Bench) -> Result:
    """dwsd restore in place after a 1% change, as the daemon runs it (pre-restore
    snapshot of the dirty paths included; cold cache)."""
    return _restore_in_place(b, "dwsd_restore_1pct", GEN_RESTORE, dirty=True)


@step("dwsd_restore_1pct_walk", requires=("dwsd_first",), ref="dwsd_restore")
def dwsd_restore_1pct_walk(b: Bench) -> Result:
    """dwsd restore in place after a 1% change, without a watcher (pre-restore snapshot
    walks everything; cold cache)."""
    return _restore_in_place(b, "dwsd_restore_1pct_walk", GEN_RESTORE_WALK, dirty=False)
