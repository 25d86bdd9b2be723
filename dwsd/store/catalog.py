"""The catalog: every snapshot's record and its tags, in one JSON file.

The whole catalog is one file replaced atomically (temp + fsync + rename + dir fsync), so a
snapshot, a tag move or a delete is all-or-nothing without a multi-file protocol. Callers
must have made every object a new record references durable *before* `commit`.

References resolve as `latest`, a tag, an id, or a hash prefix of >= 4 hex digits naming
one content (several records of one hash, such as an undo point of an already saved state,
resolve to the newest); tags may look like none of the others, so a reference never has
two readings.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from dwsd.errors import CorruptObjectError, RefError, StoreError, TagError
from dwsd.store.fsutil import atomic_write
from dwsd.store.ids import ObjectId, hash_bytes, validate_object_id

CATALOG_VERSION = 1
KINDS = ("manual", "periodic", "pre-restore")
ID_FORMAT = "%Y%m%dT%H%M%SZ"
_ID_RE = re.compile(r"\d{8}T\d{6}Z\Z")
_HASH_PREFIX_RE = re.compile(r"[0-9a-f]{4,64}\Z")
MAX_TAG_BYTES = 128


@dataclass(frozen=True)
class Counts:
    """Sizes of a snapshot: all files, and what this snapshot changed (files new or
    with new content), removed and added to the store."""

    files: int = 0
    bytes: int = 0
    changed_files: int = 0
    added_bytes: int = 0
    removed_files: int = 0  # 0 in records written before it was counted


_COUNT_FIELDS = frozenset(f.name for f in fields(Counts))

# A resource's top directory: (mode, uid, gid, mtime_ns). Kept in the record, not in the
# content hash: the top directory has no parent tree to hold it.
RootMeta = tuple[int, int, int, int]


@dataclass(frozen=True)
class SnapshotRecord:
    """One snapshot as the catalog knows it. `hash` identifies the content."""

    id: str
    hash: ObjectId
    number: int
    kind: str
    tags: tuple[str, ...]
    message: str
    hostname: str
    time: dt.datetime
    resources: Mapping[str, ObjectId]
    counts: Counts = field(default_factory=Counts)
    root_meta: Mapping[str, RootMeta] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        # Field by field: every catalog commit writes every record, and `asdict` (which
        # deep-copies the datetime) took 37 µs a record, 8 times this.
        c = self.counts
        return {"id": self.id, "hash": self.hash, "number": self.number,
                "kind": self.kind, "tags": list(self.tags), "message": self.message,
                "hostname": self.hostname, "time": format_time(self.time),
                "resources": dict(self.resources),
                "counts": {"files": c.files, "bytes": c.bytes,
                           "changed_files": c.changed_files, "added_bytes": c.added_bytes,
                           "removed_files": c.removed_files},
                "root_meta": {k: list(v) for k, v in self.root_meta.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SnapshotRecord":
        return cls(
            id=str(d["id"]), hash=validate_object_id(d["hash"]), number=int(d["number"]),
            kind=str(d["kind"]), tags=tuple(str(t) for t in d["tags"]),
            message=str(d["message"]), hostname=str(d["hostname"]),
            time=parse_time(d["time"]),
            resources={str(k): validate_object_id(v) for k, v in d["resources"].items()},
            # Only the counts this version knows: a newer one may add some.
            counts=Counts(**{k: int(v) for k, v in d.get("counts", {}).items()
                             if k in _COUNT_FIELDS}),
            root_meta={str(k): (int(v[0]), int(v[1]), int(v[2]), int(v[3]))
                       for k, v in d.get("root_meta", {}).items()},
        )


def format_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(dt.timezone.utc)


def manifest_hash(resources: Mapping[str, ObjectId]) -> ObjectId:
    """The snapshot hash: the id of its canonical manifest (resource name -> root tree)."""
    lines = "".join(f"{name}\t{resources[name]}\n" for name in sorted(resources))
    return hash_bytes(b"dwsd-manifest-1\n" + lines.encode())


def snapshot_id_for(time: dt.datetime, taken: Iterable[str]) -> str:
    """A sortable UTC id for `time`; moved on by whole seconds past ids already taken."""
    used = set(taken)
    t = time.astimezone(dt.timezone.utc).replace(microsecond=0)
    while (sid := t.strftime(ID_FORMAT)) in used:
        t += dt.timedelta(seconds=1)
    return sid


def check_tag(tag: str) -> None:
    """Raise TagError unless `tag` is a valid, filename-safe tag."""
    if not isinstance(tag, str) or not tag:
        raise TagError("a tag must be a non-empty string")
    try:
        encoded = tag.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, smuggled in as surrogates
        raise TagError(f"tag {tag!r} is not valid UTF-8") from None
    if len(encoded) > MAX_TAG_BYTES:
        raise TagError(f"tag {tag!r} is longer than {MAX_TAG_BYTES} bytes")
    if "/" in tag or tag in (".", "..") or any(ord(c) < 32 or c == "\x7f" for c in tag):
        raise TagError(f"tag {tag!r} is not a safe file name (no '/', control characters, "
                       "'.' or '..')")
    # A view directory named " " or ".x" is invisible or hidden to `ls`, and "-x" reads
    # as an option to every tool given its path.
    if tag != tag.strip() or tag[0] in ".-":
        raise TagError(f"tag {tag!r} starts with '.' or '-', or with or ends in white "
                       "space")
    if tag == "latest" or _ID_RE.match(tag) or _HASH_PREFIX_RE.match(tag):
        raise TagError(f"tag {tag!r} could be read as a snapshot id, hash or 'latest'")


class Catalog:
    """The snapshot records of one store, loaded in memory; writes replace the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.snapshots: dict[str, SnapshotRecord] = {}
        self.next_number = 1

    @classmethod
    def load(cls, path: Path) -> "Catalog":
        catalog = cls(path)
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return catalog
        except (OSError, ValueError) as exc:
            raise StoreError(f"catalog {path} cannot be read: {exc}") from exc
        if raw.get("version") != CATALOG_VERSION:
            raise StoreError(f"catalog {path} has version {raw.get('version')!r}, "
                             f"this dwsd reads {CATALOG_VERSION}")
        try:
            for d in raw["snapshots"]:
                rec = SnapshotRecord.from_json(d)
                catalog.snapshots[rec.id] = rec
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptObjectError(f"catalog {path} is corrupt: {exc}") from exc
        catalog.next_number = int(raw.get("next_number", len(catalog.snapshots) + 1))
        return catalog

    def commit(self) -> None:
        """Write the catalog durably and atomically (blocks). One JSON document, a
        snapshot a line (oldest first): every snapshot commits the whole catalog, and
        indented, which only Python's own encoder writes, it took 10 ms at 500
        snapshots where compact lines from the C encoder take 3."""
        lines = [json.dumps(r.to_json(), sort_keys=True) for r in self.history()[::-1]]
        head = json.dumps({"version": CATALOG_VERSION, "next_number": self.next_number})
        body = "\n" + ",\n".join(lines) + "\n" if lines else ""
        atomic_write(self.path, f'{head[:-1]}, "snapshots": [{body}]}}\n'.encode())

    # -- queries ------------------------------------------------------------------------

    def history(self, limit: int | None = None, kind: str | None = None
                ) -> list[SnapshotRecord]:
        """Snapshots newest first, optionally of one kind and at most `limit` of them."""
        recs = sorted(self.snapshots.values(), key=lambda r: (r.time, r.id), reverse=True)
        if kind is not None:
            recs = [r for r in recs if r.kind == kind]
        return recs[:limit] if limit is not None else recs

    def latest(self) -> SnapshotRecord | None:
        recs = self.history(limit=1)
        return recs[0] if recs else None

    def by_hash(self, h: ObjectId) -> SnapshotRecord | None:
        return next((r for r in self.snapshots.values() if r.hash == h), None)

    def by_tag(self, tag: str) -> SnapshotRecord | None:
        return next((r for r in self.snapshots.values() if tag in r.tags), None)

    def tags(self) -> dict[str, str]:
        """tag -> snapshot id."""
        return {t: r.id for r in self.snapshots.values() for t in r.tags}

    def resolve(self, ref: str) -> SnapshotRecord:
        """Resolve a reference; raise RefError naming what was wrong."""
        if not isinstance(ref, str) or not ref:
            raise RefError("an empty snapshot reference")
        if ref == "latest":
            if (latest := self.latest()) is None:
                raise RefError("'latest': there are no snapshots yet")
            return latest
        if (rec := self.by_tag(ref)) is not None:
            return rec
        if ref in self.snapshots:
            return self.snapshots[ref]
        if _HASH_PREFIX_RE.match(ref):
            return self._by_hash_prefix(ref)
        raise RefError(f"no snapshot matches {ref!r} (a tag, id, hash prefix or 'latest')")

    def _by_hash_prefix(self, prefix: str) -> SnapshotRecord:
        """The newest snapshot whose hash starts with `prefix`. Several records of one
        content (an undo point taken of a state already saved) are one answer; a
        prefix of different hashes is ambiguous. Raises RefError."""
        found = [r for r in self.history() if r.hash.startswith(prefix)]
        hashes = {r.hash for r in found}
        if len(hashes) > 1:
            raise RefError(f"hash prefix {prefix!r} is ambiguous: {len(hashes)} "
                           "different snapshot hashes")
        if not found:
            raise RefError(f"no snapshot matches {prefix!r} (a tag, id, hash prefix or "
                           "'latest')")
        return found[0]

    # -- changes (in memory until commit) ------------------------------------------------

    def add(self, rec: SnapshotRecord) -> SnapshotRecord:
        """Add a new record, giving it the next number."""
        for tag in rec.tags:
            self._check_free(tag, None)
        rec = replace(rec, number=self.next_number)
        self.next_number += 1
        self.snapshots[rec.id] = rec
        return rec

    def merge(self, rec: SnapshotRecord, tags: Iterable[str], message: str,
              kind: str | None = None) -> SnapshotRecord:
        """Add tags and a message to an existing record (same content taken again).
        `kind` "manual" (a snapshot asked for by hand) makes a periodic record manual:
        retention must not drop what a user asked to keep."""
        new_tags = [t for t in tags if t not in rec.tags]
        for tag in new_tags:
            self._check_free(tag, rec.id)
        if message and message not in rec.message.split("\n"):
            message = f"{rec.message}\n{message}" if rec.message else message
        else:
            message = rec.message
        promoted = "manual" if kind == "manual" and rec.kind == "periodic" else rec.kind
        rec = replace(rec, tags=rec.tags + tuple(new_tags), message=message, kind=promoted)
        self.snapshots[rec.id] = rec
        return rec

    def tag(self, ref: str, tag: str) -> SnapshotRecord:
        check_tag(tag)
        return self.merge(self.resolve(ref), [tag], "")

    def untag(self, tag: str) -> SnapshotRecord:
        rec = self.by_tag(tag)
        if rec is None:
            raise TagError(f"no snapshot has tag {tag!r}")
        rec = replace(rec, tags=tuple(t for t in rec.tags if t != tag))
        self.snapshots[rec.id] = rec
        return rec

    def remove(self, snapshot_id: str) -> SnapshotRecord:
        return self.snapshots.pop(snapshot_id)

    def _check_free(self, tag: str, owner: str | None) -> None:
        check_tag(tag)
        holder = self.by_tag(tag)
        if holder is not None and holder.id != owner:
            raise TagError(f"tag {tag!r} is already on snapshot {holder.id}")

    def new_id(self, time: dt.datetime) -> str:
        return snapshot_id_for(time, self.snapshots)


def hostname() -> str:
    return os.uname().nodename
