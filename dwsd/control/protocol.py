"""The control protocol: newline-delimited JSON over a unix socket (see docs/protocol.md).

A request is one line, `{"v": 1, "id": N, "op": "list", "args": {...}}`. For each request
the server sends zero or more `{"id": N, "event": "progress", "data": {...}}` lines, then
exactly one `{"id": N, "result": ...}` or `{"id": N, "error": {"code": ..., "message":
...}}`. Requests on one connection are answered in order.

Everything is JSON with `ensure_ascii`, so a line is pure ASCII. Byte paths cross as str
through `os.fsdecode` (surrogateescape): a non-UTF-8 name becomes lone surrogates, which
JSON escapes as `\\udcXX` and `os.fsencode` turns back into the same bytes.

This module only frames and parses messages (no I/O, never blocks, imports nothing
heavy: the client uses it); `encode.py` turns dwsd's results into JSON values.
"""
from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

from dwsd.errors import ProtocolError, VersionError

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 1 << 20

JSON = Any
RequestId = int | str | None
# Sends one event for the request being handled; never blocks (events may be dropped
# when the client reads too slowly, the final reply never is).
EventSink = Callable[[str, dict[str, JSON]], None]
Handler = Callable[[Mapping[str, JSON], EventSink], Awaitable[JSON]]

@dataclass(frozen=True)
class Request:
    id: RequestId
    op: str
    args: dict[str, JSON]


# -- framing ----------------------------------------------------------------------------

def encode_line(message: Mapping[str, JSON]) -> bytes:
    """One message as an ASCII JSON line ending in a newline. Paths and bytes become
    str (os.fsdecode), datetimes ISO 8601 UTC; anything else not JSON raises TypeError."""
    return json.dumps(message, ensure_ascii=True, separators=(",", ":"),
                      default=_json_default).encode() + b"\n"


def _json_default(value: object) -> JSON:
    if isinstance(value, (bytes, os.PathLike)):
        return os.fsdecode(value)
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def request_line(request_id: RequestId, op: str, args: Mapping[str, JSON]) -> bytes:
    return encode_line({"v": PROTOCOL_VERSION, "id": request_id, "op": op,
                        "args": dict(args)})


def result_line(request_id: RequestId, result: JSON) -> bytes:
    return encode_line({"id": request_id, "result": result})


def error_line(request_id: RequestId, code: str, message: str) -> bytes:
    return encode_line({"id": request_id, "error": {"code": code, "message": message}})


def event_line(request_id: RequestId, event: str, data: Mapping[str, JSON]) -> bytes:
    return encode_line({"id": request_id, "event": event, "data": dict(data)})


def parse_request(line: bytes) -> Request:
    """Decode a request line. Raises ProtocolError (bad JSON or shape) or VersionError;
    the error's `request_id` attribute holds the id when one could be read."""
    try:
        doc = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"request is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("request must be a JSON object")
    request_id = doc.get("id")
    if not _valid_id(request_id):
        raise ProtocolError("request 'id' must be an integer or a string")
    try:
        return _check_request(doc, request_id)
    except ProtocolError as exc:
        exc.request_id = request_id
        raise


def _valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (str, int))


def _check_request(doc: dict[str, JSON], request_id: RequestId) -> Request:
    if doc.get("v") != PROTOCOL_VERSION:
        raise VersionError(f"protocol version {doc.get('v')!r} is not supported "
                           f"(this daemon speaks {PROTOCOL_VERSION})")
    unknown = set(doc) - {"v", "id", "op", "args"}
    if unknown:
        raise ProtocolError(f"unknown request fields: {', '.join(sorted(unknown))}")
    op, args = doc.get("op"), doc.get("args", {})
    if not isinstance(op, str) or not op:
        raise ProtocolError("request 'op' must be a non-empty string")
    if not isinstance(args, dict):
        raise ProtocolError("request 'args' must be a JSON object")
    return Request(request_id, op, args)


def parse_reply(line: bytes) -> dict[str, JSON]:
    """Decode a reply line (client side). Raises ProtocolError if it is not one."""
    try:
        doc = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"the daemon sent a line that is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not ({"result", "error", "event"} & set(doc)):
        raise ProtocolError(f"the daemon sent an unexpected message: {line[:200]!r}")
    return doc
