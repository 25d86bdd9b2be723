"""The control server: the protocol of `protocol.py` on a unix socket, one task per client.

Security and isolation (DESIGN §7):
- the socket is `0600` (set between bind and listen, so no connection can arrive with
  looser permissions) in a directory created `0700` when missing;
- the peer's uid is read with `SO_PEERCRED`: only the daemon's own uid and root are
  answered, anyone else gets a "forbidden" error and is closed;
- a request line is capped (`Limits.max_request_bytes`, "too-large" then close), reading
  one is capped in time (`Limits.read_timeout`, "timeout" then close; this also closes
  idle connections) and so is sending a message to a client that does not read;
- each connection is its own task and every failure inside it ends that connection only.

A request's handler runs in the connection's task while a separate pump task writes its
events and reply, so a client that vanishes mid-request only stops the sending: the
handler (a restore, say) runs to completion. Only the server's own cancellation cancels
handlers; a daemon shutting down first `stop`s the server (new requests are refused) and
waits until the requests under way are answered (`wait_idle`).
"""
from __future__ import annotations

import logging
import os
import socket as stdlib_socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import trio

from dwsd.control.protocol import MAX_REQUEST_BYTES, JSON, EventSink, Handler, \
    Request, RequestId, error_line, event_line, parse_request, result_line
from dwsd.errors import ControlSocketError, DwsdError, PeerRefusedError, ProtocolError, \
    RequestTimeoutError, RequestTooLargeError, ServerBusyError, StoppingError, \
    UnknownOpError

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 128
EVENT_BUFFER = 64          # events queued per request before the oldest new ones drop
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Limits:
    """Caps per connection: one request line's size, the time to read one request line
    (from the moment the server waits for it), the time to send one message; and how
    many connections are served at once (more get a "busy" error and are closed); and how
    long a refused client's remaining input is drained before closing."""

    max_request_bytes: int = MAX_REQUEST_BYTES
    read_timeout: float = 10.0
    write_timeout: float = 10.0
    max_connections: int = 256
    drain_time: float = 1.0


def default_allowed_uids() -> frozenset[int]:
    return frozenset({os.geteuid(), 0})


async def serve_control(socket_path: Path, handlers: Mapping[str, Handler], *,
                        limits: Limits = Limits(),
                        allowed_uids: frozenset[int] | None = None,
                        task_status: trio.TaskStatus["ControlServer"] =
                        trio.TASK_STATUS_IGNORED) -> None:
    """Serve `handlers` on `socket_path` until cancelled; reports readiness (the socket
    accepts connections) through `task_status`, with the `ControlServer`. Raises
    ControlSocketError if the socket cannot be set up, e.g. when another daemon answers
    on it. Removes the socket on exit (unless it has been replaced by another one
    meanwhile)."""
    sock, identity = await bind_control_socket(socket_path)
    server = ControlServer(handlers, limits, allowed_uids or default_allowed_uids())
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, server.handle,
                                [trio.SocketListener(sock)])
            log.info("control socket listening on %s", socket_path)
            task_status.started(server)
    finally:
        remove_socket(socket_path, identity)


# -- socket set-up ----------------------------------------------------------------------

async def bind_control_socket(path: Path) -> tuple[trio.socket.SocketType, tuple[int, int]]:
    """A listening socket at `path` (0600) and its file's (st_dev, st_ino)."""
    prepare_socket_dir(path.parent)
    await clear_stale_socket(path)
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(path))
        os.chmod(path, 0o600)  # before listen(): until then every connect is refused
        sock.listen(LISTEN_BACKLOG)
        st = os.lstat(path)
    except OSError as exc:
        sock.close()
        raise ControlSocketError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    return sock, (st.st_dev, st.st_ino)


def prepare_socket_dir(directory: Path) -> None:
    """Create the socket's directory with mode 0700 if it is missing (an existing one is
    left as it is: it may be the user's own directory)."""
    if directory.is_dir():
        return
    try:
        directory.mkdir(mode=0o700, parents=True)
        os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask
    except FileExistsError:
        pass
    except OSError as exc:
        raise ControlSocketError(f"cannot create socket directory {directory}: "
                                 f"{exc.strerror or exc}") from exc


async def clear_stale_socket(path: Path) -> None:
    """Remove a socket file nobody answers on; raise ControlSocketError if a server
    answers on it or if the path is something other than a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(f"{path} exists and is not a socket; not touching it")
    if await _socket_answers(path):
        raise ControlSocketError(f"another daemon is already answering on {path}")
    log.info("removing stale control socket %s", path)
    path.unlink(missing_ok=True)


async def _socket_answers(path: Path) -> bool:
    probe = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        with trio.move_on_after(2):  # a full backlog blocks connect: someone is there
            await probe.connect(os.fspath(path))
            return True
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        raise ControlSocketError(f"cannot probe existing socket {path}: "
                                 f"{exc.strerror or exc}") from exc
    finally:
        probe.close()


def remove_socket(path: Path, identity: tuple[int, int]) -> None:
    """Unlink `path` if it is still the socket we bound (never another daemon's)."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            path.unlink()
    except OSError:
        pass


def peer_credentials(stream: trio.SocketStream) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix stream socket."""
    raw = stream.socket.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED,
                                   _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


# -- connections ------------------------------------------------------------------------

class ControlServer:
    """What `serve_control` hands its starter: for a shutdown that answers the requests
    under way (`stop`, then `wait_idle`) before the server is cancelled."""

    def __init__(self, handlers: Mapping[str, Handler], limits: Limits,
                 allowed_uids: frozenset[int]) -> None:
        self.handlers = handlers
        self.limits = limits
        self.allowed_uids = allowed_uids
        self.active = 0
        self.stopping = False
        self._running = 0  # requests between their line and their reply
        self._idle = trio.Event()
        self._idle.set()

    def stop(self) -> None:
        """Answer every request from now on with a StoppingError."""
        self.stopping = True

    async def wait_idle(self) -> None:
        """Return once no request is being answered."""
        await self._idle.wait()

    def _begin(self) -> None:
        self._running += 1
        if self._running == 1:
            self._idle = trio.Event()

    def _end(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection, start to end; nothing but cancellation escapes."""
        connection = _Connection(self, stream)
        try:
            if self.active >= self.limits.max_connections:
                await connection.refuse(None, ServerBusyError(
                    f"too many control connections ({self.active}); try again"))
                return
            self.active += 1
            try:
                await connection.run()
            finally:
                self.active -= 1
        except Exception:
            log.exception("control connection failed")


class _LineReader:
    """Reads newline-terminated lines of at most `limit` bytes from a stream."""

    def __init__(self, stream: trio.abc.ReceiveStream, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._buffer = bytearray()
        self._scanned = 0  # no newline before this offset

    async def read_line(self) -> bytes | None:
        """The next line without its newline; None at end of stream. Raises
        RequestTooLargeError past `limit` (the stream is then out of step)."""
        while True:
            newline = self._buffer.find(b"\n", self._scanned)
            if newline >= 0:
                return self._take(newline)
            self._scanned = len(self._buffer)
            if self._scanned > self._limit:
                raise RequestTooLargeError(f"request longer than {self._limit} bytes")
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                return None  # a partial last line without its newline is dropped
            self._buffer += chunk

    def _take(self, newline: int) -> bytes:
        if newline > self._limit:
            raise RequestTooLargeError(f"request longer than {self._limit} bytes")
        line = bytes(self._buffer[:newline])
        del self._buffer[:newline + 1]
        self._scanned = 0
        return line


class _Connection:
    def __init__(self, server: ControlServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.limits = server.limits
        self.stream = stream
        self.reader = _LineReader(stream, self.limits.max_request_bytes)
        self.broken = False

    async def run(self) -> None:
        """Check the peer, then answer requests until end of stream, a broken limit or a
        failed send."""
        if not await self._peer_allowed():
            return
        while not self.broken and (line := await self._next_line()) is not None:
            if line.strip():
                await self._answer(line)

    async def _next_line(self) -> bytes | None:
        """The next request line; None when the connection is to end (the client is
        told why when it broke a limit)."""
        try:
            with trio.fail_after(self.limits.read_timeout):
                return await self.reader.read_line()
        except trio.TooSlowError:
            await self.refuse(None, RequestTimeoutError(
                f"no complete request within {self.limits.read_timeout:g} s"))
        except RequestTooLargeError as exc:
            await self.refuse(None, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return None

    async def _peer_allowed(self) -> bool:
        pid, uid, _ = peer_credentials(self.stream)
        if uid in self.server.allowed_uids:
            return True
        log.warning("refused a control connection from uid %d (pid %d)", uid, pid)
        await self.refuse(None, PeerRefusedError(
            f"uid {uid} may not control this daemon (it runs as uid {os.geteuid()})"))
        return False

    async def refuse(self, request_id: RequestId, exc: DwsdError) -> None:
        """Send one error reply, half-close, and discard what the client still sends for
        a moment; the caller then closes the connection. Closing with unread input makes
        the kernel reset the connection, and the client could lose the reply."""
        log.info("control client closed: %s", exc)
        await self._send_error(request_id, exc)
        with trio.move_on_after(self.server.limits.drain_time):
            try:
                await self.stream.send_eof()
                while await self.stream.receive_some(1 << 16):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _send_error(self, request_id: RequestId, exc: DwsdError) -> None:
        await self._send(error_line(request_id, exc.code, str(exc)))

    async def _answer(self, line: bytes) -> None:
        """Answer one request line (framing is intact whatever it holds)."""
        try:
            request = parse_request(line)
        except ProtocolError as exc:
            await self._send_error(exc.request_id, exc)
            return
        handler = self.server.handlers.get(request.op)
        if handler is None:
            known = ", ".join(sorted(self.server.handlers))
            await self._send_error(request.id, UnknownOpError(
                f"unknown operation {request.op!r} (known: {known})"))
            return
        if self.server.stopping:
            await self._send_error(request.id, StoppingError(
                "dwsd is shutting down; the operation was not started"))
            return
        self.server._begin()
        try:
            await self._run(request, handler)
        finally:
            self.server._end()

    async def _run(self, request: Request, handler: Handler) -> None:
        """Run `handler` while a pump task sends its events; then send the reply."""
        send, receive = trio.open_memory_channel[bytes](EVENT_BUFFER)

        def emit(event: str, data: dict[str, JSON]) -> None:
            try:
                send.send_nowait(event_line(request.id, event, data))
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # events are advisory: a slow or gone client misses some

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, receive)
            async with send:
                reply = await _reply(request, handler, emit)
                try:
                    await send.send(reply)
                except trio.BrokenResourceError:
                    pass  # the client is gone; the work is done all the same

    async def _pump(self, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        async with receive:
            async for line in receive:
                if not await self._send(line):
                    return

    async def _send(self, line: bytes) -> bool:
        """Send one line; False (and the connection marked broken) if that failed or
        took longer than the write timeout."""
        if self.broken:
            return False
        with trio.move_on_after(self.limits.write_timeout):
            try:
                await self.stream.send_all(line)
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        self.broken = True
        return False


async def _reply(request: Request, handler: Handler, emit: EventSink) -> bytes:
    """The reply line for `request`: its result, or the error it raised."""
    try:
        result = await handler(request.args, emit)
        return result_line(request.id, result)
    except Exception as raised:
        exc = _single_leaf(raised)
        if isinstance(exc, DwsdError):
            return error_line(request.id, exc.code, str(exc))
        log.exception("control operation %r failed", request.op)
        return error_line(request.id, "internal",
                          f"internal error in {request.op}: {type(exc).__name__}: {exc}")


def _single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups, else `exc`."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
