"""Shared set-up for the control tests (a real Workspace behind a small SchedulerAPI, a
real server on a real unix socket), plus unit tests of the protocol layer."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import pytest
import trio

from dwsd.config import load_config
from dwsd.control.ops import ProgressThrottle, check_args, make_handlers, SPECS
from dwsd.control.encode import encode_change, encode_record
from dwsd.control.protocol import parse_request, request_line
from dwsd.errors import ProtocolError, VersionError
from dwsd.control.server import Limits, serve_control
from dwsd.errors import UsageError
from dwsd.snapshot.diff import Change
from dwsd.snapshot.restore import Progress
from dwsd.store.catalog import SnapshotRecord
from dwsd.store.maintenance import CheckResult
from dwsd.store.tree import FILE, Entry
from dwsd.workspace import PruneResult, RestoreResult, SnapshotResult, Workspace
from tests.conftest import WriteConfig

T = TypeVar("T")
TEST_LIMITS = Limits(read_timeout=1.0, write_timeout=5.0)
DATA_FILES = {f"file-{i:02d}.txt": f"content {i}\n" * (i + 1) for i in range(20)}


class WorkspaceScheduler:
    """SchedulerAPI over a real Workspace: writes run one at a time in a worker thread.
    Gates (trio.Events) let a test hold a snapshot or a restore in the middle."""

    def __init__(self, workspace: Workspace) -> None:
        self.ws = workspace
        self.lock = trio.Lock()
        self.snapshot_gate: trio.Event | None = None
        self.snapshot_started = trio.Event()
        self.restore_gate: trio.Event | None = None
        self.restore_progress_seen = trio.Event()
        self.restore_done = trio.Event()

    async def _write(self, work: Callable[[], T]) -> T:
        async with self.lock:
            return await trio.to_thread.run_sync(work)

    def _hold(self, gate: trio.Event | None, seen: trio.Event) -> None:
        """In the worker thread: say we got here, then wait for the gate."""
        trio.from_thread.run_sync(seen.set)
        if gate is not None:
            trio.from_thread.run(gate.wait)

    async def snapshot(self, tags: Sequence[str], message: str, full: bool,
                       progress: Callable[[Progress], None] | None = None
                       ) -> SnapshotResult:
        def report(p: Progress) -> None:
            if progress is not None:
                trio.from_thread.run_sync(progress, replace(p))

        def work() -> SnapshotResult:
            self._hold(self.snapshot_gate, self.snapshot_started)
            return self.ws.snapshot(tags, message, progress=report)
        return await self._write(work)

    async def restore(self, ref: str, only: Sequence[str] | None,
                      leave: Sequence[str] | None, paths: Sequence[str] | None,
                      target: str | None, dry_run: bool,
                      progress: Callable[[Progress], None]) -> RestoreResult:
        def report(p: Progress) -> None:
            trio.from_thread.run_sync(progress, replace(p))
            self._hold(self.restore_gate, self.restore_progress_seen)
        try:
            return await self._write(lambda: self.ws.restore(ref, only, leave, paths,
                                                             target, dry_run, report))
        finally:
            self.restore_done.set()

    async def tag(self, ref: str, tag: str) -> SnapshotRecord:
        return await self._write(lambda: self.ws.tag(ref, tag))

    async def untag(self, tag: str) -> SnapshotRecord:
        return await self._write(lambda: self.ws.untag(tag))

    async def delete(self, ref: str) -> SnapshotRecord:
        return await self._write(lambda: self.ws.delete(ref))

    async def prune(self, dry_run: bool) -> PruneResult:
        return await self._write(lambda: self.ws.prune(dry_run))

    async def check(self, read_data: bool, repair: bool = False) -> CheckResult:
        return await self._write(lambda: self.ws.check(read_data, repair))

    async def diff(self, ref: str, other: str | None) -> dict[str, list[Change]]:
        return await self._write(lambda: self.ws.diff(ref, other))

    def history(self, limit: int | None, kind: str | None) -> list[SnapshotRecord]:
        return self.ws.history(limit, kind)

    def get(self, ref: str) -> SnapshotRecord:
        return self.ws.get(ref)

    def resources(self) -> list[dict[str, Any]]:
        return [{"name": r.name, "path": str(r.path), "role": r.role}
                for r in self.ws.config.resources]

    def status(self) -> dict[str, Any]:
        return {"workspace": self.ws.config.workspace, "queue": 0}


@dataclass
class Served:
    socket: Path
    scheduler: WorkspaceScheduler
    workspace: Workspace
    data: Path


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dwsd-t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workspace(tmp_path: Path, write_config: WriteConfig, short_dir: Path
              ) -> Iterator[Workspace]:
    """A workspace over one resource `data` of 20 small files, socket in `short_dir`."""
    data = tmp_path / "data"
    data.mkdir()
    for name, text in DATA_FILES.items():
        (data / name).write_text(text)
    config = load_config(write_config({"data": data}))
    with Workspace.open(replace(config, socket=short_dir / "run" / "dwsd.sock")) as ws:
        yield ws


@pytest.fixture
async def served(nursery: trio.Nursery, workspace: Workspace) -> Served:
    """A control server over `workspace`, answering when the fixture returns."""
    scheduler = WorkspaceScheduler(workspace)
    socket_path = workspace.config.socket
    await nursery.start(partial(serve_control, socket_path, make_handlers(scheduler),
                                limits=TEST_LIMITS))
    return Served(socket_path, scheduler, workspace,
                  workspace.config.resource("data").path)


# -- protocol units ---------------------------------------------------------------------

def test_request_line_round_trips_through_parse_request() -> None:
    request = parse_request(request_line(7, "list", {"limit": 3}).rstrip(b"\n"))
    assert (request.id, request.op, request.args) == (7, "list", {"limit": 3})


@pytest.mark.parametrize("line", [b"{", b"[]", b'{"v":1,"id":true,"op":"list"}',
                                  b'{"v":1,"id":1,"op":""}', b'{"v":1,"id":1,"op":"x",'
                                  b'"args":[]}', b'{"v":1,"id":1,"op":"x","extra":1}',
                                  b"\xff\xfe"])
def test_malformed_requests_are_bad_request(line: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.code == "bad-request"


def test_wrong_version_names_the_id() -> None:
    with pytest.raises(VersionError) as info:
        parse_request(b'{"v":2,"id":5,"op":"list"}')
    assert (info.value.code, info.value.request_id) == ("bad-version", 5)


def test_non_utf8_path_survives_json() -> None:
    entry = Entry(name=b"caf\xe9", kind=FILE, mode=0o100644, uid=0, gid=0, mtime_ns=0,
                  size=3)
    doc = encode_change(Change(b"dir/caf\xe9", "added", None, entry))
    line = json.dumps(doc, ensure_ascii=True)
    assert line.isascii()
    assert os.fsencode(json.loads(line)["path"]) == b"dir/caf\xe9"
    assert (doc["kind"], doc["old_size"], doc["new_size"]) == ("file", None, 3)


def test_record_encoding_has_the_documented_fields(workspace: Workspace) -> None:
    record = workspace.snapshot(["v1"], "first").record
    assert record is not None
    doc = encode_record(record)
    assert {"id", "hash", "number", "kind", "tags", "message", "time"} <= set(doc)
    assert doc["time"].endswith("Z") and doc["tags"] == ["v1"]
    assert "root_meta" not in doc


@pytest.mark.parametrize("op, args, problem", [
    ("list", {"limit": 0}, "positive integer"),
    ("list", {"limit": True}, "positive integer"),
    ("list", {"bogus": 1}, "unknown argument"),
    ("show", {}, "required"),
    ("snapshot", {"tags": "v1"}, "list of strings"),
    ("restore", {"ref": "x", "dry_run": "yes"}, "true or false"),
])
def test_bad_args_are_usage_errors(op: str, args: dict[str, Any], problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        check_args(op, args, SPECS[op])


def test_check_args_fills_defaults() -> None:
    assert check_args("snapshot", {}, SPECS["snapshot"]) == {"tags": [], "message": "",
                                                             "full": False}


def test_progress_throttle_sends_ten_a_second_and_the_last() -> None:
    now = [0.0]
    sent: list[int] = []
    throttle = ProgressThrottle(lambda p: sent.append(p.files_done), 0.1, lambda: now[0])
    for i in range(1, 101):  # 100 updates over one second
        now[0] = i / 100
        throttle(Progress(files_done=i, files_total=100))
    throttle.flush()
    assert 9 <= len(sent) <= 11
    assert sent[-1] == 100


def test_paths_and_times_in_results_become_text() -> None:
    import datetime as dt
    from dwsd.control.protocol import encode_line
    line = encode_line({"path": Path("/x/y"), "raw": b"caf\xe9",
                        "at": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)})
    assert json.loads(line) == {"path": "/x/y", "raw": "caf\udce9",
                                "at": "2026-01-02T03:04:05Z"}
