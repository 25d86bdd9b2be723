"""The scheduler: the store's single writer.

Every write — periodic checkpoints, manual snapshots, restores, tags, deletes, prunes —
runs through `_write`, which holds one FIFO `trio.Lock` and runs the workspace call on a
worker thread (its own CapacityLimiter), so the trio thread never blocks on the disk.

Checkpoints: when something changed, a checkpoint is taken once writes have been quiet for
`quiet`, if `changes` piled up or `interval` passed since the last one. It captures only
the dirty paths the watcher collected, except for resources needing a full reconcile walk
(at start, after an overflow or watch error, and every `reconcile`). A resource whose
events cannot be trusted (watch limit, watcher error) is walked whole at least every
`interval`, changes seen or not. No change, no snapshot. Retention runs after each
checkpoint; the objects of the snapshots it deletes are collected at the next reconcile
(gc reads every tree and lists every blob directory: after each checkpoint it cost five
times the checkpoint on the bench set). A manual prune collects at once. A failed checkpoint is retried after a backoff that doubles from
FIRST_BACKOFF up to `interval`, so a broken resource cannot make the daemon spin.

Before taking the dirty paths, every capture waits for the watcher's barrier (`sync`), so
a snapshot asked for right after a write always sees it.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import trio

from dwsd.config import Config
from dwsd.errors import StoppingError
from dwsd.memory import release_free_memory
from dwsd.snapshot.diff import Change
from dwsd.snapshot.restore import Progress
from dwsd.store.catalog import SnapshotRecord
from dwsd.store.maintenance import CheckResult
from dwsd.watch.watcher import Taken, Watcher
from dwsd.workspace import PruneResult, RestoreResult, SnapshotResult, Workspace

log = logging.getLogger(__name__)
T = TypeVar("T")

FIRST_BACKOFF = 5.0  # seconds before the first retry of a failed checkpoint


class Scheduler:
    """Implements `dwsd.schedule.interface.SchedulerAPI`. Trio thread only."""

    def __init__(self, ws: Workspace, watcher: Watcher,
                 on_catalog_change: Callable[[], Awaitable[None]] | None = None) -> None:
        self.ws = ws
        self.watcher = watcher
        self.on_catalog_change = on_catalog_change
        self._writer = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._wakeup = trio.Event()
        self._last_checkpoint = trio.current_time()
        self._last_reconcile = -math.inf
        self._retry_at = -math.inf  # no checkpoint before this (after failures)
        # Snapshots were deleted since the last gc (or the daemon just started, and a
        # previous run may have left some): the next prune or reconcile collects.
        self._gc_pending = True
        self._stopping = False  # see stop()
        self.queue_length = 0
        self.stats: dict[str, Any] = {"checkpoints": 0, "skipped": 0, "errors": 0,
                                      "failures": 0, "reconciles": 0,
                                      "last_checkpoint": None, "last_error": None,
                                      "last_counters": None}

    @property
    def config(self) -> Config:
        return self.ws.config

    def wake(self) -> None:
        """Called by the watcher (trio thread) whenever something changed."""
        self._wakeup.set()

    def stop(self) -> None:
        """The daemon is shutting down: the operation running finishes, those waiting
        for it and any asked for later fail with StoppingError (the watcher stops with
        the daemon: a capture after it could miss changes)."""
        self._stopping = True

    async def finish_running(self) -> None:
        """Return once the operation running at `stop` (if any) has finished."""
        await self._writer.acquire()
        self._writer.release()

    def force_reconcile(self) -> None:
        """Make the next checkpoint a reconcile walk, as soon as any backoff allows."""
        self._last_reconcile = -math.inf
        self.wake()

    # -- the checkpoint loop -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Report readiness, reconcile once (catching up on what changed while the daemon
        was down), then checkpoint as the triggers say. Runs until cancelled."""
        task_status.started()
        await self.checkpoint(reconcile=True)
        while True:
            delay = self._next_delay()
            with trio.move_on_after(delay):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            if self._due_reconcile():
                await self.checkpoint(reconcile=True)
            elif self._due_checkpoint():
                await self.checkpoint()

    def _next_delay(self) -> float:
        """Seconds until a checkpoint or reconcile is due (at least 50 ms)."""
        due = [self._reconcile_at()]
        checkpoint_at = self._checkpoint_at()
        if checkpoint_at is not None:
            due.append(checkpoint_at)
        return max(max(min(due), self._retry_at) - trio.current_time(), 0.05)

    def _reconcile_at(self) -> float:
        return self._last_reconcile + self.config.checkpoint.reconcile.total_seconds()

    def _checkpoint_at(self) -> float | None:
        """When a periodic checkpoint is due (trio clock); None while nothing calls for
        one. Writes must have been quiet for `quiet`, and `changes` piled up or
        `interval` passed; a resource the watcher cannot follow is due every interval."""
        cp = self.config.checkpoint
        interval_at = self._last_checkpoint + cp.interval.total_seconds()
        blind_at = None if self.watcher.all_healthy() else interval_at
        if not self.watcher.anything_to_capture():
            return blind_at
        last = self.watcher.last_event()
        quiet_at = (-math.inf if last is None else last) + cp.quiet.total_seconds()
        if self.watcher.pending_changes() >= cp.changes:
            return quiet_at
        due = max(quiet_at, interval_at)
        return due if blind_at is None else min(due, blind_at)

    def _due_reconcile(self) -> bool:
        now = trio.current_time()
        return now >= self._retry_at and now >= self._reconcile_at()

    def _due_checkpoint(self) -> bool:
        now = trio.current_time()
        checkpoint_at = self._checkpoint_at()
        return now >= self._retry_at and checkpoint_at is not None and now >= checkpoint_at

    async def checkpoint(self, reconcile: bool = False) -> SnapshotResult | None:
        """One periodic checkpoint (a full walk when `reconcile`), then retention.
        Never raises: a failure is logged, counted and retried after a backoff."""
        try:
            result = await self._capture("periodic", (), "", full=reconcile)
        except Exception as exc:  # a bad checkpoint must not stop the daemon
            self._failed("checkpoint", exc)
            return None
        self.stats["failures"] = 0
        self._retry_at = -math.inf
        if reconcile:
            self._last_reconcile = trio.current_time()
            self.stats["reconciles"] += 1
        if result.record is None:
            self.stats["skipped"] += 1
        else:
            self.stats["checkpoints"] += 1
        try:
            if result.record is not None:
                await self._retention()
            if reconcile and self._gc_pending:
                await self._write_call(self.ws.gc)
                self._gc_pending = False
        except Exception as exc:
            self._failed("pruning after a checkpoint", exc)
        return result

    async def _retention(self) -> None:
        """Delete what the retention policy does not keep; collect later."""
        result = await self._write_call(lambda: self.ws.prune(dry_run=False, gc=False))
        if result.deleted:
            self._gc_pending = True
            await self._catalog_changed()

    def _failed(self, what: str, exc: Exception) -> None:
        """Count and log a failure; back off: FIRST_BACKOFF, doubling up to `interval`."""
        self.stats["errors"] += 1
        self.stats["failures"] += 1
        self.stats["last_error"] = str(exc)
        limit = max(self.config.checkpoint.interval.total_seconds(), FIRST_BACKOFF)
        backoff = min(FIRST_BACKOFF * 2 ** (self.stats["failures"] - 1), limit)
        self._retry_at = trio.current_time() + backoff
        log.error("%s failed (retried in %.0f s): %s", what, backoff, exc)

    async def _capture(self, kind: str, tags: Sequence[str], message: str, full: bool,
                       progress: Callable[[Progress], None] | None = None
                       ) -> SnapshotResult:
        report = None if progress is None else self._to_trio(progress)
        async with self._writing(), self._changes(full) as taken:
            result = await self._thread(lambda: self._snapshot_and_trim(
                tags, message, kind, taken, report))
        self._last_checkpoint = trio.current_time()
        self.stats["last_counters"] = vars(result.counters)
        if result.record is not None:
            self.stats["last_checkpoint"] = result.record.id
        if result.created or (result.record is not None and (tags or message)):
            await self._catalog_changed()
        return result

    @contextlib.asynccontextmanager
    async def _changes(self, full: bool = False) -> AsyncIterator[Taken]:
        """Inside the writer lock: wait for the watcher's barrier (changes made before
        this request must be in it), then take the dirty paths; they are given back
        when the body fails, so the next capture still looks at them."""
        await self.watcher.sync(rescan=full)
        taken = self.watcher.take(force_full=full)
        try:
            yield taken
        except BaseException:
            self.watcher.give_back(taken)
            raise

    def _snapshot_and_trim(self, tags: Sequence[str], message: str, kind: str,
                           taken: Taken, report: Callable[[Progress], None] | None
                           ) -> SnapshotResult:
        """Take the snapshot, then give the capture pool's freed memory back (blocks):
        a long-running daemon should not keep the high-water mark of its largest walk."""
        try:
            return self.ws.snapshot(tags, message, kind, dirty=taken.dirty,
                                    full=taken.full, progress=report)
        finally:
            release_free_memory()

    # -- SchedulerAPI --------------------------------------------------------------------

    async def snapshot(self, tags: Sequence[str], message: str, full: bool,
                       progress: Callable[[Progress], None] | None = None
                       ) -> SnapshotResult:
        return await self._capture("manual", tags, message, full, progress)

    async def restore(self, ref: str, only: Sequence[str] | None,
                      leave: Sequence[str] | None, paths: Sequence[str] | None,
                      target: str | None, dry_run: bool,
                      progress: Callable[[Progress], None]) -> RestoreResult:
        report = self._to_trio(progress)  # here: it needs the trio thread
        async with self._writing(), self._changes() as taken:
            # In place, the pre-restore snapshot follows the dirty paths, like any other.
            result = await self._thread(lambda: self.ws.restore(
                ref, only, leave, paths, target, dry_run, report,
                dirty=taken.dirty, full=taken.full))
            if result.pre_restore is None:  # no snapshot took them (dry run, --target)
                self.watcher.give_back(taken)
        await self._catalog_changed()
        return result

    async def tag(self, ref: str, tag: str) -> SnapshotRecord:
        return await self._catalog_write(lambda: self.ws.tag(ref, tag))

    async def untag(self, tag: str) -> SnapshotRecord:
        return await self._catalog_write(lambda: self.ws.untag(tag))

    async def delete(self, ref: str) -> SnapshotRecord:
        removed = await self._write_call(lambda: self.ws.delete(ref))
        # Before any await: a prune queued behind this delete must see it.
        self._gc_pending = True  # its objects go at the next prune or reconcile
        await self._catalog_changed()
        return removed

    async def prune(self, dry_run: bool) -> PruneResult:
        """Delete what retention does not keep, then collect the objects of every
        snapshot deleted since the last gc (`delete`s included), not only its own: one
        write operation, so a shutdown cannot come between the two."""
        def prune_and_collect() -> PruneResult:
            result = self.ws.prune(dry_run=dry_run, gc=False)
            if not dry_run and (result.deleted or self._gc_pending):
                result.gc = self.ws.gc()
            return result
        result = await self._write_call(prune_and_collect)
        if result.gc is not None:
            self._gc_pending = False
        if result.deleted and not dry_run:
            await self._catalog_changed()
        return result

    async def check(self, read_data: bool, repair: bool = False) -> CheckResult:
        return await self._write_call(lambda: self.ws.check(read_data, repair))

    async def diff(self, ref: str, other: str | None) -> dict[str, list[Change]]:
        return await self._write_call(lambda: self.ws.diff(ref, other))

    def history(self, limit: int | None, kind: str | None) -> list[SnapshotRecord]:
        return self.ws.history(limit, kind)

    def get(self, ref: str) -> SnapshotRecord:
        return self.ws.get(ref)

    def resources(self) -> list[dict[str, Any]]:
        return [{"name": r.name, "path": str(r.path), "role": r.role}
                for r in self.config.resources]

    def status(self) -> dict[str, Any]:
        latest = self.ws.store.catalog.latest()
        return {
            "workspace": self.config.workspace, "store": str(self.config.store),
            "mount": str(self.config.mount) if self.config.mount else None,
            "snapshots": len(self.ws.store.catalog.snapshots),
            "latest": latest.id if latest else None,
            "queue": self.queue_length, **self.stats,
            # Snapshots pruned or deleted whose objects the next prune or reconcile
            # collects.
            "gc_pending": self._gc_pending,
            # Why the restore a crash interrupted could not be completed at start, if so.
            "unfinished_restore": self.ws.resume_error,
            # Resource -> files the latest snapshot lacks because they cannot be read.
            "unreadable_files": self.ws.left_out(),
            "resources": {n: s.to_json() for n, s in self.watcher.state.items()},
        }

    # -- plumbing ------------------------------------------------------------------------

    @staticmethod
    def _to_trio(progress: Callable[[Progress], None]) -> Callable[[Progress], None]:
        """A progress callback for a worker thread that hands a copy of each report to
        `progress` on the trio thread, never blocking the worker."""
        token = trio.lowlevel.current_trio_token()

        def report(p: Progress) -> None:
            token.run_sync_soon(progress, Progress(p.files_done, p.files_total,
                                                   p.bytes_done, p.bytes_total, p.path))
        return report

    def _writing(self) -> "_Writing":
        return _Writing(self)

    async def _thread(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    async def _write_call(self, fn: Callable[[], T]) -> T:
        async with self._writing():
            return await self._thread(fn)

    async def _catalog_write(self, fn: Callable[[], T]) -> T:
        result = await self._write_call(fn)
        await self._catalog_changed()
        return result

    async def _catalog_changed(self) -> None:
        """Tell the view; its failure is logged, never raised: the write it follows is
        done, and the next catalog change shows it all."""
        if self.on_catalog_change is None:
            return
        try:
            await self.on_catalog_change()
        except Exception as exc:
            log.error("the view could not show the new catalog: %s", exc)


class _Writing:
    """Holds the writer lock; counts waiters for `status`."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler

    async def __aenter__(self) -> None:
        self.s.queue_length += 1
        try:
            await self.s._writer.acquire()
        finally:
            self.s.queue_length -= 1
        if self.s._stopping:
            self.s._writer.release()
            raise StoppingError("dwsd is shutting down; the operation was not started")

    async def __aexit__(self, *exc: object) -> None:
        self.s._writer.release()
