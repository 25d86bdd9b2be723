"""Store maintenance: `gc` (mark from the catalog and capture state, sweep the rest) and
`check` (structure, and with `read_data` a re-hash of every object).

Both block. gc must only run in the writer (it holds the lock, so no snapshot is being
written); an interrupted gc only leaves some garbage behind, never a dangling reference,
because objects are removed only when nothing reachable names them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

from dwsd.crashpoints import crash_point
from dwsd.errors import CorruptObjectError, ObjectMissingError
from dwsd.store.catalog import Catalog, manifest_hash
from dwsd.store.ids import ObjectId
from dwsd.store.objects import Kind, ObjectStore
from dwsd.store.tree import DIR, FILE, decode_tree

log = logging.getLogger(__name__)


@dataclass
class GcResult:
    kept: int = 0
    removed: int = 0


@dataclass
class Problem:
    kind: str          # "blob", "tree" or "snapshot"
    object_id: str
    problem: str
    snapshots: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        used = ", ".join(self.snapshots) or "no snapshot"
        return f"{self.kind} {self.object_id}: {self.problem} (used by {used})"


@dataclass
class CheckResult:
    trees: int = 0
    blobs: int = 0
    blobs_read: int = 0
    problems: list[Problem] = field(default_factory=list)
    moved_aside: list[ObjectId] = field(default_factory=list)  # corrupt blobs (repair)

    @property
    def ok(self) -> bool:
        return not self.problems


def reachable(objects: ObjectStore, roots: Iterable[ObjectId]
              ) -> tuple[set[ObjectId], set[ObjectId]]:
    """(tree ids, blob ids) reachable from `roots`. Missing/corrupt trees raise."""
    trees: set[ObjectId] = set()
    blobs: set[ObjectId] = set()
    stack = [r for r in roots]
    while stack:
        tid = stack.pop()
        if tid in trees:
            continue
        trees.add(tid)
        for e in decode_tree(objects.get("trees", tid), tid):
            if e.kind == DIR and e.ref is not None:
                stack.append(e.ref)
            elif e.kind == FILE and e.ref is not None:
                blobs.add(e.ref)
    return trees, blobs


def collect_garbage(objects: ObjectStore, roots: Iterable[ObjectId]) -> GcResult:
    """Remove every object not reachable from `roots`."""
    trees, blobs = reachable(objects, roots)
    result = GcResult()
    live: dict[Kind, set[ObjectId]] = {"trees": trees, "blobs": blobs}
    for kind in ("trees", "blobs"):
        for oid in list(objects.iter_ids(kind)):
            if oid in live[kind]:
                result.kept += 1
            else:
                crash_point("gc-remove")
                objects.remove(kind, oid)
                result.removed += 1
    objects.make_durable()  # commits the tree removals
    log.info("gc kept %d objects, removed %d", result.kept, result.removed)
    return result


def check_store(objects: ObjectStore, catalog: Catalog, read_data: bool = False
                ) -> CheckResult:
    """Verify every snapshot's manifest, trees and blobs; name the snapshots a bad object
    belongs to."""
    result = CheckResult()
    bad: dict[ObjectId, Problem] = {}
    seen_trees: set[ObjectId] = set()
    seen_blobs: set[ObjectId] = set()
    users: dict[ObjectId, set[str]] = {}
    for rec in catalog.history():
        if manifest_hash(rec.resources) != rec.hash:
            result.problems.append(Problem("snapshot", rec.id, "hash does not match its "
                                           "resources", [rec.id]))
        for root in rec.resources.values():
            _check_tree(objects, root, rec.id, read_data, result, bad, seen_trees,
                        seen_blobs, users)
    for oid, problem in bad.items():
        problem.snapshots = sorted(users.get(oid, ()))
        result.problems.append(problem)
    result.trees, result.blobs = len(seen_trees), len(seen_blobs)
    return result


def _check_tree(objects: ObjectStore, root: ObjectId, snap: str, read_data: bool,
                result: CheckResult, bad: dict[ObjectId, Problem], seen_trees: set[ObjectId],
                seen_blobs: set[ObjectId], users: dict[ObjectId, set[str]]) -> None:
    # Walk per snapshot so every user of a bad object is named, but read each object once.
    stack = [root]
    visited: set[ObjectId] = set()
    while stack:
        tid = stack.pop()
        if tid in visited:
            continue
        visited.add(tid)
        users.setdefault(tid, set()).add(snap)
        if tid in bad:
            continue
        try:
            entries = decode_tree(objects.get("trees", tid), tid)
        except (ObjectMissingError, CorruptObjectError) as exc:
            bad[tid] = Problem("tree", tid, _short(exc))
            continue
        seen_trees.add(tid)
        for e in entries:
            if e.ref is None:
                continue
            if e.kind == DIR:
                stack.append(e.ref)
            elif e.kind == FILE:
                users.setdefault(e.ref, set()).add(snap)
                if e.ref not in seen_blobs and e.ref not in bad:
                    seen_blobs.add(e.ref)
                    _check_blob(objects, e.ref, read_data, result, bad)


def _check_blob(objects: ObjectStore, oid: ObjectId, read_data: bool, result: CheckResult,
                bad: dict[ObjectId, Problem]) -> None:
    if not objects.has("blobs", oid):
        bad[oid] = Problem("blob", oid, "missing")
    elif read_data:
        result.blobs_read += 1
        if not objects.verify("blobs", oid):
            bad[oid] = Problem("blob", oid, CORRUPT)


CORRUPT = "content does not match its hash"


def bad_blobs(result: CheckResult) -> tuple[list[ObjectId], list[ObjectId]]:
    """(missing, corrupt) blob ids among a check's problems."""
    blobs = [p for p in result.problems if p.kind == "blob"]
    return ([ObjectId(p.object_id) for p in blobs if p.problem != CORRUPT],
            [ObjectId(p.object_id) for p in blobs if p.problem == CORRUPT])


def _short(exc: Exception) -> str:
    text = str(exc)
    return text.split(": ", 1)[-1] if ": " in text else text
