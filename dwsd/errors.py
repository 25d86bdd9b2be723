"""Every exception dwsd raises on purpose, in one hierarchy.

Edges translate them: the CLI prints `str(exc)` as one line, the control server sends
`{"error": {"code": exc.code, "message": str(exc)}}`, FUSE handlers map to an errno.
"""
from __future__ import annotations

import os


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


class ResourceMissingError(CaptureError):
    """A resource's directory cannot be opened (gone, unmounted, not a directory)."""


class RestoreError(DwsdError):
    """A restore could not be planned or applied."""

    code = "restore"


# -- the control socket and the view ------------------------------------------------

class ConnectError(DwsdError):
    """The control socket exists but cannot be connected to (permissions, say)."""

    code = "connect"


class DaemonNotRunning(ConnectError):
    """No daemon answers at the socket path (named in the message)."""

    code = "not-running"

    def __init__(self, path: os.PathLike[str] | str) -> None:
        super().__init__(f"dwsd is not running (no daemon answers at {path})")
        self.path = path


class ConnectionLostError(DwsdError):
    """The daemon closed the connection before it answered."""

    code = "disconnected"


class RemoteError(DwsdError):
    """The daemon answered a request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ProtocolError(DwsdError):
    """A line that is not a valid request or reply; `request_id` is the request's id
    when it could be read (so the error reply can name it)."""

    code = "bad-request"

    def __init__(self, message: str, request_id: int | str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class VersionError(ProtocolError):
    """A request for a protocol version this daemon does not speak."""

    code = "bad-version"


class UnknownOpError(DwsdError):
    """A request names an operation the daemon does not have."""

    code = "unknown-op"


class ControlSocketError(DwsdError):
    """The control socket cannot be set up (path in use, not a socket, too long...)."""

    code = "socket"


class RequestTooLargeError(DwsdError):
    code = "too-large"


class RequestTimeoutError(DwsdError):
    code = "timeout"


class PeerRefusedError(DwsdError):
    code = "forbidden"


class ServerBusyError(DwsdError):
    code = "busy"


class StoppingError(DwsdError):
    """The daemon is shutting down: the operation asked for was not started."""

    code = "stopping"


class MountError(DwsdError):
    """The view cannot be mounted where asked (not a directory, already mounted...)."""

    code = "mount"
