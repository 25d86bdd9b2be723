"""The trio side of watching: dirty paths, change counts and health per resource.

Each resource has a `TreeWatcher` thread; its batches cross into trio with
`TrioToken.run_sync_soon` (thread-safe, never blocks the reader) and are merged here on the
trio thread, which owns all of this state. A resource whose events cannot be trusted (queue
overflow, watch limit, watcher error) is marked `needs_full`: its next capture is a full
reconcile walk, and `status` shows why. An unhealthy resource (watch limit, error, its
directory replaced, moved away or missing) is walked whole at every capture, gets its
watches re-scanned at each `sync(rescan=True)` (a reconcile's), or at every sync when its
own directory was the problem (`rm -rf results && mkdir results` in a pipeline: the new
directory can be watched at once), and is healthy again once all are in.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import trio

from dwsd.config import Resource
from dwsd.snapshot.exclude import ExcludeMatcher
from dwsd.watch.inotify import Batch, TreeWatcher, is_root_problem

log = logging.getLogger(__name__)

# How long `sync` waits for a reader thread (busy adding watches for a huge new tree, say)
# before it falls back to a full walk of that resource.
SYNC_TIMEOUT = 10.0


@dataclass
class ResourceWatch:
    """What the watcher knows of one resource (trio thread only)."""

    dirty: set[bytes] = field(default_factory=set)    # to look at: changed + parents
    changed: set[bytes] = field(default_factory=set)  # paths events named: the changes
    needs_full: bool = True     # nothing is known before the first reconcile walk
    healthy: bool = True        # events can be trusted (no watch limit or error)
    rescan: bool = False        # watches may be missing: re-scan at the next reconcile...
    rescan_soon: bool = False   # ...or at the next sync (the resource directory's problem)
    overflows: int = 0
    problems: list[str] = field(default_factory=list)
    last_event: float | None = None
    watches: int = 0

    @property
    def changes(self) -> int:
        """Distinct paths changed since the last capture took them."""
        return len(self.changed)

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
    changed: dict[str, set[bytes]]


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
        def on_batch(batch: Batch) -> None:
            try:
                token.run_sync_soon(self._merge, resource.name, batch)
            except trio.RunFinishedError:
                pass  # shutting down

        tw = TreeWatcher(bytes(resource.path), ExcludeMatcher(resource.exclude), on_batch)
        self._threads[resource.name] = tw
        try:
            await trio.to_thread.run_sync(tw.start)
        except OSError as exc:
            self._merge(resource.name, Batch(problems=[f"cannot watch: {exc}"]))
        self.state[resource.name].watches = tw.watches

    def _merge(self, name: str, batch: Batch) -> None:
        state = self.state[name]
        state.dirty.update(batch.changed)
        state.dirty.update(batch.parents)
        state.changed.update(batch.changed)
        state.last_event = trio.current_time()
        if name in self._threads:
            state.watches = self._threads[name].watches
        for problem in batch.problems:
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
            soon = is_root_problem(problem)
            state.healthy, state.rescan = False, True
            state.rescan_soon = state.rescan_soon or soon
            log.warning("%s: %s; checkpoints walk it all until %s", name, problem,
                        "it is watched again (tried at each one)" if soon
                        else "a reconcile can watch it all again")

    # -- for the scheduler and the daemon (trio thread) --------------------------------

    async def sync(self, rescan: bool = False) -> None:
        """A barrier: returns once every event the kernel queued before the call has been
        merged. With `rescan`, resources whose watches may be incomplete are re-scanned
        first (and healthy again when all watches are in). A reader thread that does not
        answer within SYNC_TIMEOUT gets its resource walked whole instead."""
        await trio.lowlevel.checkpoint()  # always a checkpoint, even with no thread
        token = trio.lowlevel.current_trio_token()
        waiting: dict[str, trio.Event] = {}
        for name, tw in self._threads.items():
            synced = waiting[name] = trio.Event()
            state = self.state[name]
            redo = state.rescan and (rescan or state.rescan_soon)

            def done(problem: str | None, name: str = name, redo: bool = redo,
                     synced: trio.Event = synced) -> None:
                token.run_sync_soon(self._synced, name, redo, problem, synced)
            tw.request_sync(redo, done)
        with trio.move_on_after(SYNC_TIMEOUT):
            for synced in waiting.values():
                await synced.wait()
        for name, synced in waiting.items():
            if not synced.is_set():
                log.warning("%s: the watcher did not answer; walking it all", name)
                self.state[name].needs_full = True

    def _synced(self, name: str, rescanned: bool, problem: str | None,
                synced: trio.Event) -> None:
        state = self.state[name]
        if rescanned and problem is None:
            state.healthy, state.rescan, state.rescan_soon = True, False, False
            # What changed while watches were missing raised no event: the capture
            # this sync is for (the next one at the latest) walks the resource whole.
            state.needs_full = True
            state.watches = self._threads[name].watches if name in self._threads else 0
            state.problems.clear()  # `status` shows what is wrong now; the log, history
            log.info("%s: every directory is watched again", name)
        synced.set()

    def reconfigure(self, resources: Sequence[Resource]) -> list[str]:
        """Take changed excludes of the same resources (names and paths must not have
        changed); returns the names whose excludes changed. Their watches are re-scanned
        at the next `sync(rescan=True)`, and they need a full walk."""
        changed = []
        for old, new in zip(self.resources, resources):
            assert (old.name, old.path) == (new.name, new.path)
            if old.exclude != new.exclude:
                changed.append(new.name)
                if new.name in self._threads:
                    self._threads[new.name].set_excludes(ExcludeMatcher(new.exclude))
                state = self.state[new.name]
                state.rescan = state.needs_full = True
        self.resources = list(resources)
        return changed

    def pending_changes(self) -> int:
        return sum(s.changes for s in self.state.values())

    def last_event(self) -> float | None:
        times = [s.last_event for s in self.state.values() if s.last_event is not None]
        return max(times) if times else None

    def anything_to_capture(self) -> bool:
        return any(s.dirty or s.needs_full for s in self.state.values())

    def all_healthy(self) -> bool:
        """False when some resource's events cannot be trusted: only full walks see
        its changes."""
        return all(s.healthy for s in self.state.values())

    def take(self, force_full: bool = False) -> Taken:
        """Hand the dirty paths to a capture and start afresh."""
        full = {n for n, s in self.state.items()
                if force_full or s.needs_full or not s.healthy}
        taken = Taken({n: s.dirty for n, s in self.state.items() if n not in full},
                      full, {n: s.changed for n, s in self.state.items()})
        for s in self.state.values():
            s.dirty, s.changed, s.needs_full = set(), set(), False
        return taken

    def give_back(self, taken: Taken) -> None:
        """A capture failed: its paths are dirty again."""
        for name, paths in taken.dirty.items():
            self.state[name].dirty |= paths
        for name, paths in taken.changed.items():
            self.state[name].changed |= paths
        for name in taken.full:
            self.state[name].needs_full = True
