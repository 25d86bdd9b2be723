"""Issue 2's figures: first snapshot, incremental after a 1% change (full walk and dirty
paths, cold and warm), no-change checkpoint and store growth, against cp, rsync, restic and
borg on the same data set."""
from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
from typing import Any, Callable

from dataset import GEN_A, GEN_B, GEN_B_WARM, GEN_C, GEN_C_WARM
from harness import Bench, Result, du, mb, step

# -- reference tools ----------------------------------------------------------------------
#
# Incremental steps come in two cache states, each compared with the same state:
#   cold  `sync; echo 3 > drop_caches` after the change: nothing of the data set, the
#         repository or the store is cached (the changed files included);
#   warm  `sync` and the data set's metadata primed (every entry lstat'ed), run right after
#         the same tool's cold step: what a long-running daemon on an idle machine sees.

def _changed(b: Bench, gen: int, cache: str, run: Callable[[], tuple[float, str]]
             ) -> tuple[float, str]:
    """Apply generation `gen`, prepare the cache, run; always put version A back."""
    b.ds.apply(b.gen(gen))
    try:
        b.prepare(cache)
        return run()
    finally:
        b.ds.apply(GEN_A)


@step("cp_first")
def cp_first(b: Bench) -> Result:
    """cp -a of the whole set into an empty directory (cold cache)."""
    copy = b.dir / "cp-copy"
    b.fresh(copy)
    b.prepare("cold")
    seconds, _ = b.run(["cp", "-a", str(b.ds.root), str(copy)])
    t0 = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - t0
    return Result(seconds, f"then sync {sync_s:.2f} s", {"sync_after_s": sync_s})


def _rsync(b: Bench, gen: int, cache: str) -> Result:
    seconds, out = _changed(b, gen, cache, lambda: b.run(
        ["rsync", "-a", "--delete", "--stats", f"{b.ds.root}/", f"{b.dir / 'cp-copy'}/"]))
    m = re.search(r"Number of regular files transferred: ([\d,]+)", out)
    sent = int(m.group(1).replace(",", "")) if m else -1
    return Result(seconds, f"{sent} files sent", {"files_transferred": sent})


@step("rsync_1pct", requires=("cp_first",))
def rsync_1pct(b: Bench) -> Result:
    """rsync -a --delete of the 1% change onto the cp -a copy (cold cache)."""
    return _rsync(b, GEN_B, "cold")


@step("rsync_1pct_warm", requires=("cp_first",))
def rsync_1pct_warm(b: Bench) -> Result:
    """rsync -a --delete of the 1% change onto the cp -a copy (warm cache)."""
    return _rsync(b, GEN_B_WARM, "warm")


def _restic_env(b: Bench) -> dict[str, str]:
    return {"RESTIC_REPOSITORY": str(b.dir / "restic-repo"), "RESTIC_PASSWORD": "bench",
            "RESTIC_CACHE_DIR": str(b.dir / "restic-cache")}


def _restic_backup(b: Bench) -> tuple[float, str]:
    return b.run(["restic", "backup", "--quiet", "--host", "bench", str(b.ds.root)],
                 _restic_env(b))


@step("restic_first", ref="cp_first")
def restic_first(b: Bench) -> Result:
    """restic backup into a new repository (defaults; cold cache)."""
    b.fresh(b.dir / "restic-repo", b.dir / "restic-cache")
    b.run(["restic", "init"], _restic_env(b), setup=True)
    b.prepare("cold")
    seconds, _ = _restic_backup(b)
    size = du(b.dir / "restic-repo")[0]
    return Result(seconds, f"repo {mb(size)}", {"repo_bytes": size})


def _restic_incremental(b: Bench, gen: int, cache: str, growth: bool) -> Result:
    before = du(b.dir / "restic-repo")[0]
    seconds, _ = _changed(b, gen, cache, lambda: _restic_backup(b))
    grown = du(b.dir / "restic-repo")[0] - before
    return Result(seconds, f"repo +{mb(grown)}",
                  growth=(grown, b.ds.changed_bytes) if growth else None)


@step("restic_1pct", requires=("restic_first",), ref="rsync_1pct")
def restic_1pct(b: Bench) -> Result:
    """restic backup after the 1% change (cold cache)."""
    return _restic_incremental(b, GEN_B, "cold", growth=True)


@step("restic_1pct_warm", requires=("restic_first",), ref="rsync_1pct_warm")
def restic_1pct_warm(b: Bench) -> Result:
    """restic backup after the 1% change (warm cache)."""
    return _restic_incremental(b, GEN_B_WARM, "warm", growth=False)


def _borg_env(b: Bench) -> dict[str, str]:
    return {"BORG_REPO": str(b.dir / "borg-repo"), "BORG_BASE_DIR": str(b.dir / "borg-base"),
            "BORG_PASSPHRASE": "", "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}


@step("borg_first", ref="cp_first")
def borg_first(b: Bench) -> Result:
    """borg create into a new repository (init -e none, defaults; cold cache)."""
    b.fresh(b.dir / "borg-repo", b.dir / "borg-base")
    b.run(["borg", "init", "-e", "none"], _borg_env(b), setup=True)
    b.prepare("cold")
    seconds, _ = b.run(["borg", "create", "::first", str(b.ds.root)], _borg_env(b))
    size = du(b.dir / "borg-repo")[0]
    return Result(seconds, f"repo {mb(size)}", {"repo_bytes": size})


def _borg_incremental(b: Bench, gen: int, cache: str, archive: str, growth: bool) -> Result:
    before = du(b.dir / "borg-repo")[0]
    seconds, _ = _changed(b, gen, cache, lambda: b.run(
        ["borg", "create", f"::{archive}{b.suffix()}", str(b.ds.root)], _borg_env(b)))
    grown = du(b.dir / "borg-repo")[0] - before
    return Result(seconds, f"repo +{mb(grown)}",
                  growth=(grown, b.ds.changed_bytes) if growth else None)


@step("borg_1pct", requires=("borg_first",), ref="rsync_1pct")
def borg_1pct(b: Bench) -> Result:
    """borg create after the 1% change (cold cache)."""
    return _borg_incremental(b, GEN_B, "cold", "second", growth=True)


@step("borg_1pct_warm", requires=("borg_first",), ref="rsync_1pct_warm")
def borg_1pct_warm(b: Bench) -> Result:
    """borg create after the 1% change (warm cache)."""
    return _borg_incremental(b, GEN_B_WARM, "warm", "third", growth=False)


# -- dwsd ---------------------------------------------------------------------------------
#
# In-process through the workspace API, one Workspace kept open across the steps (as the
# daemon does); only `snapshot()` is timed, split into phases by the timers of
# `harness.PHASES`.



def _snapshot(b: Bench, name: str, **kwargs: Any) -> tuple[float, Any, dict[str, float]]:
    ws = b.workspace()
    with b.profiled(name):
        b.phases.clear()
        with b.timing() as took:
            res = ws.snapshot(**kwargs)
    return took[0], res, dict(b.phases)


def _facts(res: Any, phases: dict[str, float]) -> dict[str, Any]:
    c = res.counters
    rec = res.record
    return {"created": res.created, "hash": rec.hash if rec else None,
            "objects_written": res.objects_written, "bytes_written": res.bytes_written,
            "files_opened": c.files_opened, "bytes_read": c.bytes_read, "lstats": c.lstats,
            "dirs_listed": c.dirs_listed,
            "changed_files": rec.counts.changed_files if rec else 0,
            "unreadable": len(res.unreadable), "unstable": len(res.unstable),
            "phases_s": {k: round(v, 3) for k, v in phases.items()}}


def _phase_text(phases: dict[str, float]) -> str:
    if not phases:
        return ""
    shown = [f"{k} {v:.2f}" for k, v in phases.items() if v >= 0.05 or k == "capture"]
    return "; " + ", ".join(shown)


def _state_file(b: Bench) -> tuple[int, int] | None:
    try:
        st = os.stat(b.dwsd_dir / "store" / "state" / "data.state")
        return st.st_ino, st.st_size
    except FileNotFoundError:
        return None


@step("dwsd_first", ref="cp_first", limit=1.3)
def dwsd_first(b: Bench) -> Result:
    """dwsd first snapshot into a new store (full walk; cold cache)."""
    b.close_workspace()
    b.fresh(b.dwsd_dir / "store")
    t0 = time.perf_counter()
    b.workspace()
    open_s = time.perf_counter() - t0
    b.prepare("cold")
    seconds, res, phases = _snapshot(b, "dwsd_first", tags=["bench-first"])
    facts = _facts(res, phases)
    size = du(b.dwsd_dir / "store")[0]
    return Result(seconds, f"{facts['objects_written']} objects, store {mb(size)}"
                  + _phase_text(phases), {**facts, "open_s": open_s, "store_bytes": size})


def _nochange(b: Bench, name: str, cache: str) -> Result:
    state_before = _state_file(b)
    store_before = du(b.dwsd_dir / "store")
    b.prepare(cache)
    seconds, res, phases = _snapshot(b, name, kind="periodic")
    facts = _facts(res, phases)
    rewrote_state = _state_file(b) != state_before
    store_after = du(b.dwsd_dir / "store")
    facts.update(state_file_rewritten=rewrote_state,
                 store_apparent_bytes_delta=store_after[1] - store_before[1])
    quiet = res.record is None and res.objects_written == 0
    detail = (f"opened {facts['files_opened']}, {res.objects_written} objects"
              + (", state rewritten" if rewrote_state else "") + _phase_text(phases))
    return Result(seconds, detail, facts, ok=quiet)


@step("dwsd_nochange", requires=("dwsd_first",), limit=0.5)
def dwsd_nochange(b: Bench) -> Result:
    """dwsd periodic checkpoint, nothing changed, full walk (warm cache, as a daemon runs)."""
    return _nochange(b, "dwsd_nochange", "warm")


@step("dwsd_nochange_cold", requires=("dwsd_first",))
def dwsd_nochange_cold(b: Bench) -> Result:
    """dwsd periodic checkpoint, nothing changed, full walk (cold cache; no target)."""
    return _nochange(b, "dwsd_nochange_cold", "cold")


def _store_du(b: Bench) -> tuple[int, int]:
    """du of the dwsd store, its tree database's write-ahead log checkpointed first: the
    log holds the newest trees until a checkpoint copies them into the database, and is
    cut back to 4 MiB after one (treedb._WAL_LIMIT), so a plain du counts those trees
    twice, or 4 MiB of log at once, depending on when the last checkpoint ran."""
    store = b.dwsd_dir / "store"
    b.workspace().store.objects.trees.wait_checkpointed()  # it would hold the lock
    with contextlib.closing(sqlite3.connect(store / "objects" / "trees.db")) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return du(store)


def _incremental(b: Bench, name: str, gen: int, cache: str, dirty: bool, growth: bool
                 ) -> Result:
    before = _store_du(b)
    kwargs: dict[str, Any] = {"tags": [f"bench-{name.replace('_', '-')}{b.suffix()}"]}
    if dirty:
        kwargs["dirty"] = {"data": b.ds.dirty_paths()}
    out: list[Any] = []

    def run() -> tuple[float, str]:
        seconds, res, phases = _snapshot(b, name, **kwargs)
        out.extend([res, phases])
        return seconds, ""
    seconds, _ = _changed(b, gen, cache, run)
    res, phases = out
    after = _store_du(b)
    grown = after[0] - before[0]
    facts = _facts(res, phases)
    facts["store_growth_apparent"] = after[1] - before[1]
    detail = (f"opened {facts['files_opened']}/{len(b.ds.changed)}, "
              f"{facts['objects_written']} objects, +{mb(grown)} "
              f"(apparent +{mb(facts['store_growth_apparent'])})" + _phase_text(phases))
    return Result(seconds, detail, facts,
                  growth=(grown, b.ds.changed_bytes) if growth else None,
                  ok=facts["files_opened"] == len(b.ds.changed))


@step("dwsd_1pct_full", requires=("dwsd_first",), ref="rsync_1pct", limit=1.0,
      growth_limit=1.1)
def dwsd_1pct_full(b: Bench) -> Result:
    """dwsd snapshot after the 1% change, full walk (cold cache)."""
    return _incremental(b, "dwsd_1pct_full", GEN_B, "cold", dirty=False, growth=True)


@step("dwsd_1pct_full_warm", requires=("dwsd_first",), ref="rsync_1pct_warm", limit=1.0)
def dwsd_1pct_full_warm(b: Bench) -> Result:
    """dwsd snapshot after the 1% change, full walk (warm cache)."""
    return _incremental(b, "dwsd_1pct_full_warm", GEN_B_WARM, "warm", dirty=False,
                        growth=False)


@step("dwsd_1pct_dirty", requires=("dwsd_first",), ref="restic_1pct", limit=0.1,
      growth_limit=1.1)
def dwsd_1pct_dirty(b: Bench) -> Result:
    """dwsd snapshot after a 1% change, dirty paths = the changed files (cold cache)."""
    return _incremental(b, "dwsd_1pct_dirty", GEN_C, "cold", dirty=True, growth=True)


@step("dwsd_1pct_dirty_warm", requires=("dwsd_first",), ref="restic_1pct_warm", limit=0.1)
def dwsd_1pct_dirty_warm(b: Bench) -> Result:
    """dwsd snapshot after a 1% change, dirty paths = the changed files (warm cache)."""
    return _incremental(b, "dwsd_1pct_dirty_warm", GEN_C_WARM, "warm", dirty=True,
                        growth=False)

