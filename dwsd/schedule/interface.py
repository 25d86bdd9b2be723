"""What the control server may ask of the scheduler (the store's single writer).

The daemon passes a `SchedulerAPI` to `dwsd.control.ops.make_handlers`. Writes (snapshot,
restore, tag, untag, delete, prune) are queued and run one at a time off the trio thread;
reads answer from the in-memory catalog. Every method may raise `dwsd.errors.DwsdError`.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from dwsd.snapshot.diff import Change
from dwsd.snapshot.restore import Progress
from dwsd.store.catalog import SnapshotRecord
from dwsd.store.maintenance import CheckResult
from dwsd.workspace import PruneResult, RestoreResult, SnapshotResult


class SchedulerAPI(Protocol):
    async def snapshot(self, tags: Sequence[str], message: str, full: bool,
                       progress: Callable[[Progress], None] | None = None
                       ) -> SnapshotResult:
        """`progress` (files and bytes so far, totals estimated from the previous
        capture) is called on the trio thread."""
        ...

    async def restore(self, ref: str, only: Sequence[str] | None,
                      leave: Sequence[str] | None, paths: Sequence[str] | None,
                      target: str | None, dry_run: bool,
                      progress: Callable[[Progress], None]) -> RestoreResult:
        """`progress` is called on the trio thread."""
        ...

    async def tag(self, ref: str, tag: str) -> SnapshotRecord: ...

    async def untag(self, tag: str) -> SnapshotRecord: ...

    async def delete(self, ref: str) -> SnapshotRecord: ...

    async def prune(self, dry_run: bool) -> PruneResult: ...

    async def check(self, read_data: bool, repair: bool = False) -> CheckResult: ...

    async def diff(self, ref: str, other: str | None) -> dict[str, list[Change]]: ...

    def history(self, limit: int | None, kind: str | None) -> list[SnapshotRecord]: ...

    def get(self, ref: str) -> SnapshotRecord: ...

    def resources(self) -> list[dict[str, Any]]:
        """[{name, path, role}] of the configured resources."""
        ...

    def status(self) -> dict[str, Any]:
        """JSON-ready: workspace, store, mount, per-resource watcher health (overflows,
        watch errors, pending dirty paths), last checkpoint, capture counters, queue."""
        ...
