"""A small blocking client of the control protocol, for `dwsctl` and `dwsd.api`.

    with ControlClient(find_socket()) as client:
        snapshots = client.call("list", {"limit": 5})

`call` sends one request and blocks until its reply, passing events to `on_event`.
Failures are `DwsdError`s: `DaemonNotRunning` (nothing answers at the socket; the message
names it), `ConnectError` (the socket exists but cannot be used), `ConnectionLostError`
(the daemon went away mid-request), `RemoteError` (the daemon answered with an error;
`code` is its code).
"""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any, Callable, Mapping

from dwsd.config import default_config_path, load_config, socket_only
from dwsd.control.protocol import JSON, parse_reply, request_line
from dwsd.errors import ConfigError, ConnectError, ConnectionLostError, DaemonNotRunning, \
    ProtocolError, RemoteError, UsageError

EventCallback = Callable[[str, dict[str, JSON]], None]
_NOT_RUNNING = (errno.ENOENT, errno.ECONNREFUSED)


def find_socket(socket_path: str | os.PathLike[str] | None = None,
                config: str | os.PathLike[str] | None = None,
                environ: Mapping[str, str] = os.environ,
                on_broken: Callable[[ConfigError, Path], None] | None = None) -> Path:
    """The daemon's socket: `socket_path`, else `config`'s socket, else $DWSD_SOCKET,
    else $DWSD_CONFIG's socket, else the socket of ~/.config/dwsd/config.yaml. A config
    that does not load still gives the socket it names, if it can be read (the daemon
    keeps its last good configuration): `on_broken(error, socket)` is told. Raises
    ConfigError (a config that does not load, not even its socket) or UsageError
    (nothing to go by)."""
    if socket_path:
        return Path(socket_path)
    if config:
        return _config_socket(config, on_broken)
    if environ.get("DWSD_SOCKET"):
        return Path(environ["DWSD_SOCKET"])
    if environ.get("DWSD_CONFIG"):
        return _config_socket(environ["DWSD_CONFIG"], on_broken)
    default = default_config_path(environ)
    if default.exists():
        return _config_socket(default, on_broken)
    raise UsageError("no daemon socket known: give --socket or --config, set DWSD_SOCKET "
                     f"or DWSD_CONFIG, or create {default}")


def _config_socket(config: str | os.PathLike[str],
                   on_broken: Callable[[ConfigError, Path], None] | None) -> Path:
    try:
        return load_config(config).socket
    except ConfigError as exc:
        socket_path = socket_only(config)
        if socket_path is None:
            raise ConfigError(f"{exc} (give the daemon's socket with --socket)") from exc
        if on_broken is not None:
            on_broken(exc, socket_path)
        return socket_path


class ControlClient:
    """One connection to the daemon, opened at the first call; not thread-safe."""

    def __init__(self, socket_path: Path, timeout: float | None = None) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self._next_id = 1

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = None

    def connect(self) -> None:
        """Connect (blocks); raises DaemonNotRunning or ConnectError."""
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(self.socket_path))
        except OSError as exc:
            sock.close()
            if exc.errno in _NOT_RUNNING:
                raise DaemonNotRunning(self.socket_path) from None
            raise ConnectError(f"cannot connect to dwsd at {self.socket_path}: "
                               f"{exc.strerror or exc}") from None
        self._sock = sock
        self._reader = sock.makefile("rb")

    def call(self, op: str, args: Mapping[str, JSON] | None = None,
             on_event: EventCallback | None = None) -> JSON:
        """Send `op(args)` and block until its result, which is returned. Events for
        this request go to `on_event(name, data)`. Raises RemoteError for an error reply,
        DaemonNotRunning, ConnectError, ConnectionLostError."""
        self.connect()
        request_id = self._next_id
        self._next_id += 1
        self._send(request_line(request_id, op, args or {}))
        while True:  # read even if sending failed: the daemon may have said why
            message = self._receive()
            if "event" in message:
                if on_event is not None and message.get("id") == request_id:
                    on_event(str(message["event"]), dict(message.get("data") or {}))
                continue
            if "error" in message:
                error = message["error"] or {}
                raise RemoteError(str(error.get("code", "error")),
                                  str(error.get("message", "the daemon reported an error")))
            if message.get("id") == request_id:
                return message["result"]

    def _send(self, line: bytes) -> None:
        """Send a request; a failure is left for the read that follows to report."""
        assert self._sock is not None
        try:
            self._sock.sendall(line)
        except OSError:
            pass

    def _receive(self) -> dict[str, JSON]:
        try:
            line = self._reader.readline()
        except OSError as exc:
            self.close()
            raise ConnectionLostError(f"lost the connection to dwsd at {self.socket_path}: "
                                      f"{exc.strerror or exc}") from None
        if not line.endswith(b"\n"):
            self.close()
            raise ConnectionLostError(f"dwsd at {self.socket_path} closed the connection "
                                      "before answering")
        try:
            return parse_reply(line)
        except ProtocolError:
            self.close()
            raise


def call(op: str, args: Mapping[str, JSON] | None = None,
         on_event: EventCallback | None = None, *,
         socket_path: str | os.PathLike[str] | None = None,
         config: str | os.PathLike[str] | None = None) -> JSON:
    """One request on a fresh connection (socket found as `find_socket` does)."""
    with ControlClient(find_socket(socket_path, config)) as client:
        return client.call(op, args, on_event)
