"""The control server on a real unix socket, over a real workspace: the protocol, socket
set-up, and abuse (other uids, oversized or invalid requests, slow and vanishing
clients, many clients at once)."""
from __future__ import annotations

import json
import os
import stat
import textwrap
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import pytest
import trio

from dwsd.control.client import ControlClient
from dwsd.errors import ControlSocketError, DaemonNotRunning, RemoteError
from dwsd.control.ops import make_handlers
from dwsd.control.protocol import EventSink, JSON, request_line
from dwsd.control.server import Limits, serve_control
from dwsd.errors import RefError
from tests.test_control_support import DATA_FILES, TEST_LIMITS, Served, \
    WorkspaceScheduler, served, short_dir, workspace  # noqa: F401 (fixtures)

TIMEOUT = 20


async def call(socket_path: Path, op: str, args: Mapping[str, JSON] | None = None,
               events: list[tuple[str, dict[str, Any]]] | None = None) -> Any:
    """One request through the real blocking client, in a worker thread."""
    def on_event(name: str, data: dict[str, Any]) -> None:
        if events is not None:
            events.append((name, data))

    def work() -> Any:
        with ControlClient(socket_path) as client:
            return client.call(op, args, on_event)
    return await trio.to_thread.run_sync(work)


async def read_messages(stream: trio.SocketStream) -> list[dict[str, Any]]:
    """Every message the server sends until it closes (or resets: closing with our
    unread bytes in its queue makes the kernel report ECONNRESET after the data)."""
    data = b""
    try:
        while chunk := await stream.receive_some():
            data += chunk
    except trio.BrokenResourceError:
        pass
    return [json.loads(line) for line in data.splitlines()]


async def read_message(stream: trio.SocketStream, buffer: bytearray) -> dict[str, Any]:
    while b"\n" not in buffer:
        chunk = await stream.receive_some()
        assert chunk, "server closed the connection"
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return dict(json.loads(line))


def error_code(message: dict[str, Any]) -> str:
    return str(message["error"]["code"])


# -- basics -----------------------------------------------------------------------------

async def test_list_answers_with_records(served: Served) -> None:
    with trio.fail_after(TIMEOUT):
        await call(served.socket, "snapshot", {"tags": ["v1"], "message": "one"})
        listed = await call(served.socket, "list", {})
    assert [(s["number"], s["tags"], s["message"]) for s in listed] == [(1, ["v1"], "one")]


async def test_several_requests_on_one_connection_are_answered_in_order(served: Served
                                                                        ) -> None:
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_unix_socket(os.fspath(served.socket))
        async with stream:
            await stream.send_all(request_line(1, "status", {}) +
                                  request_line(2, "resources", {}))
            buffer = bytearray()
            first, second = await read_message(stream, buffer), await read_message(stream,
                                                                                   buffer)
    assert first == {"id": 1, "result": {"workspace": "test", "queue": 0}}
    assert second["id"] == 2 and second["result"][0]["name"] == "data"


async def test_socket_is_0600_in_a_0700_dir_and_removed_on_exit(
        workspace: Any) -> None:
    path: Path = workspace.config.socket
    handlers = make_handlers(WorkspaceScheduler(workspace))
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, handlers)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
            nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_stale_socket_is_replaced(workspace: Any) -> None:
    import socket
    path: Path = workspace.config.socket
    path.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(path))  # bound, never listening: nobody answers
    stale.close()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path,
                                make_handlers(WorkspaceScheduler(workspace)))
            assert await call(path, "status") == {"workspace": "test", "queue": 0}
            nursery.cancel_scope.cancel()


async def test_second_server_on_a_live_socket_is_refused(served: Served) -> None:
    handlers = make_handlers(served.scheduler)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ControlSocketError, match="another"):
            await serve_control(served.socket, handlers)
        assert await call(served.socket, "status")  # the first one is undisturbed


def test_client_names_the_socket_when_nothing_listens(short_dir: Path) -> None:
    with pytest.raises(DaemonNotRunning, match=str(short_dir / "none.sock")):
        ControlClient(short_dir / "none.sock").call("list")


# -- errors -----------------------------------------------------------------------------

async def test_dwsd_errors_keep_their_code(served: Served) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(RemoteError) as info:
        await call(served.socket, "show", {"ref": "nosuch"})
    assert info.value.code == RefError.code and "nosuch" in str(info.value)


async def test_bad_args_are_usage_errors(served: Served) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(RemoteError) as info:
        await call(served.socket, "list", {"limit": "ten"})
    assert info.value.code == "usage"


async def test_unexpected_exception_is_internal_and_logged(
        short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(args: Mapping[str, JSON], emit: EventSink) -> JSON:
        raise KeyError("boom")
    path = short_dir / "s.sock"
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, {"broken": broken})
            with pytest.raises(RemoteError) as info:
                await call(path, "broken")
            nursery.cancel_scope.cancel()
    assert info.value.code == "internal"
    assert any("'broken' failed" in r.getMessage() for r in caplog.records)
    caplog.clear()


# -- abuse ------------------------------------------------------------------------------

async def test_invalid_json_gets_bad_request_and_the_connection_goes_on(served: Served
                                                                        ) -> None:
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_unix_socket(os.fspath(served.socket))
        async with stream:
            await stream.send_all(b"{not json\n" + request_line(2, "status", {}))
            buffer = bytearray()
            bad, good = await read_message(stream, buffer), await read_message(stream,
                                                                               buffer)
    assert error_code(bad) == "bad-request" and bad["id"] is None
    assert good["id"] == 2 and "result" in good


async def test_unknown_op_is_refused_by_name(served: Served) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(RemoteError) as info:
        await call(served.socket, "format-disk")
    assert info.value.code == "unknown-op" and "format-disk" in str(info.value)


async def test_oversized_request_gets_too_large_then_close(served: Served) -> None:
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_unix_socket(os.fspath(served.socket))
        async with stream:
            try:
                await stream.send_all(b"x" * (TEST_LIMITS.max_request_bytes + 100_000))
            except trio.BrokenResourceError:
                pass  # the server closed first; its reply is still readable
            messages = await read_messages(stream)
        assert [error_code(m) for m in messages] == ["too-large"]
        assert await call(served.socket, "status")


async def test_slow_client_is_timed_out_while_others_are_answered(served: Served) -> None:
    with trio.fail_after(TIMEOUT):
        slow = await trio.open_unix_socket(os.fspath(served.socket))
        async with slow:
            await slow.send_all(b'{"v": 1, "id": 1, "op": "li')  # ... and stalls
            assert await call(served.socket, "status")  # others meanwhile: answered
            start = trio.current_time()
            messages = await read_messages(slow)
            waited = trio.current_time() - start
    assert [error_code(m) for m in messages] == ["timeout"]
    assert waited < TEST_LIMITS.read_timeout + 2


async def test_client_closing_mid_request_line_is_harmless(served: Served) -> None:
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_unix_socket(os.fspath(served.socket))
        await stream.send_all(b'{"v": 1, "id"')
        await stream.aclose()
        assert await call(served.socket, "status")


NOBODY_CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sys.argv[1])
    except OSError as e:
        print("connect-failed", e.errno)
        sys.exit(0)
    try:
        s.sendall(b'{"v":1,"id":1,"op":"list","args":{}}\\n')
    except OSError:
        pass  # refused before it spoke: the reply is still there to read
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    sys.stdout.write(data.decode())
""")


async def run_as_nobody(socket_path: Path) -> str:
    proc = await trio.run_process(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "/usr/bin/python3", "-c", NOBODY_CLIENT, os.fspath(socket_path)],
        capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv to another uid needs root")
async def test_socket_permissions_keep_other_uids_out(served: Served) -> None:
    os.chmod(served.socket.parent.parent, 0o755)
    os.chmod(served.socket.parent, 0o755)  # for this test only: let uid 65534 reach it
    with trio.fail_after(TIMEOUT):
        out = await run_as_nobody(served.socket)
    assert out.split() == ["connect-failed", "13"]  # EACCES: the socket is 0600


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv to another uid needs root")
async def test_peer_with_another_uid_is_refused(served: Served,
                                                caplog: pytest.LogCaptureFixture) -> None:
    os.chmod(served.socket.parent.parent, 0o755)
    os.chmod(served.socket.parent, 0o755)
    os.chmod(served.socket, 0o666)  # past the permissions: SO_PEERCRED must refuse it
    with trio.fail_after(TIMEOUT):
        out = await run_as_nobody(served.socket)
        assert await call(served.socket, "status")
    [reply] = [json.loads(line) for line in out.splitlines()]
    assert error_code(reply) == "forbidden" and "uid 65534" in reply["error"]["message"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith("refused a control connection from uid 65534")
    caplog.clear()


async def test_fifty_clients_list_while_a_snapshot_runs(served: Served) -> None:
    served.scheduler.snapshot_gate = gate = trio.Event()
    answers: list[Any] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async def snapshot() -> None:
                await call(served.socket, "snapshot", {"tags": ["during"]})
            nursery.start_soon(snapshot)
            await served.scheduler.snapshot_started.wait()

            async def lister() -> None:
                answers.append(await trio.to_thread.run_sync(
                    lambda: ControlClient(served.socket).call("list"),
                    limiter=limiter))
            limiter = trio.CapacityLimiter(50)
            async with trio.open_nursery() as clients:
                for _ in range(50):
                    clients.start_soon(lister)
            assert not gate.is_set()  # all answered while the snapshot was held
            gate.set()
        listed = await call(served.socket, "list")
    assert answers == [[]] * 50
    assert [s["tags"] for s in listed] == [["during"]]


# -- restore ----------------------------------------------------------------------------

async def change_and_snapshot(served: Served) -> None:
    """Snapshot v1, then change every file, so restoring v1 rewrites 20 files."""
    await call(served.socket, "snapshot", {"tags": ["v1"]})
    for name in DATA_FILES:
        (served.data / name).write_text("changed\n")


async def test_restore_streams_progress_then_the_result(served: Served) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    with trio.fail_after(TIMEOUT):
        await change_and_snapshot(served)
        result = await call(served.socket, "restore", {"ref": "v1"}, events)
    assert result["files_written"] == len(DATA_FILES) and result["pre_restore"]
    progress = [data for name, data in events if name == "progress"]
    assert progress, events
    assert progress[-1]["files_done"] == progress[-1]["files_total"] == len(DATA_FILES)
    assert (served.data / "file-03.txt").read_text() == DATA_FILES["file-03.txt"]


async def test_client_vanishing_mid_restore_does_not_stop_it(served: Served) -> None:
    with trio.fail_after(TIMEOUT):
        await change_and_snapshot(served)
        served.scheduler.restore_gate = gate = trio.Event()
        stream = await trio.open_unix_socket(os.fspath(served.socket))
        await stream.send_all(request_line(1, "restore", {"ref": "v1"}))
        first = await read_message(stream, bytearray())
        assert first["event"] == "progress"
        await stream.aclose()  # the client goes away mid-restore
        gate.set()
        await served.scheduler.restore_done.wait()
        listed = await call(served.socket, "list")
    for name, text in DATA_FILES.items():
        assert (served.data / name).read_text() == text
    assert [s["kind"] for s in listed] == ["pre-restore", "manual"]


async def test_non_utf8_names_cross_as_surrogates(served: Served) -> None:
    with trio.fail_after(TIMEOUT):
        await call(served.socket, "snapshot", {"tags": ["v1"]})
        (served.data / os.fsdecode(b"caf\xe9")).write_text("x")
        changes = await call(served.socket, "diff", {"ref": "v1"})
    [change] = changes["data"]
    assert os.fsencode(change["path"]) == b"caf\xe9" and change["status"] == "added"


async def test_connections_past_the_cap_are_told_busy(workspace: Any) -> None:
    path: Path = workspace.config.socket
    limits = Limits(max_connections=2, read_timeout=10)
    handlers = make_handlers(WorkspaceScheduler(workspace))
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_control, path, handlers, limits=limits))
            first = await trio.open_unix_socket(os.fspath(path))
            second = await trio.open_unix_socket(os.fspath(path))
            with pytest.raises(RemoteError) as info:
                await call(path, "status")
            await first.aclose()
            await second.aclose()
            nursery.cancel_scope.cancel()
    assert info.value.code == "busy"
