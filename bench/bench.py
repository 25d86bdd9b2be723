"""dwsd against cp, rsync, restic and borg on one reproducible data set, in one run.

    .venv/bin/python bench/bench.py [--dir /var/tmp/dwsd-bench] [--small] [--only STEP,...]
                                    [--repeat N] [--profile] [--list]

The data set (seeded; reused when its marker matches) is about 20,000 files of 1-64 KiB in
nested directories, 200 of 1-8 MiB and four of 256 MiB (`--small`: ten times fewer/smaller).
File content is a blake3 XOF stream keyed by the seed, the path and a *generation*: unique,
incompressible and fast to make. The "1% change" rewrites the same fixed selection of files
(1% of the small ones, 1% but at least 2 of the medium ones) in place, same sizes, with the
content of another generation, so every tool sees exactly the same change:

    GEN_A       0  version A, the data set as generated (every step starts and ends here)
    GEN_B       1  the change before each tool's cold incremental run (rsync, restic, borg,
                   dwsd full walk)
    GEN_C       2  dwsd's cold dirty-path run (new bytes, same files and sizes; B is
                   already in its store, so re-using it would store nothing)
    GEN_B_WARM  3  like B, for the warm runs (new bytes for every tool)
    GEN_C_WARM  4  like C, for dwsd's warm dirty-path run

Every step is a small function registered with `@step`, in run order; `--only` runs some
(their prerequisites are added). A step gets the `Bench` (paths, data set, helpers for the
page cache, commands, dwsd) and returns a `Result`. Targets (issue 2) are declared on the
step: a reference step and a ratio limit, or a limit in seconds; growth rows come from a
`Result.growth`. To add restore timings, a FUSE walk/read or daemon idle figures, write one
more function with `@step(...)` and, if it has a target, give it `ref=`/`limit=`.

Prints one table and writes it (plus every step's details) as JSON to bench/out/.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import blake3

DATASET_FORMAT = 2  # bump whenever the generated layout or content changes
DEFAULT_SEED = 20261122
HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "out"
KiB, MiB = 1 << 10, 1 << 20
CHUNK = 16 * MiB
GEN_A, GEN_B, GEN_C, GEN_B_WARM, GEN_C_WARM = 0, 1, 2, 3, 4
# Every written file gets mtime = MTIME_EPOCH + generation days + its index seconds, so each
# generation differs from every other by whole seconds (rsync's quick check compares
# seconds: a rewrite within the same second as the copy's version would go unnoticed).
MTIME_EPOCH = 1_767_225_600  # 2026-01-01T00:00:00Z


# -- the data set -------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    small: int
    medium: int
    large: int
    large_size: int
    fanout: tuple[int, int, int]  # directories per level under small/
    small_range: tuple[int, int] = (1 * KiB, 64 * KiB)
    medium_range: tuple[int, int] = (1 * MiB, 8 * MiB)


SHAPES = {
    "full": Shape(small=20_000, medium=200, large=4, large_size=256 * MiB, fanout=(10, 10, 10)),
    "small": Shape(small=2_000, medium=20, large=4, large_size=256 * MiB // 10,
                   fanout=(5, 5, 4)),
}


@dataclass(frozen=True)
class FileSpec:
    rel: str
    size: int
    index: int


class Dataset:
    """A seeded tree of files under `root`; `apply(gen)` puts the change set at `gen`."""

    def __init__(self, root: Path, variant: str, seed: int) -> None:
        self.root = root
        self.variant = variant
        self.seed = seed
        self.shape = SHAPES[variant]
        self.marker = root.parent / f"{root.name}.json"
        self._key = blake3.blake3(f"dwsd-bench {DATASET_FORMAT} {seed}".encode()).digest()
        self.files, self.changed = self._layout()

    def _layout(self) -> tuple[list[FileSpec], list[FileSpec]]:
        sh = self.shape
        rng = random.Random(self.seed)
        a, b, c = sh.fanout
        files = []
        for i in range(sh.small):
            # Nine in ten files sit in a leaf directory, the rest one level up.
            parts = [f"d{rng.randrange(a):02d}", f"e{rng.randrange(b):02d}"]
            if rng.random() < 0.9:
                parts.append(f"f{rng.randrange(c):02d}")
            size = rng.randint(*sh.small_range)
            files.append(FileSpec("/".join(["small", *parts, f"s{i:05d}.dat"]), size, i))
        small = list(files)
        medium = []
        for j in range(sh.medium):
            medium.append(FileSpec(f"medium/g{j % 10}/m{j:03d}.bin",
                                   rng.randint(*sh.medium_range), len(files) + j))
        files += medium
        files += [FileSpec(f"large/l{k}.bin", sh.large_size, len(files) + k)
                  for k in range(sh.large)]
        pick = random.Random(self.seed + 1)
        changed = (pick.sample(small, max(2, round(len(small) / 100)))
                   + pick.sample(medium, max(2, round(len(medium) / 100))))
        return files, sorted(changed, key=lambda f: f.rel)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def changed_bytes(self) -> int:
        return sum(f.size for f in self.changed)

    def describe(self) -> dict[str, Any]:
        return {"variant": self.variant, "seed": self.seed, "format": DATASET_FORMAT,
                "files": len(self.files), "bytes": self.total_bytes,
                "changed_files": len(self.changed), "changed_bytes": self.changed_bytes,
                "root": str(self.root)}

    def _marker_text(self) -> str:
        return json.dumps({k: v for k, v in self.describe().items() if k != "root"},
                          sort_keys=True)

    def chunks(self, spec: FileSpec, gen: int) -> Iterator[bytes]:
        h = blake3.blake3(f"{spec.rel}\0{gen}".encode(), key=self._key)
        for off in range(0, spec.size, CHUNK):
            yield h.digest(length=min(CHUNK, spec.size - off), seek=off)

    def _write(self, spec: FileSpec, gen: int) -> None:
        path = self.root / spec.rel
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            for chunk in self.chunks(spec, gen):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        mtime = (MTIME_EPOCH + gen * 86_400 + spec.index) * 1_000_000_000
        os.utime(path, ns=(mtime, mtime), follow_symlinks=False)

    def ensure(self) -> tuple[bool, float]:
        """Generate unless present with the same marker; put the change set at version A.
        Returns (generated, seconds)."""
        t0 = time.perf_counter()
        if self._present():
            self.apply(0)
            return False, time.perf_counter() - t0
        if self.root.exists():
            shutil.rmtree(self.root)
        self.marker.unlink(missing_ok=True)
        for d in sorted({str(Path(f.rel).parent) for f in self.files}):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            # Biggest first so the long ones do not end up last on one thread.
            order = sorted(self.files, key=lambda f: -f.size)
            list(pool.map(lambda f: self._write(f, 0), order, chunksize=64))
        os.sync()
        self.marker.write_text(self._marker_text())
        return True, time.perf_counter() - t0

    def _present(self) -> bool:
        try:
            if self.marker.read_text() != self._marker_text():
                return False
        except FileNotFoundError:
            return False
        count = sum(len(names) for _, _, names in os.walk(self.root))
        return count == len(self.files)

    def apply(self, gen: int) -> None:
        """Rewrite the change set in place with generation `gen` (0 = version A)."""
        for spec in self.changed:
            self._write(spec, gen)

    def dirty_paths(self) -> list[bytes]:
        return [f.rel.encode() for f in self.changed]


# -- results and the step registry --------------------------------------------------------

@dataclass
class Result:
    seconds: float | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    growth: tuple[int, int] | None = None  # (store bytes added, changed bytes)
    ok: bool | None = None  # an extra condition of the target ("writes nothing")
    error: str | None = None


@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[["Bench"], Result]
    doc: str
    requires: tuple[str, ...] = ()
    ref: str | None = None  # ratio = seconds / seconds of `ref`
    limit: float | None = None  # on the ratio (when `ref`) or on seconds
    growth_limit: float | None = None


STEPS: dict[str, Step] = {}


def step(name: str, *, requires: tuple[str, ...] = (), ref: str | None = None,
         limit: float | None = None, growth_limit: float | None = None
         ) -> Callable[[Callable[["Bench"], Result]], Callable[["Bench"], Result]]:
    def register(fn: Callable[["Bench"], Result]) -> Callable[["Bench"], Result]:
        STEPS[name] = Step(name, fn, (fn.__doc__ or "").strip().splitlines()[0], requires,
                           ref, limit, growth_limit)
        return fn
    return register


# -- the context steps share --------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, ds: Dataset) -> None:
        self.args = args
        self.dir: Path = args.dir
        self.ds = ds
        self.results: dict[str, Result] = {}
        self.notes: list[str] = []
        self._can_drop: bool | None = None
        self._ws: Any = None
        self.phases: dict[str, float] = {}
        self.rep = 0  # which repetition of the current step (--repeat)
        self.foreign_cpu = 0.0  # other processes' CPU seconds during this step's timed parts
        self._timers_installed = False

    # page cache
    def prepare(self, cache: str) -> None:
        """Before a timed run: "cold" = sync and drop the page cache, dentries and inodes
        (noted when not permitted); "warm" = sync and lstat every entry of the data set."""
        os.sync()
        if cache == "warm":
            self.prime()
            return
        assert cache == "cold", cache
        if self._can_drop is False:
            return
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            self._can_drop = True
        except OSError as exc:
            self._can_drop = False
            self.notes.append(f"page cache NOT dropped ({exc.strerror}): cold steps ran warm")

    def gen(self, gen: int) -> int:
        """The generation to apply in this repetition: each one must bring new bytes."""
        return gen if gen == GEN_A else gen + 10 * self.rep

    def suffix(self) -> str:
        """Appended to tags and archive names, which must be unique across repetitions."""
        return f"-{self.rep}" if self.rep else ""

    def prime(self) -> None:
        for d, dirs, files in os.walk(self.ds.root):
            for name in dirs + files:
                os.lstat(os.path.join(d, name))

    # commands
    @contextlib.contextmanager
    def timing(self, count: bool = True) -> Iterator[list[float]]:
        """Time the block: yields a list that holds its seconds afterwards; with `count`,
        other processes' CPU use meanwhile is added to `foreign_cpu`."""
        out: list[float] = []
        foreign = ForeignCpu()
        t0 = time.perf_counter()
        try:
            yield out
        finally:
            out.append(time.perf_counter() - t0)
            if count:
                self.foreign_cpu += foreign.seconds()

    def run(self, argv: list[str], env: dict[str, str] | None = None,
            cwd: Path | None = None, setup: bool = False) -> tuple[float, str]:
        """Run a command; return (seconds, stdout). Raises on failure with its stderr.
        `setup` runs are not part of a measurement."""
        with self.timing(count=not setup) as took:
            proc = subprocess.run(argv, env={**os.environ, **(env or {})}, cwd=cwd,
                                  capture_output=True, text=True)
        seconds = took[0]
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                               f"{proc.stderr.strip()[-2000:]}")
        return seconds, proc.stdout

    def fresh(self, *paths: Path) -> None:
        for p in paths:
            if p.exists():
                shutil.rmtree(p)

    # dwsd
    def workspace(self) -> Any:
        """The open dwsd Workspace on the bench store (kept open, as the daemon does)."""
        if self._ws is None:
            from dwsd.workspace import Workspace
            if self.args.phases and not self._timers_installed:
                self._install_timers()
            self._ws = Workspace.open(self.dwsd_config())
        return self._ws

    def _install_timers(self) -> None:
        """Wrap the PHASES functions so each call adds its duration to `self.phases`."""
        import importlib
        self._timers_installed = True
        for label, module, attr in PHASES:
            try:
                owner: Any = importlib.import_module(module)
                *outer, name = attr.split(".")
                for part in outer:
                    owner = getattr(owner, part)
                fn = getattr(owner, name)
            except (ImportError, AttributeError):
                self.notes.append(f"phase timer {label}: {module}.{attr} not found")
                continue
            setattr(owner, name, self._timed(label, fn))

    def _timed(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        phases = self.phases

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t0
        return timed

    def close_workspace(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    @property
    def dwsd_dir(self) -> Path:
        return self.dir / "dwsd"

    def dwsd_config(self) -> Path:
        d = self.dwsd_dir
        d.mkdir(parents=True, exist_ok=True)
        path = d / "config.yaml"
        path.write_text(
            "workspace: bench\n"
            f"store: {json.dumps(str(d / 'store'))}\n"
            "mount: null\n"
            f"socket: {json.dumps(str(d / 'dwsd.sock'))}\n"
            "resources:\n"
            "  - name: data\n"
            f"    path: {json.dumps(str(self.ds.root))}\n"
            "    role: source-data\n")
        return path

    @contextlib.contextmanager
    def profiled(self, name: str) -> Iterator[None]:
        """With --profile, sample this process with py-spy while the block runs."""
        if not self.args.profile:
            yield
            return
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out = OUT_DIR / f"profile-{self.ds.variant}-{name}.txt"
        OUT_DIR.mkdir(exist_ok=True)
        proc = subprocess.Popen([spy, "record", "--pid", str(os.getpid()), "--rate", "200",
                                 "--idle", "--nonblocking", "--format", "raw",
                                 "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let it attach
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
            self.notes.append(f"profile of {name}: {out}")


class ForeignCpu:
    """CPU seconds used on this machine by everything but this process and its children
    (other people's tests, say) while a step runs: a step with much of it is suspect.
    Kernel threads doing our own write-back count as foreign too, so small values are
    normal."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
        # already inside user/nice, idle and iowait are not work.
        busy = sum(fields[:8]) - fields[3] - fields[4]
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return busy / os.sysconf("SC_CLK_TCK"), own

    def seconds(self) -> float:
        busy, own = self._sample()
        return max(0.0, (busy - self._start[0]) - (own - self._start[1]))


def wait_quiet(limit_s: float, window_s: float = 3.0, max_busy: float = 0.1) -> float:
    """Wait (up to `limit_s`) until other processes used under `max_busy` of a CPU for
    `window_s` in a row; return the seconds waited (the bench shares its machine)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        probe = ForeignCpu()
        time.sleep(window_s)
        if probe.seconds() < max_busy * window_s:
            break
    return time.perf_counter() - t0


def code_version() -> dict[str, Any]:
    """Which dwsd was measured: the commit, whether dwsd/ had local changes, and a hash of
    the dwsd/ sources as they were when the run started."""
    repo = HERE.parent

    def git(*argv: str) -> str:
        proc = subprocess.run(["git", "-C", str(repo), *argv], capture_output=True,
                              text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""
    h = blake3.blake3()
    for path in sorted((repo / "dwsd").rglob("*.py")):
        h.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes())
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dwsd_modified": bool(git("status", "--porcelain", "--", "dwsd")),
            "dwsd_sources": h.hexdigest()[:16]}


def du(path: Path) -> tuple[int, int]:
    """(bytes on disk, apparent bytes) of a tree, like `du -s -B1` and `du -sb`."""
    disk = apparent = 0
    seen: set[tuple[int, int]] = set()
    for d, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(d, name))
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            disk += st.st_blocks * 512
            apparent += st.st_size
    return disk, apparent


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


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
# daemon does); only `snapshot()` is timed. With phase timers on (the default), a few dwsd
# functions are wrapped to split that time; a name that no longer exists is skipped.

PHASES = [  # label, module, attribute path
    ("capture", "dwsd.workspace", "capture_resource"),
    ("drop_under", "dwsd.snapshot.statcache", "CaptureState.drop_under"),
    ("record", "dwsd.workspace", "Workspace._record"),
    ("durable", "dwsd.store.objects", "ObjectStore.make_durable"),
    ("load_state", "dwsd.workspace", "load_state"),
    ("save_state", "dwsd.workspace", "save_state"),
]


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


def _incremental(b: Bench, name: str, gen: int, cache: str, dirty: bool, growth: bool
                 ) -> Result:
    store = b.dwsd_dir / "store"
    before = du(store)
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
    after = du(store)
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


# -- running and reporting ----------------------------------------------------------------

def noisy(r: Result) -> bool:
    """Did other processes use much CPU while this run was timed?"""
    return bool(r.seconds) and r.extra.get("foreign_cpu_s", 0) > 0.25 * (r.seconds or 0) + 0.5


def combine(runs: list[Result]) -> Result:
    """One result from the repetitions of a step: the median time of the quiet runs (of
    all runs when none was quiet), the rest from the run closest to it; every time is
    kept in `extra["runs_s"]`."""
    if len(runs) == 1 or any(r.error is not None or r.seconds is None for r in runs):
        return runs[-1]
    quiet = [r for r in runs if not noisy(r)]
    pool = quiet or runs
    median = statistics.median(r.seconds or 0.0 for r in pool)
    closest = min(pool, key=lambda r: abs((r.seconds or 0) - median))
    extra = {**closest.extra, "runs_s": [r.seconds for r in runs],
             "foreign_cpu_s": [r.extra.get("foreign_cpu_s") for r in runs],
             "quiet_runs": len(quiet)}
    return Result(median, closest.detail, extra, closest.growth,
                  None if any(r.ok is None for r in runs) else all(r.ok for r in runs))


def plan(only: list[str] | None) -> list[str]:
    if not only:
        return list(STEPS)
    wanted: set[str] = set()

    def add(name: str) -> None:
        if name not in STEPS:
            raise SystemExit(f"unknown step {name!r}; steps: {', '.join(STEPS)}")
        if name not in wanted:
            wanted.add(name)
            for req in STEPS[name].requires:
                add(req)
            if (ref := STEPS[name].ref) is not None:
                add(ref)  # a ratio needs its reference measured in the same run
    for name in only:
        add(name)
    return [n for n in STEPS if n in wanted]


def rows(results: dict[str, Result]) -> list[dict[str, Any]]:
    out = []
    for name, r in results.items():
        s = STEPS[name]
        detail = r.detail
        if "runs_s" in r.extra:
            runs = r.extra["runs_s"]
            quiet = r.extra.get("quiet_runs", len(runs))
            detail = (f"runs {min(runs):.2f}-{max(runs):.2f}"
                      + (f" ({quiet} of {len(runs)} quiet)" if quiet != len(runs) else "")
                      + f"; {detail}")
        row: dict[str, Any] = {"step": name, "seconds": r.seconds, "vs": s.ref, "ratio": None,
                               "target": None, "result": "", "detail": detail}
        if r.error is not None:
            row.update(result="ERROR", detail=r.error[:200])
            out.append(row)
            continue
        ref = results.get(s.ref) if s.ref else None
        if ref is not None and ref.seconds and r.seconds is not None:
            row["ratio"] = r.seconds / ref.seconds
        if s.limit is not None:
            if s.ref:
                row["target"] = f"<= {s.limit:g}x"
                value = row["ratio"]
            else:
                row["target"] = f"<= {s.limit:g} s"
                value = r.seconds
            passed = value is not None and value <= s.limit and r.ok is not False
            row["result"] = "PASS" if passed else "MISS"
        out.append(row)
        if r.growth is not None:
            grown, changed = r.growth
            g: dict[str, Any] = {"step": f"{name} growth", "seconds": None, "vs": "changed",
                                 "ratio": grown / changed if changed else None,
                                 "target": None, "result": "",
                                 "detail": f"{mb(grown)} for {mb(changed)} changed"}
            if s.growth_limit is not None:
                g["target"] = f"<= {s.growth_limit:g}x"
                g["result"] = "PASS" if g["ratio"] <= s.growth_limit else "MISS"
            out.append(g)
    return out


def render(table: list[dict[str, Any]]) -> str:
    head = ["step", "seconds", "vs", "ratio", "target", "result", "detail"]
    lines = [[
        r["step"], "" if r["seconds"] is None else f"{r['seconds']:.2f}", r["vs"] or "",
        "" if r["ratio"] is None else f"{r['ratio']:.2f}", r["target"] or "", r["result"],
        r["detail"]] for r in table]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    right = {1, 3}

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/dwsd-bench"),
                    help="work directory (data set, copies, repositories, store)")
    ap.add_argument("--small", action="store_true", help="a 10x smaller data set")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--only", action="append", metavar="STEP",
                    help="run only these steps (comma-separated or repeated) and what "
                         "they need")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run each step N times and report the median time")
    ap.add_argument("--quiet-wait", type=float, default=120, metavar="S",
                    help="before each step, wait up to S seconds for other processes to "
                         "go quiet (0: don't)")
    ap.add_argument("--list", action="store_true", help="list the steps and exit")
    ap.add_argument("--no-phases", dest="phases", action="store_false",
                    help="do not wrap dwsd functions to split snapshot time into phases")
    ap.add_argument("--profile", action="store_true",
                    help="sample dwsd steps with py-spy (`pip install py-spy`; raw "
                         "stacks into bench/out/; times are inflated)")
    args = ap.parse_args(argv)
    if args.list:
        for s in STEPS.values():
            print(f"{s.name:20} {s.doc}")
        return 0
    only = [n for item in args.only or [] for n in item.split(",") if n]
    names = plan(only)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    args.dir = args.dir.resolve()
    args.dir.mkdir(parents=True, exist_ok=True)
    variant = "small" if args.small else "full"
    ds = Dataset(args.dir / f"data-{variant}", variant, args.seed)
    generated, gen_s = ds.ensure()
    print(f"data set {ds.root}: {len(ds.files)} files, {mb(ds.total_bytes)}; change set "
          f"{len(ds.changed)} files, {mb(ds.changed_bytes)} "
          f"({'generated' if generated else 'reused'} in {gen_s:.1f} s)", flush=True)

    version = code_version()
    print(f"dwsd at {version['commit']}{' + local changes' if version['dwsd_modified'] else ''}"
          f" (sources {version['dwsd_sources']})", flush=True)
    b = Bench(args, ds)
    try:
        for name in names:
            print(f"-- {name}: {STEPS[name].doc}", flush=True)
            runs: list[Result] = []
            for b.rep in range(args.repeat):
                b.foreign_cpu = 0.0
                if args.quiet_wait > 0:
                    waited = wait_quiet(args.quiet_wait)
                    if waited >= args.quiet_wait:
                        b.notes.append(f"{name}: machine still busy after waiting "
                                       f"{args.quiet_wait:.0f} s; ran anyway")
                try:
                    r = STEPS[name].fn(b)
                except Exception as exc:  # one broken tool must not lose the others' figures
                    logging.exception("step %s failed", name)
                    r = Result(error=f"{type(exc).__name__}: {exc}")
                r.extra["foreign_cpu_s"] = round(b.foreign_cpu, 2)
                if noisy(r):
                    b.notes.append(f"{name}: other processes used {r.extra['foreign_cpu_s']} "
                                   f"CPU-s during the step (took {r.seconds:.2f} s): noisy")
                runs.append(r)
                if r.seconds is not None:
                    print(f"   {r.seconds:.2f} s  {r.detail}", flush=True)
                if r.error is not None:
                    break
            b.results[name] = combine(runs)
    finally:
        b.close_workspace()
        ds.apply(0)

    table = rows(b.results)
    print()
    print(render(table))
    for note in b.notes:
        print(f"note: {note}")
    OUT_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = OUT_DIR / f"bench-{stamp}-{variant}.json"
    out.write_text(json.dumps({
        "time": stamp, "argv": sys.argv, "dwsd": version, "dataset": ds.describe(),
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release,
                    "mem_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "notes": b.notes, "table": table,
        "steps": {n: asdict(r) for n, r in b.results.items()}}, indent=2, default=str))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
