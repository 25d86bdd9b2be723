"""What every bench step shares: results, the step registry, the `Bench` context (page
cache, timed commands, the dwsd workspace) and small measuring helpers."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from dataset import GEN_A, Dataset

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "out"

# With phase timers on (the default), these dwsd functions are wrapped to split a
# snapshot's time; a name that no longer exists is skipped with a note.
PHASES = [  # label, module, attribute path
    ("capture", "dwsd.workspace", "capture_resource"),
    ("drop_under", "dwsd.snapshot.statcache", "CaptureState.drop_under"),
    ("record", "dwsd.workspace", "Workspace._record"),
    ("durable", "dwsd.store.objects", "ObjectStore.make_durable"),
    ("load_state", "dwsd.workspace", "load_state"),
    ("save_state", "dwsd.workspace", "save_state"),
]


@dataclass
class Result:
    seconds: float | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    growth: tuple[int, int] | None = None  # (store bytes added, changed bytes)
    ok: bool | None = None  # an extra condition of the target ("writes nothing")
    error: str | None = None
    # A figure other than time (MB/s, MB of RSS, CPU seconds) that the step's target is
    # on, in the step's `unit`.
    value: float | None = None


@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[["Bench"], Result]
    doc: str
    requires: tuple[str, ...] = ()
    ref: str | None = None  # ratio = seconds / seconds of `ref` (inverse when `higher`)
    limit: float | None = None  # on the ratio (when `ref`), else on `value` or seconds
    growth_limit: float | None = None
    unit: str | None = None  # the target is on `Result.value`, in this unit
    higher: bool = False  # the target is a floor: a speed, not a time


STEPS: dict[str, Step] = {}


def step(name: str, *, requires: tuple[str, ...] = (), ref: str | None = None,
         limit: float | None = None, growth_limit: float | None = None,
         unit: str | None = None, higher: bool = False
         ) -> Callable[[Callable[["Bench"], Result]], Callable[["Bench"], Result]]:
    """Register a step under `name`; its docstring's first line describes it."""
    def register(fn: Callable[["Bench"], Result]) -> Callable[["Bench"], Result]:
        STEPS[name] = Step(name, fn, (fn.__doc__ or "").strip().splitlines()[0], requires,
                           ref, limit, growth_limit, unit, higher)
        return fn
    return register



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
            drop_caches()
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
        prime(self.ds.root)

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
            from dwsd.memory import tune_allocator, tune_gc
            from dwsd.workspace import Workspace
            # Set up as the daemon sets itself up (daemon.py), so that the steps run
            # in this process measure what the daemon would (docs/performance.md,
            # "After a first snapshot in the same process").
            tune_allocator()
            tune_gc()
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
            setattr(owner, name, timed(self.phases, label, fn))


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



def prime(root: Path) -> None:
    """Warm the dentries and inodes of every entry below `root`."""
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lstat(os.path.join(d, name))


def drop_caches() -> None:
    """Drop the page cache, dentries and inodes (root only: raises OSError otherwise)."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


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


def timed(phases: dict[str, float], label: str, fn: Callable[..., Any]
          ) -> Callable[..., Any]:
    """`fn`, adding the seconds of each call to `phases[label]`."""
    def run(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[label] = phases.get(label, 0.0) + time.perf_counter() - t0
    return run
