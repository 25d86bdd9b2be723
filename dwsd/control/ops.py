"""The control operations: validate a request's args, ask the scheduler, encode the answer.

`make_handlers(scheduler)` gives the table the server dispatches on. Every handler checks
its args strictly (unknown names, missing required ones and wrong types raise
`UsageError`, code "usage") before the scheduler sees them. Long operations send events
while they run: `restore` sends "progress" events (throttled to about 10 a second, the
last one always sent), snapshot/diff/prune/check send a "working" heartbeat every second.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

import trio

from dwsd.control.encode import encode_changes, encode_check, encode_progress, \
    encode_prune_result, encode_record, encode_restore_result, encode_snapshot_result
from dwsd.control.protocol import JSON, EventSink, Handler
from dwsd.errors import UsageError
from dwsd.schedule.interface import SchedulerAPI
from dwsd.snapshot.restore import Progress

PROGRESS_INTERVAL = 0.1
HEARTBEAT_INTERVAL = 1.0

Args = dict[str, Any]
Operation = Callable[[Args, EventSink], Awaitable[JSON]]


# -- argument checking ------------------------------------------------------------------

@dataclass(frozen=True)
class Arg:
    """One argument: a predicate on its JSON value, its type for error messages, and
    whether it must be given (else `default`)."""

    accepts: Callable[[object], bool]
    type_name: str
    required: bool = False
    default: JSON = None


def _is_str(v: object) -> bool:
    return isinstance(v, str)


def _is_bool(v: object) -> bool:
    return isinstance(v, bool)


def _is_str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _or_null(accepts: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: v is None or accepts(v)


REF = Arg(_is_str, "a string", required=True)
TAG = Arg(_is_str, "a string", required=True)
OPT_STR = Arg(_or_null(_is_str), "a string or null")
FLAG = Arg(_is_bool, "true or false", default=False)
OPT_STR_LIST = Arg(_or_null(_is_str_list), "a list of strings or null")


def check_args(op: str, args: Mapping[str, JSON], spec: Mapping[str, Arg]) -> Args:
    """`args` with defaults filled in; raises UsageError naming the first problem."""
    unknown = sorted(set(args) - set(spec))
    if unknown:
        raise UsageError(f"{op}: unknown argument(s) {', '.join(unknown)} "
                         f"(accepted: {', '.join(sorted(spec)) or 'none'})")
    checked: Args = {}
    for name, arg in spec.items():
        if name not in args:
            if arg.required:
                raise UsageError(f"{op}: argument {name!r} is required")
            checked[name] = list(arg.default) if isinstance(arg.default, list) \
                else arg.default
        elif not arg.accepts(args[name]):
            raise UsageError(f"{op}: argument {name!r} must be {arg.type_name}")
        else:
            checked[name] = args[name]
    return checked


# -- events -----------------------------------------------------------------------------

class ProgressThrottle:
    """A progress callback that sends at most one event per `interval` seconds; `flush`
    sends the last one held back, so the client always sees the final state."""

    def __init__(self, emit: Callable[[Progress], None],
                 interval: float = PROGRESS_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self._interval = interval
        self._clock = clock
        self._last_sent = -float("inf")
        self._held: Progress | None = None

    def __call__(self, progress: Progress) -> None:
        now = self._clock()
        if now - self._last_sent >= self._interval:
            self._last_sent = now
            self._held = None
            self._emit(progress)
        else:
            self._held = progress

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._emit(held)


async def with_heartbeat(emit: EventSink, work: Callable[[], Awaitable[JSON]],
                         interval: float = HEARTBEAT_INTERVAL) -> JSON:
    """Await `work()`, sending a "working" event {elapsed} every `interval` seconds."""
    async def beat() -> None:
        start = trio.current_time()
        while True:
            await trio.sleep(interval)
            emit("working", {"elapsed": round(trio.current_time() - start, 1)})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(beat)
        result = await work()
        nursery.cancel_scope.cancel()
    return result


# -- operations -------------------------------------------------------------------------

class _Ops:
    """`op_<name>` per operation; each takes checked args and an event sink."""

    def __init__(self, scheduler: SchedulerAPI, progress_interval: float) -> None:
        self.scheduler = scheduler
        self.progress_interval = progress_interval

    async def op_snapshot(self, a: Args, emit: EventSink) -> JSON:
        throttle = ProgressThrottle(lambda p: emit("progress", encode_progress(p)),
                                    self.progress_interval)

        async def work() -> JSON:
            result = await self.scheduler.snapshot(a["tags"], a["message"], a["full"],
                                                   throttle)
            throttle.flush()
            return encode_snapshot_result(result)
        return await with_heartbeat(emit, work)

    async def op_list(self, a: Args, emit: EventSink) -> JSON:
        return [encode_record(r) for r in self.scheduler.history(a["limit"], a["kind"])]

    async def op_show(self, a: Args, emit: EventSink) -> JSON:
        return encode_record(self.scheduler.get(a["ref"]))

    async def op_diff(self, a: Args, emit: EventSink) -> JSON:
        async def work() -> JSON:
            return encode_changes(await self.scheduler.diff(a["ref"], a["other"]))
        return await with_heartbeat(emit, work)

    async def op_restore(self, a: Args, emit: EventSink) -> JSON:
        if a["target"] is not None and not os.path.isabs(a["target"]):
            raise UsageError(f"restore: target {a['target']!r} must be an absolute path")
        throttle = ProgressThrottle(lambda p: emit("progress", encode_progress(p)),
                                    self.progress_interval)
        result = await self.scheduler.restore(a["ref"], a["only"], a["leave"], a["paths"],
                                              a["target"], a["dry_run"], throttle)
        throttle.flush()
        return encode_restore_result(result)

    async def op_tag(self, a: Args, emit: EventSink) -> JSON:
        return encode_record(await self.scheduler.tag(a["ref"], a["tag"]))

    async def op_untag(self, a: Args, emit: EventSink) -> JSON:
        return encode_record(await self.scheduler.untag(a["tag"]))

    async def op_delete(self, a: Args, emit: EventSink) -> JSON:
        return encode_record(await self.scheduler.delete(a["ref"]))

    async def op_prune(self, a: Args, emit: EventSink) -> JSON:
        async def work() -> JSON:
            return encode_prune_result(await self.scheduler.prune(a["dry_run"]))
        return await with_heartbeat(emit, work)

    async def op_status(self, a: Args, emit: EventSink) -> JSON:
        return self.scheduler.status()

    async def op_check(self, a: Args, emit: EventSink) -> JSON:
        async def work() -> JSON:
            return encode_check(await self.scheduler.check(a["read_data"], a["repair"]))
        return await with_heartbeat(emit, work)

    async def op_resources(self, a: Args, emit: EventSink) -> JSON:
        return self.scheduler.resources()


SPECS: dict[str, dict[str, Arg]] = {
    "snapshot": {"tags": Arg(_is_str_list, "a list of strings", default=[]),
                 "message": Arg(_is_str, "a string", default=""), "full": FLAG},
    "list": {"limit": Arg(_or_null(_is_count), "a positive integer or null"),
             "kind": OPT_STR},
    "show": {"ref": REF},
    "diff": {"ref": REF, "other": OPT_STR},
    "restore": {"ref": REF, "only": OPT_STR_LIST, "leave": OPT_STR_LIST,
                "paths": OPT_STR_LIST, "target": OPT_STR, "dry_run": FLAG},
    "tag": {"ref": REF, "tag": TAG},
    "untag": {"tag": TAG},
    "delete": {"ref": REF},
    "prune": {"dry_run": FLAG},
    "status": {},
    "check": {"read_data": FLAG, "repair": FLAG},
    "resources": {},
}


def _checked(op: str, spec: Mapping[str, Arg], operation: Operation) -> Handler:
    async def handle(args: Mapping[str, JSON], emit: EventSink) -> JSON:
        return await operation(check_args(op, args, spec), emit)
    return handle


def make_handlers(scheduler: SchedulerAPI, *,
                  progress_interval: float = PROGRESS_INTERVAL) -> dict[str, Handler]:
    """The server's dispatch table: op name -> handler over `scheduler`."""
    ops = _Ops(scheduler, progress_interval)
    return {op: _checked(op, spec, getattr(ops, f"op_{op}")) for op, spec in SPECS.items()}
