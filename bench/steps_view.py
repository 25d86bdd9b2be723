"""Issue 4's figures: the FUSE view (root listing, metadata walk, cold and warm reads, RSS)
beside restic mount and borg mount.

Every view step mounts its own view and always unmounts it (`fusermount3 -u -z`; the
serving process then ends, or is terminated), so each starts from a fresh server:

    dwsd    `dwsd mount --config <dwsd>/view.yaml`   <mnt>/bench-first/data/...
    restic  `restic mount <mnt>`                     <mnt>/ids/<first>/<data set path>/...
    borg    `borg mount -f ::first <mnt>`            <mnt>/<data set path>/...

(borg 1.2 needs llfuse for `mount`: Debian's python3-llfuse.) The same functions walk
and read the source and every view: a single-threaded `scandir` + `lstat` walk, and
sequential 1 MiB reads of the data set's files in path order. "Cold" means the page
cache, dentries and inodes were dropped after the view was mounted (before the server
started, for the root listing). The serving process's CPU time is not counted as foreign
CPU (it is ours, but `ForeignCpu` only knows children that were waited for).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from harness import Bench, Result, step
from steps_snapshot import _borg_env, _restic_env

READ_SIZE = 1 << 20
# The warm step's value is the median of this many re-reads. The first re-read after a
# cold read also pays the kernel for moving every page to its active list (3.2-5.0 GB/s
# against 5.6-7.2 for the next ones, on the source's ext4 as on the view), and this
# machine's DAMON pageout scheme (/sys/kernel/mm/damon/admin/kdamonds/0) takes pages of
# a file read seconds ago back (24-770 of its 65,536 within 30 s, counted with
# mincore), each then a FUSE READ again. One 70 ms sample swung the figure by a fifth.
WARM_REREADS = 5
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.002
MB = 1e6  # as harness.mb()


# -- walking and reading (the same for the source and every view) ------------------------

def walk(top: Path) -> int:
    """`scandir` every directory under `top` and `lstat` every entry; return the number
    of entries (directories included, `top` not)."""
    entries = 0
    pending = [str(top)]
    while pending:
        with os.scandir(pending.pop()) as listing:
            for entry in listing:
                os.lstat(entry.path)
                entries += 1
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return entries


def read_file(path: Path, buf: bytearray) -> int:
    """Read `path` to its end into `buf` (reused); return the bytes read."""
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def read_all(top: Path, rels: list[str]) -> int:
    """Read every file `rels` (relative to `top`) in order; return the bytes read."""
    buf = bytearray(READ_SIZE)
    return sum(read_file(top / rel, buf) for rel in rels)


def expected_entries(b: Bench) -> int:
    """What a walk of the data set (or of a snapshot of it) must count."""
    dirs = {str(p) for f in b.ds.files for p in PurePosixPath(f.rel).parents}
    dirs.discard(".")
    return len(b.ds.files) + len(dirs)


def file_order(b: Bench) -> list[str]:
    """The data set's files in path order, as `cp -r` or `tar` would read them."""
    return sorted(f.rel for f in b.ds.files)


def big_file(b: Bench) -> tuple[str, int]:
    """The data set's first largest file (256 MB; 25.6 MB with --small) and its size."""
    spec = max(b.ds.files, key=lambda f: f.size)  # max() keeps the first of equals
    return spec.rel, spec.size


# -- serving processes --------------------------------------------------------------------

@dataclass
class Server:
    """A mounted view: its serving process, mount point, and where the data set's root
    is inside it. `mounted_s`/`listed_s`: from the process's start until the mount point
    was a mount point / its root was listed."""

    tool: str
    proc: subprocess.Popen[bytes]
    mountpoint: Path
    data: Path
    log: Path
    mounted_s: float = 0.0
    listed_s: float = 0.0
    root_names: int = 0

    def pids(self) -> list[int]:
        """The serving process and its children (dwsd's page-cache warmer): what the
        server costs is theirs together."""
        tasks = Path(f"/proc/{self.proc.pid}/task").iterdir()
        return [self.proc.pid, *(int(child) for task in tasks
                                 for child in (task / "children").read_text().split())]

    def cpu_s(self) -> float:
        """User + system CPU seconds the serving processes used so far (all threads)."""
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def memory(self) -> dict[str, int]:
        """VmHWM (peak) and VmRSS of the serving processes, summed, in bytes."""
        out = {"VmHWM": 0, "VmRSS": 0}
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in out:
                    out[key] += int(value.split()[0]) * 1024
        return out

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace").strip()[-2000:]
        except FileNotFoundError:
            return ""


ServerSpec = tuple[list[str], dict[str, str], Path]  # argv, extra env, data root in view


def dwsd_server(b: Bench, mnt: Path) -> ServerSpec:
    """`dwsd mount` on the bench store, with a config that is the bench's plus a mount.
    The view opens the store read-only: the bench's open Workspace (the writer) may stay."""
    text = b.dwsd_config().read_text()
    assert "mount: null\n" in text, "harness.dwsd_config() changed: update dwsd_server"
    config = b.dwsd_dir / "view.yaml"
    config.write_text(text.replace("mount: null\n", f"mount: {json.dumps(str(mnt))}\n"))
    dwsd = Path(sys.executable).parent / "dwsd"
    argv = [str(dwsd) if dwsd.exists() else "dwsd", "mount", "--config", str(config)]
    return argv, {}, mnt / "bench-first" / "data"


def restic_server(b: Bench, mnt: Path) -> ServerSpec:
    """`restic mount`, the data set under the first snapshot's ids/ directory (later
    steps add snapshots of other generations, so not `snapshots/latest`)."""
    _, out = b.run(["restic", "snapshots", "--json"], _restic_env(b), setup=True)
    first = min(json.loads(out), key=lambda snap: snap["time"])
    data = mnt / "ids" / first["short_id"] / b.ds.root.relative_to("/")
    return ["restic", "mount", str(mnt)], _restic_env(b), data


def borg_server(b: Bench, mnt: Path) -> ServerSpec:
    """`borg mount -f` (foreground: the process we started serves) of archive `first`."""
    return (["borg", "mount", "-f", "::first", str(mnt)], _borg_env(b),
            mnt / b.ds.root.relative_to("/"))


SERVERS: dict[str, Callable[[Bench, Path], ServerSpec]] = {
    "dwsd": dwsd_server, "restic": restic_server, "borg": borg_server}


def unmount(mnt: Path) -> None:
    """Lazily unmount `mnt` if something is mounted there."""
    if os.path.ismount(mnt):
        subprocess.run([shutil.which("fusermount3") or "fusermount3", "-u", "-z", str(mnt)],
                       capture_output=True)


@contextlib.contextmanager
def serving(b: Bench, tool: str, timed_start: bool = False) -> Iterator[Server]:
    """Start `tool`'s view server, wait until its root lists, yield it; always unmount
    and stop it afterwards. With `timed_start`, the start counts as measured time (other
    processes' CPU meanwhile is counted as foreign). Raises RuntimeError when the server
    exits or does not mount within START_TIMEOUT_S."""
    mnt = b.dir / "mnt" / tool
    unmount(mnt)  # a mount a killed run left behind
    mnt.mkdir(parents=True, exist_ok=True)
    argv, env, data = SERVERS[tool](b, mnt)
    log = b.dir / "mnt" / f"{tool}.log"
    proc = None
    try:
        with open(log, "wb") as out, b.timing(count=timed_start):
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, env={**os.environ, **env},
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
            server = Server(tool, proc, mnt, data, log)
            wait_listed(server, t0)
        if timed_start:
            not_foreign(b, server.cpu_s())
        yield server
    finally:
        unmount(mnt)
        if proc is not None:
            stop(proc)


def wait_listed(server: Server, t0: float) -> None:
    """Poll until the mount point is a mount point, then list its root; set the times
    (from `t0`, the process start) on `server`."""
    while not os.path.ismount(server.mountpoint):
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.tool} mount exited {server.proc.returncode}: "
                               f"{server.log_tail()}")
        if time.perf_counter() - t0 > START_TIMEOUT_S:
            raise RuntimeError(f"{server.tool} mount not mounted after {START_TIMEOUT_S:g} s"
                               f": {server.log_tail()}")
        time.sleep(POLL_S)
    server.mounted_s = time.perf_counter() - t0
    server.root_names = len(os.listdir(server.mountpoint))
    server.listed_s = time.perf_counter() - t0


def stop(proc: subprocess.Popen[bytes]) -> None:
    """After the unmount, let the serving process end by itself (all three do, and borg
    interrupted there leaves a stale repository lock); terminate it if it has not in
    STOP_TIMEOUT_S, kill it if that does not work either."""
    for end in (None, proc.terminate, proc.kill):
        if end is not None and proc.poll() is None:
            end()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            continue


def not_foreign(b: Bench, cpu_s: float) -> None:
    """Take the serving process's CPU seconds back out of the step's foreign CPU: it is
    ours, but not a child that was waited for, so `ForeignCpu` counts it as foreign."""
    b.foreign_cpu = max(0.0, b.foreign_cpu - cpu_s)


@contextlib.contextmanager
def timed(b: Bench, server: Server | None) -> Iterator[list[float]]:
    """`b.timing()`, with the serving process's CPU meanwhile not counted as foreign."""
    cpu0 = server.cpu_s() if server else 0.0
    with b.timing() as took:
        yield took
    if server:
        not_foreign(b, server.cpu_s() - cpu0)


# -- what each step measures --------------------------------------------------------------

def measure_root(b: Bench, tool: str) -> Result:
    """Timed: from starting the server (cold cache) until its root is listed. A second,
    untimed start right after (warm cache) is in the detail: the difference is the cost
    of loading the program from disk."""
    b.prepare("cold")
    with serving(b, tool, timed_start=True) as cold:
        pass
    with serving(b, tool) as warm:
        pass
    return Result(cold.listed_s, f"{cold.root_names} names; mounted after "
                  f"{cold.mounted_s:.3f} s; warm start listed after {warm.listed_s:.3f} s",
                  {"mounted_s": cold.mounted_s, "root_names": cold.root_names,
                   "warm_listed_s": warm.listed_s})


def measure_walk(b: Bench, top: Path, server: Server | None) -> Result:
    """Timed: a cold `scandir` + `lstat` walk of `top`; ok when it counts every entry."""
    b.prepare("cold")
    with timed(b, server) as took:
        entries = walk(top)
    want = expected_entries(b)
    return Result(took[0], f"{entries} entries" + ("" if entries == want else
                                                    f" (want {want})"),
                  {"entries": entries}, ok=entries == want)


def measure_read(b: Bench, top: Path, server: Server | None) -> Result:
    """Timed: cold sequential reads of every file under `top` (1 MiB reads, path order);
    ok when every byte came back."""
    b.prepare("cold")
    with timed(b, server) as took:
        got = read_all(top, file_order(b))
    want = b.ds.total_bytes
    return Result(took[0], f"{got / MB / took[0]:.0f} MB/s, {len(b.ds.files)} files",
                  {"bytes": got, "mb_s": got / MB / took[0]}, ok=got == want)


def measure_big(b: Bench, top: Path, server: Server | None, warm: bool) -> Result:
    """Timed: reading the largest file once, cold, or (`warm`) re-reading it
    WARM_REREADS times after an untimed read; value = MB/s (the median re-read's). The
    open is timed apart too (dwsd hashes a blob on its first open)."""
    rel, size = big_file(b)
    buf = bytearray(READ_SIZE)
    b.prepare("cold")
    if warm:
        read_file(top / rel, buf)
    open_s = 0.0
    rates: list[float] = []
    sizes: list[int] = []
    with timed(b, server) as took:
        for _ in range(WARM_REREADS if warm else 1):
            t0 = time.perf_counter()
            with open(top / rel, "rb", buffering=0) as f:
                if not rates:
                    open_s = time.perf_counter() - t0
                got = 0
                while n := f.readinto(buf):
                    got += n
            rates.append(got / MB / (time.perf_counter() - t0))
            sizes.append(got)
    speed = statistics.median(rates)
    runs = f", runs {', '.join(f'{r:.0f}' for r in rates)} MB/s" if warm else ""
    return Result(took[0], f"{rel}, {got / MB:.1f} MB, open {open_s:.3f} s{runs}",
                  {"bytes": got, "open_s": open_s, "mb_s_runs": rates},
                  ok=set(sizes) == {size}, value=speed)


def measure_rss(b: Bench, tool: str) -> Result:
    """Untimed target: the serving processes' peak RSS (VmHWM, summed over the server and
    its children; value, MB) after a cold walk and a cold read of all files; seconds =
    the walk and read."""
    with serving(b, tool) as s:
        walk_r = measure_walk(b, s.data, s)
        read_r = measure_read(b, s.data, s)
        mem = s.memory()
    seconds = (walk_r.seconds or 0.0) + (read_r.seconds or 0.0)
    return Result(seconds, f"VmHWM {mem['VmHWM'] / MB:.1f} MB, VmRSS "
                  f"{mem['VmRSS'] / MB:.1f} MB after walk + read",
                  {"vm_hwm": mem["VmHWM"], "vm_rss": mem["VmRSS"]},
                  ok=bool(walk_r.ok and read_r.ok), value=mem["VmHWM"] / MB)


def in_view(b: Bench, tool: str, measure: Callable[[Bench, Path, Server], Result]
            ) -> Result:
    """Run `measure` on the data set inside a freshly mounted view of `tool`."""
    with serving(b, tool) as s:
        return measure(b, s.data, s)


# -- the source ---------------------------------------------------------------------------

@step("view_walk_source")
def view_walk_source(b: Bench) -> Result:
    """scandir+lstat walk of the data set itself (cold cache)."""
    return measure_walk(b, b.ds.root, None)


@step("view_read_source")
def view_read_source(b: Bench) -> Result:
    """read of every file of the data set itself, 1 MiB reads (cold cache)."""
    return measure_read(b, b.ds.root, None)


@step("view_big_source", unit="MB/s", higher=True)
def view_big_source(b: Bench) -> Result:
    """read of the largest file of the data set itself (cold cache; MB/s)."""
    return measure_big(b, b.ds.root, None, warm=False)


# -- the views: the same six steps for each tool ----------------------------------------

# tool -> (what it needs, how its snapshot is named, targets by metric: only dwsd has them)
VIEWS = {
    "dwsd": ("dwsd_first", "the first snapshot",
             {"root": 0.5, "walk": 1.5, "read": 0.5, "big": 700, "big_warm": 4000,
              "rss": 100}),
    "restic": ("restic_first", "the first snapshot", {}),
    "borg": ("borg_first", "archive first", {}),
}


def _register_views(tool: str, needs: str, snapshot: str, limits: dict[str, float]
                    ) -> None:
    """Register view_{root,walk,read,big,big_warm,rss}_<tool>."""
    def add(metric: str, doc: str, fn: Callable[[Bench], Result], **kw: Any) -> None:
        fn.__doc__ = f"{tool} view: {doc}"
        step(f"view_{metric}_{tool}", requires=(needs,), limit=limits.get(metric), **kw)(fn)

    def big(warm: bool) -> Callable[[Bench], Result]:
        return lambda b: in_view(b, tool, lambda b, top, s: measure_big(b, top, s, warm))
    add("root", "start to root listed (cold cache).", lambda b: measure_root(b, tool))
    add("walk", f"scandir+lstat walk of {snapshot} (cold cache).",
        lambda b: in_view(b, tool, measure_walk), ref="view_walk_source")
    add("read", f"read of every file of {snapshot} (cold cache; speed vs source).",
        lambda b: in_view(b, tool, measure_read), ref="view_read_source", higher=True)
    add("big", "read of the largest file (cold cache; MB/s).", big(False),
        unit="MB/s", higher=True)
    add("big_warm", "re-read of the largest file (page cache; MB/s).", big(True),
        unit="MB/s", higher=True)
    add("rss", "peak RSS after a walk and a read of all (MB).",
        lambda b: measure_rss(b, tool), unit="MB")


for _tool, (_needs, _snapshot, _limits) in VIEWS.items():
    _register_views(_tool, _needs, _snapshot, _limits)
