"""Every exception dwsd raises on purpose, in one hierarchy.

Edges translate them: the CLI prints `str(exc)` as one line, the control server sends
`{"error": {"code": exc.code, "message": str(exc)}}`, FUSE handlers map to an errno.
"""
from __future__ import annotations


class DwsdError(Exception):
    """Base of all expected errors. `code` is a stable machine-readable name."""

    code = "error"


class ConfigError(DwsdError):
    """The configuration file is invalid; the message names file, line and key."""

    code = "config"


class StoreError(DwsdError):
    """The store cannot be used as asked (missing, wrong format, full disk...)."""

    code = "store"


class StoreLockedError(StoreError):
    """Another process holds the store's writer lock."""

    code = "locked"

    def __init__(self, path: str, pid: int | None) -> None:
        holder = f"pid {pid}" if pid else "an unknown process"
        super().__init__(f"store {path} is in use by {holder}")
        self.pid = pid


class ObjectMissingError(StoreError):
    """An object referenced by the catalog or a tree is not in the store."""

    code = "missing-object"


class CorruptObjectError(StoreError):
    """An object's content does not hash to its name, or does not decode."""

    code = "corrupt-object"


class InvalidIdError(DwsdError):
    """A string given as an object id is not a well-formed id."""

    code = "bad-id"


class RefError(DwsdError):
    """A snapshot reference does not resolve to exactly one snapshot."""

    code = "bad-ref"


class TagError(DwsdError):
    """A tag breaks the tag rules, or is already used by another snapshot."""

    code = "bad-tag"


class UsageError(DwsdError):
    """A request is malformed: unknown resource, conflicting options..."""

    code = "usage"


class CaptureError(DwsdError):
    """A resource could not be captured at all (its root is missing, say)."""

    code = "capture"


class RestoreError(DwsdError):
    """A restore could not be planned or applied."""

    code = "restore"
