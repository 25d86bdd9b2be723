"""The integration API for scripts and notebooks, named after Data Workspaces' own
(`dataworkspaces.api`) so its users feel at home; every call goes to the running daemon.

    from dwsd import api
    h = api.take_snapshot(tag="before-training", message="baseline data")
    for s in api.get_snapshot_history(reverse=True, max_count=5):
        print(s.snapshot_number, s.hashval, s.tags, s.message)
    api.restore("before-training", only=["data"])

Every function takes `config=` (a dwsd config file) or `socket=` (the daemon's socket);
with neither, the daemon is found as `dwsctl` finds it ($DWSD_SOCKET, $DWSD_CONFIG,
~/.config/dwsd/config.yaml). Every function blocks until the daemon has answered and
raises `dwsd.errors.DwsdError`: `DaemonNotRunning` when no daemon answers, `RemoteError`
(with the daemon's `code`) when it refused the request.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence

from dwsd.control.client import call
from dwsd.errors import DaemonNotRunning, RemoteError

__all__ = ["SnapshotInfo", "ResourceInfo", "take_snapshot", "get_snapshot_history",
           "restore", "get_resource_info", "delete_snapshot", "DaemonNotRunning",
           "RemoteError"]

PathLike = str | os.PathLike[str] | None


class SnapshotInfo(NamedTuple):
    """One snapshot. The first six fields are Data Workspaces' `SnapshotInfo`;
    `timestamp` is ISO 8601 UTC and `metrics` is always None (dwsd keeps none)."""

    snapshot_number: int
    hashval: str
    tags: list[str]
    timestamp: str
    message: str
    metrics: dict[str, Any] | None
    id: str
    kind: str
    counts: dict[str, int]
    resources: dict[str, str]


class ResourceInfo(NamedTuple):
    """A configured resource, as Data Workspaces' `ResourceInfo`."""

    name: str
    role: str
    resource_type: str
    local_path: str | None


def _snapshot_info(doc: dict[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(snapshot_number=doc["number"], hashval=doc["hash"],
                        tags=list(doc["tags"]), timestamp=doc["time"],
                        message=doc["message"], metrics=None, id=doc["id"],
                        kind=doc["kind"], counts=dict(doc["counts"]),
                        resources=dict(doc["resources"]))


def take_snapshot(tag: str | None = None, message: str = "", *, config: PathLike = None,
                  socket: PathLike = None) -> str:
    """Take a manual snapshot of every resource, tagged `tag` if given. Returns the
    snapshot's hash (usable as a reference for `restore`). If nothing changed since an
    existing snapshot, that snapshot's hash is returned and the tag and message are
    added to it."""
    result = call("snapshot", {"tags": [tag] if tag else [], "message": message},
                  socket_path=socket, config=config)
    return str(result["snapshot"]["hash"])


def get_snapshot_history(reverse: bool = False, max_count: int | None = None, *,
                         kind: str | None = None, config: PathLike = None,
                         socket: PathLike = None) -> list[SnapshotInfo]:
    """The snapshots as `SnapshotInfo`s, oldest first (newest first with `reverse`).
    With `max_count`, at most that many, taken from the start of that order (as Data
    Workspaces does). `kind` keeps only "manual", "periodic" or "pre-restore" ones."""
    docs = call("list", {"kind": kind}, socket_path=socket, config=config)
    infos = [_snapshot_info(d) for d in docs]  # the daemon lists newest first
    if not reverse:
        infos.reverse()
    return infos if max_count is None else infos[:max_count]


def restore(ref: str, only: Sequence[str] | None = None,
            leave: Sequence[str] | None = None, *, config: PathLike = None,
            socket: PathLike = None) -> int:
    """Restore the snapshot `ref` (a tag, id, hash prefix or "latest") in place, after a
    pre-restore snapshot of the live files. `only` restores just those resources,
    `leave` all but those (not both); `results` resources are never restored in place.
    Returns the number of resources changed, as Data Workspaces' `restore` does."""
    result = call("restore", {"ref": ref, "only": list(only) if only else None,
                              "leave": list(leave) if leave else None},
                  socket_path=socket, config=config)
    return int(result["resources_changed"])


def get_resource_info(*, config: PathLike = None, socket: PathLike = None
                      ) -> list[ResourceInfo]:
    """The workspace's resources, in configuration order, as `ResourceInfo`s
    (`resource_type` is always "local-files")."""
    docs = call("resources", {}, socket_path=socket, config=config)
    return [ResourceInfo(name=d["name"], role=d["role"], resource_type="local-files",
                         local_path=str(d["path"])) for d in docs]


def delete_snapshot(ref: str, *, config: PathLike = None, socket: PathLike = None
                    ) -> SnapshotInfo:
    """Delete the snapshot `ref` (its tags go with it; its data is freed at the next
    prune/gc). Returns what the deleted snapshot was."""
    return _snapshot_info(call("delete", {"ref": ref}, socket_path=socket, config=config))
