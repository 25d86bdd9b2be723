"""Issue 5's figures: the running daemon (idle CPU and RSS, write-to-visible delay,
checkpoint cost, manual snapshot cost against tree size).

Every step runs a real `dwsd --config FILE` process (view mounted, its own store, socket
and config under the bench directory, never the in-process workspace's store) and drives
it with the real `dwsctl`. A step starts its daemon, waits until the start-up reconcile
walk (the first snapshot, in a new store) has settled, measures, then stops it with
SIGTERM (exit code 0 expected), unmounts and puts the data set back at version A.

    daemon/                  the bench data set's daemon: config, store, view, socket, log
    daemon-tiny-10k/ ...     a daemon per generated tiny-file tree (tiny-10k/, tiny-100k/)

DWSD_BENCH_IDLE_S shortens the idle period while developing (default 60 s).

The daemon's own CPU is not "foreign": the timed blocks subtract it from the foreign CPU
the harness counts, so a step is flagged noisy only for other processes' work.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataset import GEN_A
from harness import Bench, Result, step

from dwsd.control.client import ControlClient

BIN = Path(sys.executable).parent  # the .venv the bench runs in: dwsd and dwsctl
IDLE_S = float(os.environ.get("DWSD_BENCH_IDLE_S", "60"))
QUIET_S = 2.0  # the daemon's `checkpoint.quiet` in the write-to-visible steps
EDITS = 10  # files edited before each manual snapshot
MANUAL_ROUNDS = 5  # manual snapshots per tree; the median is reported
FIRST_GEN = 100  # generations the daemon steps apply: above any the other steps use
START_TIMEOUT = 120.0
SETTLE_TIMEOUT = 1800.0  # the first snapshot of a large tree takes a while
POLL_S = 0.01  # how often the view's `latest` link is read while waiting for a checkpoint


# -- a dwsd process -------------------------------------------------------------------------

@dataclass
class DaemonDir:
    """Where one daemon keeps its config, store, view, socket and log."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def mount(self) -> Path:
        return self.root / "view"

    @property
    def socket(self) -> Path:
        return self.root / "dwsd.sock"

    @property
    def log(self) -> Path:
        return self.root / "dwsd.log"

    def write_config(self, resource: Path, checkpoint: dict[str, str]) -> None:
        """A config watching `resource` (as `data`) with these checkpoint thresholds."""
        self.root.mkdir(parents=True, exist_ok=True)
        lines = ["workspace: bench-daemon",
                 f"store: {json.dumps(str(self.store))}",
                 f"mount: {json.dumps(str(self.mount))}",
                 f"socket: {json.dumps(str(self.socket))}",
                 "resources:",
                 "  - name: data",
                 f"    path: {json.dumps(str(resource))}",
                 "    role: source-data",
                 "checkpoint:",
                 *(f"  {key}: {value}" for key, value in checkpoint.items())]
        self.config.write_text("\n".join(lines) + "\n")


class DaemonProcess:
    """A `dwsd --config` child process; its stderr is kept (and copied to the log file)."""

    def __init__(self, where: DaemonDir) -> None:
        self.where = where
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._ended = False
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        """Start the daemon and wait for its "dwsd ready" line (raises if it exits)."""
        unmount(self.where.mount)  # a dead mount of an earlier, killed run
        self.where.mount.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(BIN / "dwsd"), "--config", str(self.where.config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self.wait_for_line("dwsd ready", START_TIMEOUT)

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with open(self.where.log, "a") as copy:
            for line in self.proc.stderr:
                copy.write(line)
                copy.flush()
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def wait_for_line(self, text: str, timeout: float) -> None:
        def found() -> bool:
            return any(text in line for line in self.lines)
        with self._cond:
            self._cond.wait_for(lambda: found() or self._ended, timeout)
            if not found():
                raise RuntimeError(f"dwsd: no {text!r} within {timeout:.0f} s; log:\n"
                                   + "".join(self.lines[-20:]))

    def problems(self) -> list[str]:
        """The WARNING and ERROR lines logged so far."""
        return [line.strip() for line in self.lines
                if " WARNING " in line or " ERROR " in line or "Traceback" in line]

    def stop(self) -> int:
        """SIGTERM, wait, return the exit code (killed after START_TIMEOUT: -9)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
        return self.proc.returncode

    # -- what /proc says about it -----------------------------------------------------------

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (every thread), in seconds."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state): utime and stime are fields 14 and 15.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory_mb(self) -> dict[str, float]:
        """VmRSS (now) and VmHWM (peak since start) in MB."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024 / 1e6
        return out

    def wait_cpu_quiet(self, window: float = 0.5, max_cpu: float = 0.02,
                       timeout: float = 30.0) -> None:
        """Wait until the daemon used under `max_cpu` CPU-s in a `window` (its last
        prune, gc or view reload is over)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = self.cpu_seconds()
            time.sleep(window)
            if self.cpu_seconds() - before < max_cpu:
                return


def unmount(mount: Path) -> None:
    """Lazily unmount whatever is at `mount` (nothing there is fine)."""
    if mount.exists() or os.path.lexists(mount):
        subprocess.run(["fusermount3", "-u", "-z", str(mount)], capture_output=True,
                       check=False)


def dwsctl(d: DaemonProcess, *args: str) -> tuple[float, Any]:
    """Run `dwsctl --socket S --json ARGS`; return (wall seconds, parsed output)."""
    argv = [str(BIN / "dwsctl"), "--socket", str(d.where.socket), "--json", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=SETTLE_TIMEOUT,
                          check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"dwsctl {' '.join(args)} exited {proc.returncode}: "
                           f"{proc.stderr.strip()[-1000:]}")
    return seconds, json.loads(proc.stdout)


def wait_settled(d: DaemonProcess) -> dict[str, Any]:
    """Wait until the start-up reconcile walk is recorded and nothing is pending or
    queued, then until the daemon's CPU is quiet; return its status."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        status: dict[str, Any] = dwsctl(d, "status")[1]
        pending = any(r["dirty_paths"] or r["needs_full"]
                      for r in status["resources"].values())
        if status["reconciles"] >= 1 and status["latest"] and not pending \
                and status["queue"] == 0:
            d.wait_cpu_quiet()
            return status
        time.sleep(0.2)
    raise RuntimeError(f"dwsd did not settle within {SETTLE_TIMEOUT:.0f} s")


@contextlib.contextmanager
def running_daemon(b: Bench, where: DaemonDir, name: str) -> Iterator[DaemonProcess]:
    """A started daemon; afterwards SIGTERM, and its exit code must be 0. Warnings it
    logged become notes. Always unmounts."""
    d = DaemonProcess(where)
    code = 0
    try:
        d.start()
        yield d
    finally:
        code = d.stop()
        unmount(where.mount)
        for line in d.problems()[:5]:
            b.notes.append(f"{name}: dwsd logged: {line[:200]}")
        if code != 0:
            b.notes.append(f"{name}: dwsd exited {code} after SIGTERM")
    if code != 0:
        raise RuntimeError(f"dwsd exited {code} after SIGTERM (log: {where.log})")


@contextlib.contextmanager
def daemon_timing(b: Bench, d: DaemonProcess) -> Iterator[list[float]]:
    """`b.timing()`, except that the daemon's own CPU is not counted as foreign (it is a
    child the harness cannot see until it is reaped)."""
    foreign_before = b.foreign_cpu
    cpu_before = d.cpu_seconds()
    with b.timing() as took:
        yield took
    own = d.cpu_seconds() - cpu_before
    b.foreign_cpu = max(foreign_before, b.foreign_cpu - own)


# -- the bench data set under a daemon --------------------------------------------------------

def dataset_daemon(b: Bench) -> DaemonDir:
    """The daemon on the bench data set: checkpoint as soon as one change is `quiet`."""
    where = DaemonDir(b.dir / "daemon")
    where.write_config(b.ds.root, {"interval": "1h", "changes": "1",
                                   "quiet": f"{QUIET_S:g}s", "reconcile": "1h"})
    return where


def next_generation(where: DaemonDir) -> int:
    """A generation this daemon's store has never seen: a periodic checkpoint whose
    content equals an earlier snapshot is not recorded, so it would never show up."""
    counter = where.root / "generation"
    try:
        gen = int(counter.read_text()) + 1
    except (FileNotFoundError, ValueError):
        gen = FIRST_GEN
    counter.write_text(f"{gen}\n")
    return gen


@step("daemon_idle_cpu", unit="CPU-s", limit=1.0)
def daemon_idle_cpu(b: Bench) -> Result:
    """dwsd idle with the view mounted: CPU seconds used in the idle period (60 s)."""
    where = dataset_daemon(b)
    b.fresh(where.store)  # the idle period follows the first snapshot of a new store
    with running_daemon(b, where, "daemon_idle_cpu") as d:
        t0 = time.perf_counter()
        status = wait_settled(d)
        first_s = time.perf_counter() - t0
        touch_view(where.mount)
        d.wait_cpu_quiet()
        cpu, rss = idle(b, d)
        _, after = dwsctl(d, "status")
    new_snapshots = after["snapshots"] - status["snapshots"]
    extra = {"idle_s": IDLE_S, "cpu_s": round(cpu, 3), **rss,
             "first_snapshot_s": round(first_s, 2), "new_snapshots": new_snapshots}
    return Result(IDLE_S, f"first snapshot settled in {first_s:.1f} s; "
                  f"{new_snapshots} snapshots while idle", extra, ok=new_snapshots == 0,
                  value=cpu)


def touch_view(mount: Path) -> None:
    """List the view's root and the latest snapshot's top directory, as a user would."""
    os.listdir(mount)
    os.listdir(mount / "latest" / "data")


def idle(b: Bench, d: DaemonProcess) -> tuple[float, dict[str, float]]:
    """Leave the daemon alone for IDLE_S seconds (reading only /proc); return its CPU
    seconds and its memory: the largest VmRSS sampled, VmRSS at the end and VmHWM."""
    rss_max = 0.0
    cpu_before = d.cpu_seconds()
    with daemon_timing(b, d):
        end = time.monotonic() + IDLE_S
        while (left := end - time.monotonic()) > 0:
            rss_max = max(rss_max, d.memory_mb()["VmRSS"])
            time.sleep(min(1.0, left))
    cpu = d.cpu_seconds() - cpu_before
    memory = d.memory_mb()
    return cpu, {"rss_max_mb": round(max(rss_max, memory["VmRSS"]), 1),
                 "rss_end_mb": round(memory["VmRSS"], 1),
                 "hwm_mb": round(memory["VmHWM"], 1)}


@step("daemon_idle_rss", requires=("daemon_idle_cpu",), unit="MB", limit=100)
def daemon_idle_rss(b: Bench) -> Result:
    """dwsd idle with the view mounted: largest RSS in the idle period (same run)."""
    idle_run = b.results.get("daemon_idle_cpu")
    if idle_run is None or idle_run.error is not None:
        raise RuntimeError("daemon_idle_cpu did not measure the idle period")
    x = idle_run.extra
    return Result(None, f"VmRSS at the end {x['rss_end_mb']:.1f} MB; peak since start "
                  f"(VmHWM, the first snapshot included) {x['hwm_mb']:.1f} MB",
                  {k: x[k] for k in ("rss_max_mb", "rss_end_mb", "hwm_mb")},
                  value=x["rss_max_mb"])


@dataclass
class ChangeTiming:
    """One 1% change under the daemon, timed from its last write (`ds.apply` returned)."""

    generation: int
    apply_s: float  # writing the change
    visible_s: float  # last write -> the view's `latest` shows a snapshot holding it
    last_write_time: float  # wall clock (the daemon's records use it too)
    earlier_snapshots: int  # checkpoints taken before the change was complete
    record: dict[str, Any] = field(default_factory=dict)  # `dwsctl show latest`
    counters: dict[str, int] = field(default_factory=dict)  # `status` last_counters
    first_change: dict[str, Any] = field(default_factory=dict)  # the untimed one before

    @property
    def committed_s(self) -> float:
        """Last write -> the snapshot record's time (taken once its objects are
        durable, just before the catalog commit)."""
        return epoch(self.record["time"]) - self.last_write_time

    @property
    def checkpoint_s(self) -> float:
        """The checkpoint, from its trigger (`quiet` after the last write) until visible.
        An upper bound: the daemon sees the last write a little after it returned."""
        return self.visible_s - QUIET_S


def change_under_daemon(b: Bench, name: str) -> ChangeTiming:
    """Start the daemon on the data set; apply a first 1% change (untimed), then a
    second one, timed until the view shows it; stop the daemon and put version A back.

    Why the untimed one: each step ends by putting version A back, content an older
    snapshot already holds. The daemon does not record such a periodic checkpoint, so
    its capture state is no longer the latest snapshot's and its next checkpoint walks
    the whole tree. The second change shows the steady state; the first one's counters
    are kept (and noted when it walked everything)."""
    where = dataset_daemon(b)
    try:
        with running_daemon(b, where, name) as d:
            wait_settled(d)
            touch_view(where.mount)
            first = measured_change(b, d, where, timed=False)
            timing = measured_change(b, d, where, timed=True)
    finally:
        b.ds.apply(GEN_A)
    timing.first_change = change_facts(first)
    if first.counters.get("lstats", 0) >= len(b.ds.files):
        b.notes.append(f"{name}: the first checkpoint after start walked the whole tree "
                       f"({first.counters['lstats']} lstats, visible after "
                       f"{first.visible_s:.2f} s): its capture state was not the latest "
                       "snapshot's")
    return timing


def measured_change(b: Bench, d: DaemonProcess, where: DaemonDir, timed: bool
                    ) -> ChangeTiming:
    """One new 1% change, once the daemon is quiet; with the record and counters of the
    checkpoint that holds it."""
    d.wait_cpu_quiet()
    timing = time_change(b, d, next_generation(where), timed)
    _, timing.record = dwsctl(d, "show", "latest")
    _, status = dwsctl(d, "status")
    timing.counters = status["last_counters"] or {}
    return timing


def time_change(b: Bench, d: DaemonProcess, gen: int, timed: bool) -> ChangeTiming:
    """Apply generation `gen` and poll the view until `latest` holds the last changed
    file's new content (record and counters are left empty). Only a `timed` change
    counts other processes' CPU for the step."""
    latest = d.where.mount / "latest"
    probe = b.ds.changed[-1].rel  # written last by `apply`
    seen = os.readlink(latest)
    earlier = 0
    with daemon_timing(b, d) if timed else contextlib.nullcontext():
        t0 = time.perf_counter()
        b.ds.apply(gen)
        last_write, wall_last_write = time.perf_counter(), time.time()
        deadline = last_write + QUIET_S + 120
        while time.perf_counter() < deadline:
            target = os.readlink(latest)
            if target != seen:
                if view_holds(latest / "data" / probe, b.ds.root / probe):
                    break
                seen, earlier = target, earlier + 1  # the writes paused for `quiet`
            time.sleep(POLL_S)
        else:
            raise RuntimeError(f"the change did not show in {latest} within "
                               f"{QUIET_S + 120:.0f} s")
        visible = time.perf_counter()
    return ChangeTiming(gen, last_write - t0, visible - last_write, wall_last_write,
                        earlier)


def view_holds(in_view: Path, live: Path) -> bool:
    return in_view.read_bytes() == live.read_bytes()


def epoch(iso: str) -> float:
    """Seconds since the epoch of a record's ISO 8601 UTC time."""
    return dt.datetime.fromisoformat(iso).timestamp()


def change_facts(t: ChangeTiming) -> dict[str, Any]:
    counts = t.record.get("counts", {})
    return {"generation": t.generation, "apply_s": round(t.apply_s, 3),
            "visible_s": round(t.visible_s, 3), "committed_s": round(t.committed_s, 3),
            "checkpoint_s": round(t.checkpoint_s, 3), "quiet_s": QUIET_S,
            "earlier_snapshots": t.earlier_snapshots, "snapshot": t.record.get("id"),
            "changed_files": counts.get("changed_files"), **t.counters,
            **({"first_change": t.first_change} if t.first_change else {})}


@step("daemon_visible", limit=QUIET_S + 1)
def daemon_visible(b: Bench) -> Result:
    """dwsd: last write of a 1% change -> checkpoint visible in the view (quiet 2 s)."""
    t = change_under_daemon(b, "daemon_visible")
    return Result(t.visible_s, f"committed at +{t.committed_s:.2f} s; "
                  f"{t.earlier_snapshots} earlier checkpoints", change_facts(t),
                  ok=t.earlier_snapshots == 0)


@step("daemon_checkpoint", ref="restic_1pct", limit=0.1)
def daemon_checkpoint(b: Bench) -> Result:
    """dwsd checkpoint of a 1% change, trigger (quiet over) -> visible in the view.

    The changed files were just written, so they are in the page cache (restic_1pct's
    are not): that is what a daemon sees. OK when it opened exactly the changed files
    and did not walk the tree."""
    t = change_under_daemon(b, "daemon_checkpoint")
    opened, lstats = t.counters.get("files_opened"), t.counters.get("lstats", 0)
    return Result(t.checkpoint_s, f"opened {opened}/{len(b.ds.changed)}, {lstats} "
                  f"lstats; recorded at +{t.committed_s - QUIET_S:.2f} s",
                  change_facts(t),
                  ok=opened == len(b.ds.changed) and lstats < len(b.ds.files))


# -- manual snapshots on tiny-file trees of two sizes ---------------------------------------

@dataclass(frozen=True)
class TinyTree:
    """`files` tiny files, 100 to a directory (d000/e0/t000000.txt ...), under `root`;
    generated once, reused while its marker matches."""

    root: Path
    files: int
    PER_DIR = 100

    @property
    def marker(self) -> Path:
        return self.root.parent / f"{self.root.name}.json"

    def path(self, i: int) -> Path:
        leaf = i // self.PER_DIR
        return self.root / f"d{leaf // 10:03d}" / f"e{leaf % 10}" / f"t{i:06d}.txt"

    def ensure(self) -> None:
        text = json.dumps({"format": 1, "files": self.files})
        if self.marker.exists() and self.marker.read_text() == text:
            return
        if self.root.exists():
            shutil.rmtree(self.root)
        for i in range(self.files):
            p = self.path(i)
            if i % self.PER_DIR == 0:
                p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(f"tiny file {i}\n".encode())
        os.sync()
        self.marker.write_text(text)

    def edit(self, count: int, stamp: str) -> None:
        """Rewrite `count` files spread over the tree with content never seen before."""
        for k in range(count):
            p = self.path(k * self.files // count)
            p.write_bytes(f"edited {stamp}\n".encode())


def manual_after_edits(b: Bench, files: int, label: str) -> Result:
    """Run a daemon on a TinyTree of `files` files (no periodic checkpoints); in each of
    MANUAL_ROUNDS rounds, edit EDITS files and time a snapshot request (what `dwsctl
    snapshot` sends) on one open control connection. Each round also times a status
    request on it, the cost of a round trip; the figure is the median snapshot time
    minus the median status time: the daemon's own work. (Timed through `dwsctl`, the
    start of its process, 0.1-0.15 s and noisy, buried the daemon's 5-40 ms: once the
    10,000-file figure came out below zero.) The trees are the same with `--small`;
    their manual snapshots are kept (5 a run)."""
    tree = TinyTree(b.dir / f"tiny-{label}", files)
    tree.ensure()
    where = DaemonDir(b.dir / f"daemon-tiny-{label}")
    where.write_config(tree.root, {"interval": "1d", "changes": "1000000000",
                                   "quiet": "1d", "reconcile": "1d"})
    snaps, baselines, results = [], [], []
    with running_daemon(b, where, f"daemon_manual_{label}") as d:
        wait_settled(d)
        with daemon_timing(b, d), ControlClient(where.socket, SETTLE_TIMEOUT) as client:
            client.call("status")  # connected before the first timed request
            for r in range(MANUAL_ROUNDS):
                baselines.append(timed_call(client, "status")[0])
                tree.edit(EDITS, f"{time.time_ns()} {r}")
                seconds, out = timed_call(client, "snapshot", {
                    "tags": [], "message": f"bench: {EDITS} edits", "full": False})
                snaps.append(seconds)
                results.append(out)
    return manual_result(snaps, baselines, results)


def timed_call(client: ControlClient, op: str, args: dict[str, Any] | None = None
               ) -> tuple[float, Any]:
    """(wall seconds, result) of one request on an open control connection."""
    t0 = time.perf_counter()
    result = client.call(op, args)
    return time.perf_counter() - t0, result


def manual_result(snaps: list[float], baselines: list[float], results: list[Any]
                  ) -> Result:
    daemon_s = max(statistics.median(snaps) - statistics.median(baselines), 0.001)
    changed = [r["snapshot"]["counts"]["changed_files"] for r in results]
    counters = results[-1]["counters"]
    complete = all(c == EDITS for c in changed) and \
        all(r["counters"]["files_opened"] == EDITS for r in results)
    detail = (f"snapshot request {statistics.median(snaps) * 1e3:.1f} ms - status "
              f"request {statistics.median(baselines) * 1e3:.1f} ms; changed {changed}; "
              f"{counters['lstats']} lstats, {counters['dirs_listed']} dirs listed")
    extra = {"snapshot_wall_s": [round(s, 4) for s in snaps],
             "status_wall_s": [round(s, 4) for s in baselines],
             "changed_files": changed, "last_counters": counters,
             "files": results[-1]["snapshot"]["counts"]["files"]}
    return Result(daemon_s, detail, extra, ok=complete)


@step("daemon_manual_10k")
def daemon_manual_10k(b: Bench) -> Result:
    """Snapshot request after 10 edits in a 10,000-file tree (minus a round trip)."""
    return manual_after_edits(b, 10_000, "10k")


@step("daemon_manual_100k", ref="daemon_manual_10k", limit=1.5)
def daemon_manual_100k(b: Bench) -> Result:
    """Snapshot request after 10 edits in a 100,000-file tree (minus a round trip).

    Target <= 1.5x the 10,000-file tree ("about as long"): with the watcher's dirty
    paths a snapshot examines the 10 edited files and their directories only, so what
    may grow with the tree is at most a small constant's worth (catalog, durability,
    noise); anything O(files) per snapshot shows up as a ratio near 10."""
    return manual_after_edits(b, 100_000, "100k")
