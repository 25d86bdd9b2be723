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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

from dwsd.config import Config, Resource, load_config
from dwsd.errors import DwsdError, ResourceMissingError, RestoreError, TagError, \
    UsageError
from dwsd.snapshot.capture import CaptureCounters, CaptureResult, TreeCache, capture_resource
from dwsd.snapshot.exclude import ExcludeMatcher
from dwsd.snapshot.readers import KeptProcesses
from dwsd.snapshot.statcache import CaptureState, SavedState, load_state, save_state
from dwsd.store.catalog import KINDS, Counts, SnapshotRecord, check_tag, hostname, \
    manifest_hash
from dwsd.store.ids import ObjectId
from dwsd.store.maintenance import CheckResult, GcResult, bad_blobs, check_store, \
    collect_garbage
from dwsd.store.store import Store
from dwsd.crashpoints import crash_point
from dwsd.snapshot.diff import Change, diff_trees
from dwsd.snapshot.journal import RestoreJournal, clear_journal, read_journal, write_journal
from dwsd.snapshot.restore import Plan, Progress, ProgressFn, SyncSweep, apply_plan, \
    has_path, plan_restore, set_root_metadata
from dwsd.snapshot.retention import plan_retention

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]
PROGRESS_EVERY = 0.1  # seconds between snapshot progress reports
STATE_SAVE_EVERY = 60.0  # seconds: capture states on disk lag at most this much
SAVE_AFTER_READING = 1_000  # files read by one capture: its state is written at once


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
    # (resource, path, error) of every file the snapshot lacks because it could not be
    # read: found by this capture, or by an earlier one and not looked at since.
    left_out: list[tuple[str, bytes, str]] = field(default_factory=list)

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


@dataclass
class RestoreResult:
    snapshot: SnapshotRecord
    pre_restore: SnapshotRecord | None
    plans: dict[str, Plan]
    dry_run: bool = False
    resources_changed: int = 0
    files_written: int = 0
    removed: int = 0
    errors: list[tuple[str, bytes, str]] = field(default_factory=list)


@dataclass
class PruneResult:
    kept: dict[str, tuple[str, ...]]
    deleted: list[str]
    dry_run: bool
    gc: GcResult | None = None


def select_resources(config: Config, rec: SnapshotRecord, only: Sequence[str] | None,
                     leave: Sequence[str] | None, paths: Sequence[str] | None,
                     in_place: bool) -> dict[str, list[bytes] | None]:
    """Resource name -> paths inside it to restore (None: all of it). Raises UsageError
    for unknown names, `only` with `leave`, or `results` resources named in place."""
    if only and leave:
        raise UsageError("--only and --leave cannot be used together")
    known = {r.name: r for r in config.resources}
    for name in [*(only or ()), *(leave or ())]:
        if name not in known:
            raise UsageError(f"unknown resource {name!r} (known: {', '.join(known)})")
        if name not in rec.resources:
            raise UsageError(f"snapshot {rec.id} has no resource {name!r}")
    if in_place:
        for name in only or ():
            if known[name].role == "results":
                raise UsageError(f"resource {name!r} has role 'results' and is never "
                                 "restored in place (use --target)")
    names = [n for n in (only or known) if n in rec.resources and n not in (leave or ())
             and not (in_place and known[n].role == "results")]
    if not paths:
        return {n: None for n in names}
    chosen: dict[str, list[bytes] | None] = {}
    for path in paths:
        # Normalised: `a//b` and `a/./b` name `a/b`; `..` would leave the resource.
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise UsageError(f"path {path!r} has a '..' component")
        name, inside = (parts[0], "/".join(parts[1:])) if parts else ("", "")
        if name not in names:
            raise UsageError(f"path {path!r} is not inside a resource being restored")
        sub = chosen.setdefault(name, [])
        assert sub is not None
        sub.append(os.fsencode(inside))
    return chosen


def _looked_at(path: bytes, dirty: Collection[bytes]) -> bool:
    """Whether a dirty-path capture of `dirty` looks at `path` again: it is dirty, its
    directory was listed (a name the previous tree lacks is examined), or a directory
    above it was walked whole (`dir/`)."""
    if path in dirty or path + b"/" in dirty:
        return True
    parts = path.split(b"/")
    parents = [b"/".join(parts[:i]) for i in range(1, len(parts))]
    return bool(parents) and parents[-1] in dirty or any(p + b"/" in dirty for p in parents)


def _journal_paths(by_resource: dict[str, list[bytes] | None]
                   ) -> dict[str, list[str]] | None:
    if all(v is None for v in by_resource.values()):
        return None
    return {k: [os.fsdecode(p) for p in v or []] for k, v in by_resource.items()}


class Workspace:
    def __init__(self, config: Config, store: Store, clock: Clock = utc_now) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self._states: dict[str, CaptureState] = {}
        # Resources whose state in memory is this process's own last capture.
        self._captured_here: set[str] = set()
        self._unsaved: set[str] = set()  # ... and not yet written to disk
        self._saved: dict[str, SavedState | None] = {}  # what is on disk, if known
        self._trees = TreeCache()  # decoded trees, from one capture to the next
        # Reader processes a capture started, kept for the next (stopped by `close`).
        self._readers = KeptProcesses()
        # See _keep_left_out. Every resource's key from the start: `left_out` (status,
        # on the trio thread) iterates it while a capture (a worker thread) updates it.
        self._left_out: dict[str, dict[bytes, str]] = {
            r.name: {} for r in self.config.resources}
        self._saved_at = time.monotonic()
        # Why the interrupted restore could not be completed when the workspace was
        # opened (its journal is kept); None when there was nothing to complete or it was.
        self.resume_error: str | None = None

    @classmethod
    def open(cls, config: Config | str | Path, clock: Clock = utc_now,
             resume: bool = True) -> "Workspace":
        """Open (creating the store if needed) as the store's writer, and complete a
        restore a crash interrupted (unless `resume` is False). A restore that cannot be
        completed does not stop the opening: see `resume_error`. Raises DwsdError."""
        if not isinstance(config, Config):
            config = load_config(config)
        ws = cls(config, Store.open(config.store, create=True), clock)
        if resume:
            ws._resume_on_open()
        return ws

    def _resume_on_open(self) -> None:
        """Complete an interrupted restore; on failure log one error and keep it in
        `resume_error` (and the journal), since a workspace that cannot open cannot be
        repaired either: the daemon must start to report it and to restore again."""
        try:
            self.resume_restore()
        except Exception as exc:  # whatever it is: reported, never raised from open
            what = exc if isinstance(exc, DwsdError) else f"{type(exc).__name__}: {exc}"
            self.resume_error = (f"the interrupted restore could not be completed: {what}"
                                 " (restore again to finish it)")
            log.error("%s", self.resume_error)

    def close(self) -> None:
        """Write what is kept in memory, stop the reader processes kept, then release
        the store."""
        try:
            if not self.store.readonly:
                self.save_states()
        finally:
            try:
                self._readers.close()
            finally:
                self.store.close()

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- snapshots ----------------------------------------------------------------------

    def snapshot(self, tags: Sequence[str] = (), message: str = "", kind: str = "manual",
                 dirty: Mapping[str, Collection[bytes]] | None = None,
                 full: Collection[str] = (), progress: ProgressFn | None = None
                 ) -> SnapshotResult:
        """Capture every resource and record a snapshot.

        `dirty=None` walks every resource; otherwise only the listed relative paths of
        the listed resources are examined (resources absent from it are unchanged),
        except resources named in `full`, which are walked whole. A directory keeps its
        recorded metadata unless it is listed itself: list the directory of every name
        created, deleted or moved (its mtime moved), as the watcher does.
        A periodic snapshot whose content equals an existing snapshot is not recorded;
        a pre-restore one always is (the undo point must be kept by its own policy);
        any other kind adds its tags and message to that snapshot instead.
        """
        if kind not in KINDS:
            raise UsageError(f"unknown snapshot kind {kind!r} (one of {', '.join(KINDS)})")
        tags = list(dict.fromkeys(tags))  # `-t a -t a` is one tag
        latest = self.store.catalog.latest()
        for tag in tags:  # fail before any work is done
            check_tag(tag)
            holder = self.store.catalog.by_tag(tag)
            # A tag already on the latest snapshot is fine if nothing changed since (the
            # merge re-checks it once the content is known).
            if holder is not None and (latest is None or holder.id != latest.id):
                raise TagError(f"tag {tag!r} is already on snapshot {holder.id}")
        objects = self.store.objects
        write_log = objects.start_log()
        paths = {r.name: None if dirty is None or r.name in full else dirty.get(r.name, ())
                 for r in self.config.resources}
        on_file = self._progress_counter(progress, paths)
        try:
            captures, absent = self._capture_all(paths, on_file)
            roots = {name: c.root for name, c in captures.items()}
            result = self._record(roots, captures, tags, message, kind)
        except BaseException:
            objects.roll_back(write_log)
            raise
        result.objects_written = write_log.objects_written
        result.bytes_written = write_log.bytes_written
        result.left_out = absent + self._keep_left_out(captures, paths)
        self._keep_states(captures, walked=any(p is None for p in paths.values()))
        return result

    def _capture_all(self, paths: Mapping[str, Collection[bytes] | None],
                     on_file: Callable[[int], None] | None
                     ) -> tuple[dict[str, CaptureResult], list[tuple[str, bytes, str]]]:
        """Capture (or keep, see `_capture_or_keep`) every resource; a resource whose
        directory cannot be read and that no snapshot has yet (a disk not mounted yet,
        a resource just added) is left out of the snapshot, reported as (name, b"",
        why), so it does not stop the others being snapshotted. Raises
        ResourceMissingError when that leaves nothing to snapshot."""
        captures: dict[str, CaptureResult] = {}
        absent: list[tuple[str, bytes, str]] = []
        first: ResourceMissingError | None = None
        for r in self.config.resources:
            try:
                captures[r.name] = self._capture_or_keep(r, paths[r.name], on_file)
            except ResourceMissingError as exc:
                log.warning("%s: %s; not in this snapshot (no snapshot has it yet)",
                            r.name, exc)
                absent.append((r.name, b"", str(exc)))
                first = first or exc
        if not captures and first is not None:
            raise first
        return captures, absent

    def _keep_left_out(self, captures: Mapping[str, CaptureResult],
                       paths: Mapping[str, Collection[bytes] | None]
                       ) -> list[tuple[str, bytes, str]]:
        """Remember the files each capture could not read, until a capture looks at
        them again (a full walk; a dirty path, its directory listed, or a directory
        above it walked whole), and return all those of `captures`' resources: a file
        left out stays out of every later snapshot, which must say so too."""
        for name, capture in captures.items():
            known = self._left_out.setdefault(name, {})
            if capture.walked_all:
                known.clear()
            elif known:
                dirty = set(paths[name] or ())
                for path in [p for p in known if _looked_at(p, dirty)]:
                    del known[path]
            known.update(capture.unreadable)
        return [(name, path, error) for name in captures
                for path, error in sorted(self._left_out[name].items())]

    def left_out(self) -> dict[str, int]:
        """Resource -> how many files its latest snapshot lacks because they could not
        be read (as far as this workspace object has seen: a first full walk knows)."""
        return {name: len(known) for name, known in self._left_out.items() if known}

    def _progress_counter(self, progress: ProgressFn | None,
                          paths: Mapping[str, Collection[bytes] | None]
                          ) -> Callable[[int], None] | None:
        """A per-file callback feeding `progress` at most every PROGRESS_EVERY seconds.
        Totals are estimated from the last capture: a whole resource when it is walked,
        the dirty paths' last known sizes when only they are looked at."""
        if progress is None:
            return None
        totals = [self._expected_work(name, some) for name, some in paths.items()]
        status = Progress(files_total=sum(t[0] for t in totals),
                          bytes_total=sum(t[1] for t in totals))
        last = [0.0]

        def on_file(size: int) -> None:
            status.files_done += 1
            status.bytes_done += size
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY:
                last[0] = now
                progress(status)
        return on_file

    def _expected_work(self, name: str, paths: Collection[bytes] | None) -> tuple[int, int]:
        """(files, bytes) a capture of resource `name` limited to `paths` will settle."""
        state = self._state(name)
        if paths is None:
            return state.totals()
        known = [state.files.get(p) for p in paths]
        return len(paths), sum(f.size for f in known if f is not None)

    def _state(self, name: str) -> CaptureState:
        """The capture state of a resource, kept in memory after the first load."""
        if name not in self._states:
            self._states[name], self._saved[name] = load_state(self.store.state_dir, name)
        return self._states[name]

    def _capture(self, resource: Resource, paths: Collection[bytes] | None,
                 on_file: Callable[[int], None] | None = None) -> CaptureResult:
        """Capture one resource: only `paths` (relative) when given and the capture
        state allows it, else all of it."""
        self._check_leads_outside(resource)
        prev = self._state(resource.name)
        if paths is not None and not self._state_is_current(resource.name, prev):
            log.info("%s: capture state older than the latest snapshot; walking it all",
                     resource.name)
            paths = None
        result = capture_resource(self.store.objects, resource.path, prev,
                                  ExcludeMatcher(resource.exclude), paths, on_file=on_file,
                                  trees=self._trees, kept=self._readers)
        for path, error in result.unreadable:
            log.warning("%s: cannot read %r: %s", resource.name, path, error)
        return result

    def _overlapping(self, path: Path) -> str | None:
        """"the store ..." or "the view's mount point ..." when `path`, symlinks
        resolved, is inside it or holds it; else None. The mount point itself is not
        stat'ed: its server may be this process."""
        real = Path(os.path.realpath(path))
        for what, place in (("the store", self.config.store),
                            ("the view's mount point", self.config.mount)):
            if place is None:
                continue
            where = Path(os.path.realpath(place.parent)) / place.name
            if real.is_relative_to(where) or where.is_relative_to(real):
                return f"{what} {place}"
        return None

    def _check_leads_outside(self, resource: Resource) -> None:
        """Raise ResourceMissingError when the resource's path (a symlink, maybe pointed
        there since the config was checked) leads into the store or the view's mount
        point: a capture of the daemon's own view would read through its own FUSE
        server, and a forked reader holding such files deadlocks it."""
        if (place := self._overlapping(resource.path)) is not None:
            raise ResourceMissingError(f"resource directory {resource.path} leads into "
                                       f"{place}: not captured")

    def _capture_or_keep(self, resource: Resource, paths: Collection[bytes] | None,
                         on_file: Callable[[int], None] | None) -> CaptureResult:
        """`_capture`, except that a resource whose directory cannot be opened (a disk
        not mounted, a directory deleted) keeps what the latest snapshot has of it,
        reported as left out: the other resources are still snapshotted, and the
        retention of snapshots that lack it cannot drop its history. Raises
        ResourceMissingError when no snapshot has it yet."""
        try:
            return self._capture(resource, paths, on_file)
        except ResourceMissingError as exc:
            latest = self.store.catalog.latest()
            if latest is None or resource.name not in latest.resources:
                raise
            log.warning("%s: %s; its content as of snapshot %s is kept", resource.name,
                        exc, latest.id)
            meta = latest.root_meta.get(resource.name) or (0o755, os.getuid(),
                                                             os.getgid(), 0)
            return CaptureResult(latest.resources[resource.name],
                                 self._state(resource.name), CaptureCounters(), meta,
                                 unreadable=[(b"", str(exc))], walked_all=False,
                                 kept=True)

    def _record(self, roots: dict[str, ObjectId], captures: dict[str, CaptureResult],
                tags: Sequence[str], message: str, kind: str) -> SnapshotResult:
        h = manifest_hash(roots)
        catalog = self.store.catalog
        # Only the latest snapshot's content counts as "no change": content equal to an
        # older one (a change undone: A, B, then A again) is recorded anew, or `latest`
        # would go on showing B, and restoring it would bring B back.
        latest = catalog.latest()
        existing = latest if latest is not None and latest.hash == h else None
        if existing is not None and kind != "pre-restore":
            if kind == "periodic" or (not tags and not message
                                      and not (kind == "manual"
                                               and existing.kind == "periodic")):
                return SnapshotResult(existing if kind != "periodic" else None, False,
                                      captures)
            with self.store.changing_catalog() as cat:
                merged = cat.merge(existing, tags, message, kind)
            return SnapshotResult(merged, False, captures)
        self.store.objects.make_durable()
        totals = [c.state.totals() for c in captures.values()]
        files, size = sum(t[0] for t in totals), sum(t[1] for t in totals)
        counts = Counts(files=files, bytes=size,
                        changed_files=sum(c.changed_files for c in captures.values()),
                        added_bytes=self.store.objects.log.bytes_written,
                        removed_files=sum(c.removed_files for c in captures.values()))
        now = self.clock()
        crash_point("before-catalog-commit")
        with self.store.changing_catalog() as cat:
            rec = cat.add(SnapshotRecord(
                id=cat.new_id(now), hash=h, number=0, kind=kind, tags=tuple(tags),
                message=message, hostname=hostname(), time=now, resources=roots,
                counts=counts,
                root_meta={name: c.root_meta for name, c in captures.items()}))
        crash_point("after-catalog-commit")
        log.info("snapshot %s (%s) taken: %d files, %d changed, %d removed, %d bytes added",
                 rec.id, kind, files, counts.changed_files, counts.removed_files,
                 counts.added_bytes)
        return SnapshotResult(rec, True, captures)

    def _state_is_current(self, name: str, state: CaptureState) -> bool:
        """Dirty paths are changes since the last capture: they may be applied only on
        top of it. A capture made by this process is that, recorded or not (a checkpoint
        whose content equals the latest snapshot is not recorded). A state loaded from
        disk is trusted only when it is the latest snapshot's: a crash between the
        catalog commit and the state save leaves an older one there."""
        if name in self._captured_here:
            return True
        latest = self.store.catalog.latest()
        return latest is not None and latest.resources.get(name) == state.root

    def _keep_states(self, captures: dict[str, CaptureResult], walked: bool) -> None:
        """Keep the new capture states in memory and save them: a state whose changes
        since it was saved are known (after a dirty-path capture) at once, as a record
        of those changes (O(changes), see statcache); one to be written whole (O(tree),
        which a small snapshot should not pay) at once after a capture that read many
        files (costly to redo: a first snapshot), else at most every STATE_SAVE_EVERY
        seconds and on close. After a crash, a state on disk that is not the latest
        costs a full walk that re-reads only the files changed since it was written."""
        if self.store.objects.log.objects_written:
            self.store.objects.make_durable()  # the states name these objects
        for name, capture in captures.items():
            if capture.kept:
                continue  # nothing captured: its state is as it was, trusted or not
            before, state = self._states.get(name), capture.state
            if state.unsaved is None and before is not None and before.unsaved is not None:
                # A full walk's new state, over one whose saved copy is known: its
                # changes are what the walk found different.
                changes = capture.changes
                assert changes is not None  # a full walk's, over `before`
                capture.changes = None  # not kept with the snapshot's result
                state.unsaved = {**before.unsaved, **changes}
                if changes or state.root != before.root:
                    self._unsaved.add(name)
            # A dirty-path capture's state (derived) adds its changes in `keep`.
            elif not walked or before is None or before != state:
                self._unsaved.add(name)
            state.keep()
            self._states[name] = state
            self._captured_here.add(name)
        read = sum(c.counters.files_opened for c in captures.values())
        due = time.monotonic() - self._saved_at >= STATE_SAVE_EVERY
        self.save_states(whole=read >= SAVE_AFTER_READING or due)

    def save_states(self, whole: bool = True) -> None:
        """Write the capture states not yet on disk (blocks); with `whole` False, only
        those that can be saved as a record of their changes."""
        for name in sorted(self._unsaved):
            saved = save_state(self.store.state_dir, name, self._states[name],
                               self._saved.get(name), whole)
            self._saved[name] = saved  # None: the next save of it must be whole
            if saved is not None:
                self._unsaved.discard(name)
        if whole:
            self._saved_at = time.monotonic()

    # -- diff ---------------------------------------------------------------------------

    def diff(self, ref: str, other: str | None = None) -> dict[str, list[Change]]:
        """Changes per resource from snapshot `ref` to snapshot `other`, or to the live
        files when `other` is None (captured first; the capture state is not saved, so
        a diff never changes what the next snapshot sees as new). A resource whose live
        directory cannot be read has one change, `unavailable`, and is not compared."""
        old = self.get(ref)
        unavailable: dict[str, list[Change]] = {}
        if other is not None:
            new_roots: dict[str, ObjectId | None] = dict(self.get(other).resources)
        else:
            new_roots = {}
            for r in self.config.resources:
                try:
                    new_roots[r.name] = self._capture(r, None).root
                except ResourceMissingError as exc:
                    # One resource whose directory is gone must not hide the others'
                    # changes, nor show all its files as removed: it is not compared.
                    log.warning("%s: %s; not compared", r.name, exc)
                    unavailable[r.name] = [Change(b"", "unavailable", None, None)]
        changes = {name: list(diff_trees(self.store.objects, old.resources.get(name),
                                         new_roots.get(name)))
                   for name in set(old.resources) | set(new_roots) if name not in unavailable}
        return dict(sorted((changes | unavailable).items()))

    # -- restore ------------------------------------------------------------------------

    def restore(self, ref: str, only: Sequence[str] | None = None,
                leave: Sequence[str] | None = None, paths: Sequence[str] | None = None,
                target: str | Path | None = None, dry_run: bool = False,
                progress: ProgressFn | None = None,
                dirty: Mapping[str, Collection[bytes]] | None = None,
                full: Collection[str] = ()) -> RestoreResult:
        """Bring resources back to snapshot `ref`.

        In place (no `target`): a `pre-restore` snapshot of the live state is taken first
        (limited to `dirty` paths, except resources in `full`, as `snapshot` is: the
        daemon knows what changed), then only what differs is written; resources with
        role `results` are left alone.
        `paths` ("resource/sub/path") limits it to some files or directories; `target`
        writes the snapshot under `<target>/<resource>/` instead (an empty directory).
        `dry_run` plans without changing any file. Raises RefError, and UsageError for
        a path the snapshot does not have (nor, in place, the live files) and for a
        target inside the store or the view, before anything is taken or written.
        """
        rec = self.get(ref)
        in_place = target is None
        by_resource = select_resources(self.config, rec, only, leave, paths, in_place)
        self._check_paths(rec, by_resource, in_place)
        if target is not None:
            return self._restore_to(rec, by_resource, Path(target), dry_run, progress)
        if dry_run:
            live = {name: self._capture(self.config.resource(name), None).root
                    for name in by_resource}
            return RestoreResult(rec, None, self._plans(rec, by_resource, live), dry_run=True)
        pre = self.snapshot(kind="pre-restore", message=f"before restoring {rec.id}",
                            dirty=dirty, full=full)
        assert pre.record is not None
        journal = RestoreJournal(rec.id, list(by_resource), _journal_paths(by_resource),
                                 pre.record.id)
        write_journal(self.store.journal_dir, journal)
        live = {name: pre.captures[name].root for name in by_resource}
        return self._apply(rec, pre.record, self._plans(rec, by_resource, live), progress)

    def pending_restore(self) -> RestoreJournal | None:
        """The restore a crash interrupted, if any."""
        return read_journal(self.store.journal_dir)

    def resume_restore(self, progress: ProgressFn | None = None) -> RestoreResult | None:
        """Finish an interrupted restore (re-planned from the live files); None if none."""
        journal = self.pending_restore()
        if journal is None:
            return None
        rec = self.get(journal.snapshot)
        log.warning("completing the interrupted restore of snapshot %s", rec.id)
        by_resource: dict[str, list[bytes] | None] = {
            name: None if journal.paths is None else
            [os.fsencode(p) for p in journal.paths.get(name, [])]
            for name in journal.resources}
        live = {name: self._capture(self.config.resource(name), None).root
                for name in by_resource}
        pre = self.get(journal.pre_restore) if journal.pre_restore else None
        return self._apply(rec, pre, self._plans(rec, by_resource, live), progress)

    def _plans(self, rec: SnapshotRecord, by_resource: dict[str, list[bytes] | None],
               live: Mapping[str, ObjectId | None]) -> dict[str, Plan]:
        return {name: plan_restore(self.store.objects, live[name], rec.resources[name], sub)
                for name, sub in by_resource.items()}

    def _apply(self, rec: SnapshotRecord, pre: SnapshotRecord | None,
               plans: dict[str, Plan], progress: ProgressFn | None,
               roots: Mapping[str, Path] | None = None) -> RestoreResult:
        """Apply `plans` (in place unless `roots` says where). In place, the written
        files are made durable before the journal goes: after a power cut either the
        restore is complete on disk or the journal is still there to complete it."""
        result = RestoreResult(rec, pre, plans)
        status = Progress(files_total=sum(p.files for p in plans.values()),
                          bytes_total=sum(p.bytes for p in plans.values()))
        with SyncSweep() as sweep:
            for name, plan in plans.items():
                root = roots[name] if roots else self.config.resource(name).path
                self._apply_one(result, name, plan, os.fsencode(root), roots is not None,
                                status, progress, sweep)
            if roots is None:
                sweep.sync()
                clear_journal(self.store.journal_dir)
                self.resume_error = None  # whatever was left over is now done
        for name, path, error in result.errors:
            log.warning("restore of %s: %s/%r not restored: %s", rec.id, name, path, error)
        log.info("snapshot %s restored %s: %d files written, %d removed", rec.id,
                 f"to {os.path.commonpath(list(roots.values()))}" if roots else "in place",
                 result.files_written, result.removed)
        return result

    def _apply_one(self, result: RestoreResult, name: str, plan: Plan, root: bytes,
                   to_target: bool, status: Progress, progress: ProgressFn | None,
                   sweep: SyncSweep) -> None:
        """Apply one resource's plan under `root`, adding what it did to `result`."""
        rec = result.snapshot
        applied = apply_plan(self.store.objects, root, plan, progress, status,
                             lambda: crash_point("restore-file"), sweep)
        if name in rec.root_meta and (plan.actions or plan.dirs or to_target):
            set_root_metadata(root, rec.root_meta[name])
        result.files_written += applied.files_written
        result.removed += applied.removed
        result.errors += [(name, p, e) for p, e in applied.errors]
        if plan.actions or plan.dirs:
            result.resources_changed += 1

    def _check_paths(self, rec: SnapshotRecord, by_resource: dict[str, list[bytes] | None],
                     in_place: bool) -> None:
        """Raise UsageError for a path to restore that is not in the snapshot (nor, in
        place, in the live files: there, restoring it means removing it)."""
        for name, subs in by_resource.items():
            for sub in subs or ():
                if has_path(self.store.objects, rec.resources[name], sub):
                    continue
                live = os.path.join(bytes(self.config.resource(name).path), sub)
                if in_place and os.path.lexists(live):
                    continue
                shown = f"{name}/{os.fsdecode(sub.strip(b'/'))}"
                raise UsageError(f"path {shown!r} is not in snapshot {rec.id}"
                                 + (" nor in the live files" if in_place else ""))

    def _restore_to(self, rec: SnapshotRecord, by_resource: dict[str, list[bytes] | None],
                    target: Path, dry_run: bool, progress: ProgressFn | None
                    ) -> RestoreResult:
        if (place := self._overlapping(target)) is not None:
            raise UsageError(f"restore target {target} is inside {place}")
        if target.exists() and not target.is_dir():
            raise UsageError(f"restore target {target} is not a directory")
        if target.exists() and any(target.iterdir()):
            raise UsageError(f"restore target {target} is not empty")
        plans = self._plans(rec, by_resource, {name: None for name in by_resource})
        if dry_run:
            return RestoreResult(rec, None, plans, dry_run=True)
        return self._apply(rec, None, plans, progress,
                           {name: target / name for name in by_resource})

    # -- retention ----------------------------------------------------------------------

    def prune(self, dry_run: bool = False, now: dt.datetime | None = None,
              gc: bool = True) -> PruneResult:
        """Delete the snapshots the retention policy does not keep, then gc (unless
        `gc` is False: the caller collects later). Returns what is kept (with reasons)
        and what was (or would be) deleted."""
        history = self.store.catalog.history()
        kept = plan_retention(history, self.config.retention, now or self.clock())
        for sid in self._needed_by_pending_restore():
            kept[sid] = kept.get(sid, ()) + ("needed by the unfinished restore",)
        doomed = [r.id for r in history if r.id not in kept]
        result = PruneResult(kept=kept, deleted=sorted(doomed), dry_run=dry_run)
        if dry_run or not doomed:
            return result
        with self.store.changing_catalog() as cat:  # one atomic commit for all of them
            for sid in doomed:
                cat.remove(sid)
        crash_point("after-delete-commit")
        if gc:
            result.gc = self.gc()
        return result

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
            doomed = cat.resolve(ref).id
            if doomed in self._needed_by_pending_restore():
                raise RestoreError(f"snapshot {doomed} is needed by the unfinished restore; "
                                   "restore again to finish it first")
            removed = cat.remove(doomed)
            crash_point("delete-before-commit")
        crash_point("after-delete-commit")
        return removed

    def _needed_by_pending_restore(self) -> set[str]:
        """The snapshots an unfinished restore names (its target and its undo point):
        deleting them would leave it unfinishable."""
        journal = self.pending_restore()
        if journal is None:
            return set()
        return {sid for sid in (journal.snapshot, journal.pre_restore) if sid is not None}

    # -- maintenance --------------------------------------------------------------------

    def gc(self) -> GcResult:
        """Remove objects no snapshot (and no capture state) refers to."""
        roots = [root for rec in self.store.catalog.history()
                 for root in rec.resources.values()]
        states = self._all_states() + list(self._states.values())
        roots += [s.root for s in states if s.root is not None]
        return collect_garbage(self.store.objects, roots)

    def _all_states(self) -> list[CaptureState]:
        names = [p.name[:-len(".state")] for p in self.store.state_dir.glob("*.state")]
        return [load_state(self.store.state_dir, n)[0] for n in names]

    def check(self, read_data: bool = False, repair: bool = False) -> CheckResult:
        """Check the store (re-hash every blob with `read_data`). With `repair`, corrupt
        blobs are moved aside (`<store>/corrupt/`) and the capture states forget the
        files whose content a bad blob held, missing ones too: the next full walk reads
        those files again, and where a file still has that content its good copy repairs
        every snapshot that uses it. The problems are reported as found."""
        result = check_store(self.store.objects, self.store.catalog, read_data)
        if not repair:
            return result
        missing, corrupt = bad_blobs(result)
        bad = set(missing) | set(corrupt)
        if not bad:
            return result
        # The states first, durably: moved aside while a state on disk still named a
        # bad blob, a crash would leave it trusted, and no walk would store it again.
        # (A crash between the two leaves the blob in place: a repair again does it.)
        for name in [r.name for r in self.config.resources]:
            state = self._state(name)
            stale = [p for p, f in state.files.items() if f.blob in bad]
            for path in stale:
                state.drop(path)
            if stale:
                state.unsaved = None  # written whole
                self._unsaved.add(name)
        self.save_states()
        self.store.objects.sync_filesystem()
        for oid in corrupt:
            if self.store.objects.move_aside(oid):
                result.moved_aside.append(oid)
                log.warning("blob %s is corrupt: moved aside to %s", oid,
                            self.store.root / "corrupt")
        return result
