"""The workspace API: one object to snapshot, list, tag, delete and maintain a workspace.

It is what the daemon's scheduler calls (always from one worker thread at a time: the
workspace is the store's single writer), and it works on its own for scripts and tests.
Every method blocks.

Commit order for a snapshot (crash-safe at every step):
  1. capture every resource: new blobs and trees are written under their final names;
  2. `make_durable` (one syncfs) so all of them survive a power cut;
  3. the catalog is replaced atomically: only now does the snapshot exist;
  4. the capture state (stat cache) is saved; losing it only costs a re-read.
A failure before 3 removes the objects this snapshot added; the catalog is untouched.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

from dwsd.config import Config, Resource, load_config
from dwsd.errors import TagError, UsageError
from dwsd.snapshot.capture import CaptureCounters, CaptureResult, capture_resource
from dwsd.snapshot.exclude import ExcludeMatcher
from dwsd.snapshot.statcache import CaptureState, load_state, save_state
from dwsd.store.catalog import KINDS, Counts, SnapshotRecord, check_tag, hostname, \
    manifest_hash
from dwsd.store.ids import ObjectId
from dwsd.store.maintenance import CheckResult, GcResult, check_store, collect_garbage
from dwsd.store.store import Store

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class SnapshotResult:
    """What `snapshot` did. `record` is None when a periodic checkpoint found no change;
    `created` is False when the content matched an existing snapshot (tags merged)."""

    record: SnapshotRecord | None
    created: bool
    captures: dict[str, CaptureResult] = field(default_factory=dict)
    objects_written: int = 0
    bytes_written: int = 0

    @property
    def counters(self) -> CaptureCounters:
        total = CaptureCounters()
        for c in self.captures.values():
            for name in vars(total):
                setattr(total, name, getattr(total, name) + getattr(c.counters, name))
        return total

    @property
    def unstable(self) -> list[tuple[str, bytes]]:
        return [(r, p) for r, c in self.captures.items() for p in c.unstable]

    @property
    def unreadable(self) -> list[tuple[str, bytes, str]]:
        return [(r, p, e) for r, c in self.captures.items() for p, e in c.unreadable]


class Workspace:
    def __init__(self, config: Config, store: Store, clock: Clock = utc_now) -> None:
        self.config = config
        self.store = store
        self.clock = clock

    @classmethod
    def open(cls, config: Config | str | Path, clock: Clock = utc_now) -> "Workspace":
        """Open (creating the store if needed) as the store's writer. Raises DwsdError."""
        if not isinstance(config, Config):
            config = load_config(config)
        return cls(config, Store.open(config.store, create=True), clock)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- snapshots ----------------------------------------------------------------------

    def snapshot(self, tags: Sequence[str] = (), message: str = "", kind: str = "manual",
                 dirty: Mapping[str, Collection[bytes]] | None = None) -> SnapshotResult:
        """Capture every resource and record a snapshot.

        `dirty=None` walks every resource; otherwise only the listed relative paths of
        the listed resources are examined (resources absent from it are unchanged).
        A periodic snapshot whose content equals an existing snapshot is not recorded;
        any other kind adds its tags and message to that snapshot instead.
        """
        if kind not in KINDS:
            raise UsageError(f"unknown snapshot kind {kind!r} (one of {', '.join(KINDS)})")
        for tag in tags:  # fail before any work is done
            check_tag(tag)
            if (holder := self.store.catalog.by_tag(tag)) is not None:
                raise TagError(f"tag {tag!r} is already on snapshot {holder.id}")
        objects = self.store.objects
        write_log = objects.start_log()
        try:
            captures = {r.name: self._capture(r, dirty) for r in self.config.resources}
            roots = {name: c.root for name, c in captures.items()}
            result = self._record(roots, captures, tags, message, kind)
        except BaseException:
            objects.roll_back(write_log)
            raise
        result.objects_written = write_log.objects_written
        result.bytes_written = write_log.bytes_written
        self._save_states(captures)
        return result

    def _capture(self, resource: Resource, dirty: Mapping[str, Collection[bytes]] | None
                 ) -> CaptureResult:
        prev = load_state(self.store.state_dir, resource.name)
        paths = None if dirty is None else dirty.get(resource.name, ())
        result = capture_resource(self.store.objects, resource.path, prev,
                                  ExcludeMatcher(resource.exclude), paths)
        for path, error in result.unreadable:
            log.warning("%s: cannot read %r: %s", resource.name, path, error)
        return result

    def _record(self, roots: dict[str, ObjectId], captures: dict[str, CaptureResult],
                tags: Sequence[str], message: str, kind: str) -> SnapshotResult:
        h = manifest_hash(roots)
        catalog = self.store.catalog
        existing = catalog.by_hash(h)
        if existing is not None:
            if kind == "periodic" or (not tags and not message):
                return SnapshotResult(existing if kind != "periodic" else None, False,
                                      captures)
            with self.store.changing_catalog() as cat:
                merged = cat.merge(existing, tags, message)
            return SnapshotResult(merged, False, captures)
        self.store.objects.make_durable()
        files = sum(c.state.totals()[0] for c in captures.values())
        size = sum(c.state.totals()[1] for c in captures.values())
        counts = Counts(files=files, bytes=size,
                        changed_files=sum(c.changed_files for c in captures.values()),
                        added_bytes=self.store.objects.log.bytes_written)
        now = self.clock()
        with self.store.changing_catalog() as cat:
            rec = cat.add(SnapshotRecord(
                id=cat.new_id(now), hash=h, number=0, kind=kind, tags=tuple(tags),
                message=message, hostname=hostname(), time=now, resources=roots,
                counts=counts))
        log.info("snapshot %s (%s) taken: %d files, %d changed, %d bytes added",
                 rec.id, kind, files, counts.changed_files, counts.added_bytes)
        return SnapshotResult(rec, True, captures)

    def _save_states(self, captures: dict[str, CaptureResult]) -> None:
        if self.store.objects.log.objects_written:
            self.store.objects.make_durable()
        for name, capture in captures.items():
            save_state(self.store.state_dir, name, capture.state)

    def capture_state(self, resource: str) -> CaptureState:
        return load_state(self.store.state_dir, self.config.resource(resource).name)

    # -- catalog ------------------------------------------------------------------------

    def history(self, limit: int | None = None, kind: str | None = None
                ) -> list[SnapshotRecord]:
        """Snapshots, newest first."""
        if kind is not None and kind not in KINDS:
            raise UsageError(f"unknown snapshot kind {kind!r} (one of {', '.join(KINDS)})")
        return self.store.catalog.history(limit, kind)

    def get(self, ref: str) -> SnapshotRecord:
        return self.store.catalog.resolve(ref)

    def tag(self, ref: str, tag: str) -> SnapshotRecord:
        with self.store.changing_catalog() as cat:
            return cat.tag(ref, tag)

    def untag(self, tag: str) -> SnapshotRecord:
        with self.store.changing_catalog() as cat:
            return cat.untag(tag)

    def delete(self, ref: str) -> SnapshotRecord:
        """Remove a snapshot from the catalog; its objects go at the next `gc`."""
        with self.store.changing_catalog() as cat:
            return cat.remove(cat.resolve(ref).id)

    # -- maintenance --------------------------------------------------------------------

    def gc(self) -> GcResult:
        """Remove objects no snapshot (and no capture state) refers to."""
        roots = [root for rec in self.store.catalog.history()
                 for root in rec.resources.values()]
        roots += [s.root for s in self._all_states() if s.root is not None]
        return collect_garbage(self.store.objects, roots)

    def _all_states(self) -> list[CaptureState]:
        names = [p.name[:-len(".state")] for p in self.store.state_dir.glob("*.state")]
        return [load_state(self.store.state_dir, n) for n in names]

    def check(self, read_data: bool = False) -> CheckResult:
        return check_store(self.store.objects, self.store.catalog, read_data)
