"""dwsd's results as JSON values for the control protocol (see docs/protocol.md).

Byte paths become str through `os.fsdecode` (surrogateescape), reversible with
`os.fsencode` on the other side. Pure functions; nothing here blocks.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Mapping

from dwsd.control.protocol import JSON
from dwsd.snapshot.diff import Change
from dwsd.snapshot.restore import Plan, Progress
from dwsd.store.catalog import SnapshotRecord
from dwsd.store.maintenance import CheckResult
from dwsd.store.tree import BLOCK, CHAR, DIR, FIFO, FILE, SOCKET, SYMLINK, Entry
from dwsd.workspace import PruneResult, RestoreResult, SnapshotResult

_KIND_NAMES = {FILE: "file", DIR: "dir", SYMLINK: "symlink", FIFO: "fifo",
               SOCKET: "socket", CHAR: "char", BLOCK: "block"}


def path_text(path: bytes) -> str:
    """A byte path as protocol text (reversible with os.fsencode)."""
    return os.fsdecode(path)


def encode_record(rec: SnapshotRecord) -> dict[str, JSON]:
    """A snapshot: id, hash, number, kind, tags, message, hostname, time (ISO 8601 UTC),
    resources {name: root tree id} and counts {files, bytes, changed_files,
    added_bytes, removed_files}."""
    doc = rec.to_json()
    doc.pop("root_meta", None)
    return doc


def encode_optional_record(rec: SnapshotRecord | None) -> dict[str, JSON] | None:
    return None if rec is None else encode_record(rec)


def encode_progress(progress: Progress) -> dict[str, JSON]:
    return {"files_done": progress.files_done, "files_total": progress.files_total,
            "bytes_done": progress.bytes_done, "bytes_total": progress.bytes_total,
            "path": path_text(progress.path)}


def encode_plan(plan: Plan, with_actions: bool) -> dict[str, JSON]:
    """Counts of a restore plan; with `with_actions`, every action {op, path}."""
    doc: dict[str, JSON] = {"files": plan.files, "bytes": plan.bytes,
                            "removals": plan.removals, "actions": len(plan.actions)}
    if with_actions:
        doc["changes"] = [{"op": a.op, "path": path_text(a.path)} for a in plan.actions]
    return doc


def entry_kind(entry: Entry | None) -> str | None:
    return None if entry is None else _KIND_NAMES.get(entry.kind, "unknown")


def encode_change(change: Change) -> dict[str, JSON]:
    """{path, status, kind, old_size, new_size}; sizes are null where absent."""
    return {"path": path_text(change.path), "status": change.status,
            "kind": entry_kind(change.new or change.old),
            "old_size": change.old.size if change.old else None,
            "new_size": change.new.size if change.new else None}


def encode_changes(by_resource: Mapping[str, list[Change]]) -> dict[str, JSON]:
    return {name: [encode_change(c) for c in changes]
            for name, changes in by_resource.items()}


def encode_check(result: CheckResult) -> dict[str, JSON]:
    return {"ok": result.ok, "trees": result.trees, "blobs": result.blobs,
            "blobs_read": result.blobs_read,
            "problems": [asdict(p) | {"text": str(p)} for p in result.problems],
            "moved_aside": list(result.moved_aside)}


def resource_problems(items: list[tuple[str, bytes, str]]) -> list[dict[str, JSON]]:
    return [{"resource": r, "path": path_text(p), "error": e} for r, p, e in items]


def encode_snapshot_result(result: SnapshotResult) -> dict[str, JSON]:
    """{snapshot (record or null), created, objects_written, bytes_written, counters,
    unstable [{resource, path}], unreadable [{resource, path, error}]}."""
    return {"snapshot": encode_optional_record(result.record), "created": result.created,
            "objects_written": result.objects_written,
            "bytes_written": result.bytes_written,
            "counters": asdict(result.counters),
            "unstable": [{"resource": r, "path": path_text(p)} for r, p in result.unstable],
            "unreadable": resource_problems(result.left_out)}


def encode_restore_result(result: RestoreResult) -> dict[str, JSON]:
    """{snapshot, pre_restore (record or null), dry_run, resources_changed,
    files_written, removed, errors [{resource, path, error}], plans {name: plan}}."""
    return {"snapshot": encode_record(result.snapshot),
            "pre_restore": encode_optional_record(result.pre_restore),
            "dry_run": result.dry_run, "resources_changed": result.resources_changed,
            "files_written": result.files_written, "removed": result.removed,
            "errors": resource_problems(result.errors),
            "plans": {name: encode_plan(plan, result.dry_run)
                      for name, plan in result.plans.items()}}


def encode_prune_result(result: PruneResult) -> dict[str, JSON]:
    """{dry_run, deleted [ids], kept {id: [reasons]}, gc {kept, removed} or null}."""
    return {"dry_run": result.dry_run, "deleted": list(result.deleted),
            "kept": {sid: list(reasons) for sid, reasons in result.kept.items()},
            "gc": None if result.gc is None else asdict(result.gc)}
