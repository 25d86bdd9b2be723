"""The trio side of watching: dirty paths, change counts and health per resource.

Each resource has a `TreeWatcher` thread; its batches cross into trio with
`TrioToken.run_sync_soon` (thread-safe, never blocks the reader) and are merged here on the
trio thread, which owns all of this state. A resource whose events cannot be trusted (queue
overflow, watch limit, watcher error) is marked `needs_full`: its next capture is a full
reconcile walk, and `status` shows why.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import trio

from dwsd.config import Resource
from dwsd.snapshot.exclude import ExcludeMatcher
from dwsd.watch.inotify import TreeWatcher

log = logging.getLogger(__name__)


@dataclass
class ResourceWatch:
    """What the watcher knows of one resource (trio thread only)."""

    dirty: set[bytes] = field(default_factory=set)
    changes: int = 0
    needs_full: bool = True     # nothing is known before the first reconcile walk
    healthy: bool = True        # events can be trusted (no watch limit or error)
    overflows: int = 0
    problems: list[str] = field(default_factory=list)
    last_event: float | None = None
    watches: int = 0

    def to_json(self) -> dict[str, object]:
        return {"dirty_paths": len(self.dirty), "changes": self.changes,
                "needs_full": self.needs_full, "healthy": self.healthy,
                "overflows": self.overflows, "problems": self.problems[-5:],
                "watches": self.watches}


@dataclass
class Taken:
    """Dirty paths handed to one capture; `give_back` if the capture failed."""

    dirty: dict[str, set[bytes]]
    full: set[str]
    changes: int


class Watcher:
    def __init__(self, resources: Sequence[Resource], on_change: Callable[[], None]) -> None:
        self.resources = list(resources)
        self.state = {r.name: ResourceWatch() for r in self.resources}
        self._on_change = on_change
        self._threads: dict[str, TreeWatcher] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Start one watch per resource, report readiness, run until cancelled."""
        token = trio.lowlevel.current_trio_token()
        try:
            for r in self.resources:
                await self._start(r, token)
            task_status.started()
            await trio.sleep_forever()
        finally:
            for tw in self._threads.values():
                tw.close()
            self._threads.clear()

    async def _start(self, resource: Resource, token: trio.lowlevel.TrioToken) -> None:
        def on_batch(paths: list[bytes], problem: str | None) -> None:
            try:
                token.run_sync_soon(self._merge, resource.name, paths, problem)
            except trio.RunFinishedError:
                pass  # shutting down

        tw = TreeWatcher(bytes(resource.path), ExcludeMatcher(resource.exclude), on_batch)
        self._threads[resource.name] = tw
        try:
            await trio.to_thread.run_sync(tw.start)
        except OSError as exc:
            self._merge(resource.name, [], f"cannot watch: {exc}")
        self.state[resource.name].watches = tw.watches

    def _merge(self, name: str, paths: list[bytes], problem: str | None) -> None:
        state = self.state[name]
        state.dirty.update(paths)
        state.changes += len(paths)
        state.last_event = trio.current_time()
        if name in self._threads:
            state.watches = self._threads[name].watches
        if problem is not None:
            self._note_problem(name, state, problem)
        self._on_change()

    def _note_problem(self, name: str, state: ResourceWatch, problem: str) -> None:
        state.needs_full = True
        state.problems.append(problem)
        if problem == "overflow":
            state.overflows += 1
            log.warning("%s: inotify queue overflowed; the next checkpoint walks it all",
                        name)
        else:
            state.healthy = False
            log.warning("%s: %s; checkpoints walk it all from now on", name, problem)

    # -- for the scheduler (trio thread) -------------------------------------------------

    def pending_changes(self) -> int:
        return sum(s.changes for s in self.state.values())

    def last_event(self) -> float | None:
        times = [s.last_event for s in self.state.values() if s.last_event is not None]
        return max(times) if times else None

    def anything_to_capture(self) -> bool:
        return any(s.dirty or s.needs_full for s in self.state.values())

    def take(self, force_full: bool = False) -> Taken:
        """Hand the dirty paths to a capture and start afresh."""
        full = {n for n, s in self.state.items()
                if force_full or s.needs_full or not s.healthy}
        taken = Taken({n: s.dirty for n, s in self.state.items() if n not in full},
                      full, self.pending_changes())
        for s in self.state.values():
            s.dirty, s.changes, s.needs_full = set(), 0, False
        return taken

    def give_back(self, taken: Taken) -> None:
        """A capture failed: its paths are dirty again."""
        for name, paths in taken.dirty.items():
            self.state[name].dirty |= paths
        for name in taken.full:
            self.state[name].needs_full = True
        self.state[next(iter(self.state))].changes += taken.changes
