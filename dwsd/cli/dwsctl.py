"""`dwsctl`: control a running dwsd over its socket (see docs/protocol.md).

Human-readable output by default, JSON with `--json`; progress (restore, long snapshots)
on stderr: a bar with an ETA on a terminal, plain periodic lines otherwise. Any failure
is one line on stderr and an exit code from EXIT_CODES.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from dwsd.control.client import ControlClient, find_socket
from dwsd.control.protocol import JSON
from dwsd.errors import ConfigError, ConnectError, DwsdError, RemoteError, UsageError
from dwsd.store.catalog import KINDS

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
EXIT_CODES = """\
exit codes:
  0  success
  1  the daemon reported an error (or check found problems, a snapshot lacks
     files it could not read, or a restore left files it could not write)
  2  usage error: bad command line, no socket known, unreadable config
  3  the daemon is not running, or its socket cannot be connected to

socket: --socket, else --config's socket, else $DWSD_SOCKET, else $DWSD_CONFIG's
socket, else the socket of ~/.config/dwsd/config.yaml."""

Render = Callable[[Any, argparse.Namespace, TextIO], int]
WARNINGS_SHOWN = 20  # files named one per line; the rest counted


# -- command line -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwsctl", description="Control a running dwsd snapshot daemon.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_snapshot_commands(sub)
    _add_restore_commands(sub)
    _add_maintenance_commands(sub)
    for command in sub.choices.values():  # `dwsctl list --json` as well as `--json list`
        _add_common_options(command, argparse.SUPPRESS)
    return parser


def _add_common_options(parser: argparse.ArgumentParser, default: Any = None) -> None:
    """The options every command takes, before or after its name. After it they
    default to SUPPRESS: not given there, they leave what was given before it."""
    parser.add_argument("--socket", metavar="PATH", default=default,
                        help="the daemon's control socket")
    parser.add_argument("--config", metavar="FILE", default=default,
                        help="the daemon's config (for its socket)")
    parser.add_argument("--json", action="store_true",
                        default=False if default is None else default,
                        help="print JSON for scripts")


def _add_snapshot_commands(sub: Any) -> None:
    p = sub.add_parser("snapshot", help="take a snapshot now")
    p.add_argument("-t", "--tag", action="append", default=[], dest="tags", metavar="TAG")
    p.add_argument("-m", "--message", default="", metavar="MSG")
    p.add_argument("--full", action="store_true", help="walk every resource in full")
    p = sub.add_parser("list", help="list snapshots, newest first")
    p.add_argument("-n", type=_positive, dest="limit", metavar="N", help="at most N")
    p.add_argument("--kind", choices=KINDS)
    sub.add_parser("show", help="show one snapshot").add_argument("ref", metavar="REF")
    p = sub.add_parser("diff", help="changes from REF to the live files (or to REF2)")
    p.add_argument("ref", metavar="REF")
    p.add_argument("other", metavar="REF2", nargs="?")
    p = sub.add_parser("tag", help="add a tag to a snapshot")
    p.add_argument("ref", metavar="REF")
    p.add_argument("tag", metavar="TAG")
    sub.add_parser("untag", help="remove a tag").add_argument("tag", metavar="TAG")
    sub.add_parser("delete", help="delete a snapshot").add_argument("ref", metavar="REF")


def _add_restore_commands(sub: Any) -> None:
    p = sub.add_parser("restore", help="restore a snapshot (a pre-restore snapshot is "
                       "taken first when restoring in place)")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--only", action="append", metavar="RESOURCE")
    p.add_argument("--leave", action="append", metavar="RESOURCE")
    p.add_argument("--path", action="append", dest="paths", metavar="RESOURCE/PATH")
    p.add_argument("--target", metavar="DIR", help="write into DIR instead of in place")
    p.add_argument("--dry-run", action="store_true", help="show what would change")


def _add_maintenance_commands(sub: Any) -> None:
    p = sub.add_parser("prune", help="apply the retention policy")
    p.add_argument("--dry-run", action="store_true")
    sub.add_parser("status", help="daemon, watcher and scheduler status")
    p = sub.add_parser("check", help="check the store")
    p.add_argument("--read-data", action="store_true", help="re-hash every object")
    p.add_argument("--repair", action="store_true", help="move corrupt blobs aside, so "
                   "that the next full snapshot stores again the files that still have "
                   "their content, repairing every snapshot that uses them")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def request_for(ns: argparse.Namespace) -> tuple[str, dict[str, JSON]]:
    """The (op, args) a parsed command line asks for."""
    c = ns.command
    if c == "snapshot":
        return c, {"tags": ns.tags, "message": ns.message, "full": ns.full}
    if c == "list":
        return c, {"limit": ns.limit, "kind": ns.kind}
    if c == "restore":
        target = os.path.abspath(ns.target) if ns.target else None
        return c, {"ref": ns.ref, "only": ns.only, "leave": ns.leave, "paths": ns.paths,
                   "target": target, "dry_run": ns.dry_run}
    names = {"show": ("ref",), "diff": ("ref", "other"), "tag": ("ref", "tag"),
             "untag": ("tag",), "delete": ("ref",), "prune": ("dry_run",), "status": (),
             "check": ("read_data", "repair")}
    return c, {name: getattr(ns, name) for name in names[c]}


# -- formatting helpers -----------------------------------------------------------------

def human_size(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """75 -> '1:15', 3700 -> '1:01:40'."""
    s = max(0, int(seconds + 0.5))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def first_line(text: str, width: int = 50) -> str:
    line = shown(text.split("\n", 1)[0])
    return line if len(line) <= width else line[:width - 1] + "…"


# Control characters (C0, DEL, C1), the backslash, and the surrogate escapes that stand
# for bytes of a name that are not UTF-8 (os.fsdecode).
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\\\udc80-\udcff]")


def shown(text: str) -> str:
    """`text` (a path or a message) safe to print on one terminal line: control
    characters, backslashes and bytes that are not UTF-8 as escapes, as `ls -b` shows
    names. A newline in a file name must not split a line of `diff`, nor an escape
    sequence in a message reach the terminal."""
    return _UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    if c in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[c]
    code = ord(c) - 0xDC00 if ord(c) >= 0xDC80 else ord(c)
    return f"\\x{code:02x}"


_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    """Rows (the first is the header) as aligned lines; `right` columns align right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def snapshot_name(snap: dict[str, Any]) -> str:
    return f"snapshot {snap['number']} ({snap['id']})"


# -- progress ---------------------------------------------------------------------------

def progress_line(op: str, data: dict[str, Any], elapsed: float, bar_width: int = 0) -> str:
    """One progress line; with `bar_width`, a bar of that many cells. The ETA extrapolates
    the bytes done so far (files when no bytes are involved), once there is enough to go
    by. A snapshot's totals are estimates (its last capture's): once the work passes
    them, only what is done is shown."""
    files, files_total = data.get("files_done", 0), data.get("files_total", 0)
    size, size_total = data.get("bytes_done", 0), data.get("bytes_total", 0)
    if files > files_total or size > size_total:
        return f"{op}: {files:,} files {human_size(size)}"
    done, total = (size, size_total) if size_total else (files, files_total)
    fraction = min(1.0, done / total) if total else 1.0
    parts = [f"{op}:"]
    if bar_width:
        filled = int(fraction * bar_width)
        parts.append("[" + "#" * filled + "-" * (bar_width - filled) + "]")
    parts.append(f"{fraction * 100:3.0f}%")
    parts.append(f"{files:,}/{files_total:,} files")
    parts.append(f"{human_size(size)}/{human_size(size_total)}")
    if ETA_AFTER_FRACTION <= fraction < 1 and elapsed >= ETA_AFTER_S:
        parts.append(f"ETA {human_duration(elapsed * (total - done) / done)}")
    return " ".join(parts)


# An ETA from the first file or the first instant is noise (hours for a second's work).
ETA_AFTER_FRACTION = 0.01
ETA_AFTER_S = 1.0


@dataclass
class ProgressDisplay:
    """Shows a request's events on `stream`: redrawn in place on a terminal, else a plain
    line at most every `plain_interval` seconds (and the last one at `finish`)."""

    op: str
    stream: TextIO
    tty: bool
    plain_interval: float = 2.0
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)
    _last_plain: float = field(default=-float("inf"))
    _pending: str = ""
    _drawn: bool = False

    def __post_init__(self) -> None:
        self.started = self.clock()

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        elapsed = self.clock() - self.started
        if event == "progress":
            line = progress_line(self.op, data, elapsed, 30 if self.tty else 0)
        elif event == "working":
            line = f"{self.op}: working ({human_duration(data.get('elapsed', elapsed))})"
        else:
            return
        self._show(line)

    def _show(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
            self.stream.flush()
            self._drawn = True
        elif self.clock() - self._last_plain >= self.plain_interval:
            self._last_plain = self.clock()
            self._pending = ""
            print(line, file=self.stream, flush=True)
        else:
            self._pending = line

    def finish(self) -> None:
        """End the display: close the redrawn line, print a held-back plain line."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        elif self._pending:
            print(self._pending, file=self.stream, flush=True)
        self._drawn, self._pending = False, ""


# -- rendering results ------------------------------------------------------------------

def render_snapshot(result: dict[str, Any], ns: argparse.Namespace, out: TextIO) -> int:
    snap = result["snapshot"]
    if snap is None:
        print("no change: no snapshot recorded", file=out)
    elif result["created"]:
        c = snap["counts"]
        tags = f" [{', '.join(snap['tags'])}]" if snap["tags"] else ""
        print(f"{snapshot_name(snap)} taken{tags}: {c['files']:,} files, "
              f"{human_size(c['bytes'])}; {c['changed_files']:,} changed{_removed(c)}, "
              f"{human_size(c['added_bytes'])} added", file=out)
    else:
        print(f"no change: same content as {snapshot_name(snap)}"
              + ("; tags and message added to it" if ns.tags or ns.message else ""),
              file=out)
    for item in result["unstable"]:
        print(f"dwsctl: warning: {item['resource']}/{shown(item['path'])} changed while "
              "it was read", file=sys.stderr)
    left_out = result["unreadable"]
    for item in left_out[:WARNINGS_SHOWN]:
        print(f"dwsctl: warning: {item['resource']}/{shown(item['path'])} not captured: "
              f"{item['error']}", file=sys.stderr)
    if len(left_out) > WARNINGS_SHOWN:
        print(f"dwsctl: warning: and {len(left_out) - WARNINGS_SHOWN:,} more files not "
              "captured (--json lists them all)", file=sys.stderr)
    return EXIT_ERROR if left_out else EXIT_OK


def render_list(result: list[dict[str, Any]], ns: argparse.Namespace, out: TextIO) -> int:
    if not result:
        print("no snapshots", file=out)
        return EXIT_OK
    rows = [["#", "ID", "KIND", "TAGS", "FILES", "SIZE", "MESSAGE"]]
    rows += [[str(s["number"]), s["id"], s["kind"], ",".join(s["tags"]),
              f"{s['counts']['files']:,}", human_size(s["counts"]["bytes"]),
              first_line(s["message"])] for s in result]
    for line in table(rows, right=(0, 4, 5)):
        print(line, file=out)
    return EXIT_OK


def _removed(counts: dict[str, Any]) -> str:
    """", N removed" when a snapshot removed files, else "" (and for one recorded before
    they were counted)."""
    removed = counts.get("removed_files", 0)
    return f", {removed:,} removed" if removed else ""


def render_show(snap: dict[str, Any], ns: argparse.Namespace, out: TextIO) -> int:
    c = snap["counts"]
    rows = [["snapshot", str(snap["number"])], ["id", snap["id"]], ["hash", snap["hash"]],
            ["kind", snap["kind"]], ["time", snap["time"]],
            ["tags", ", ".join(snap["tags"]) or "-"], ["host", snap["hostname"]],
            ["files", f"{c['files']:,} ({human_size(c['bytes'])})"],
            ["changed", f"{c['changed_files']:,} files{_removed(c)}, "
                        f"{human_size(c['added_bytes'])} added to the store"]]
    for line in table(rows):
        print(line, file=out)
    message = [shown(line) for line in snap["message"].split("\n")]
    print("message   " + message[0], *("          " + m for m in message[1:]), sep="\n",
          file=out)
    print("resources", file=out)
    for line in table([["  " + n, t] for n, t in sorted(snap["resources"].items())]):
        print(line, file=out)
    return EXIT_OK


def render_diff(result: dict[str, list[dict[str, Any]]], ns: argparse.Namespace,
                out: TextIO) -> int:
    counts: dict[str, int] = {}
    for resource, changes in result.items():
        for change in changes:
            counts[change["status"]] = counts.get(change["status"], 0) + 1
            if change["status"] == "unavailable":
                print(f"unavailable {resource}/ (its directory cannot be read: not "
                      "compared; see the daemon's log)", file=out)
                continue
            print(f"{change['status']:<9} {resource}/{shown(change['path'])}", file=out)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(summary or "no differences", file=out)
    return EXIT_ERROR if "unavailable" in counts else EXIT_OK


def render_restore(result: dict[str, Any], ns: argparse.Namespace, out: TextIO) -> int:
    name = snapshot_name(result["snapshot"])
    if result["dry_run"]:
        for resource, plan in sorted(result["plans"].items()):
            print(f"{resource}: {plan['files']:,} files ({human_size(plan['bytes'])}) "
                  f"to write, {plan['removals']:,} to remove", file=out)
            for change in plan.get("changes", []):
                op = PLAN_OPS.get(change["op"], change["op"])
                print(f"  {op:<6} {resource}/{shown(change['path'])}", file=out)
        print(f"dry run: nothing changed (restore of {name})", file=out)
        return EXIT_OK
    print(f"restored {name}: {result['files_written']:,} files written, "
          f"{result['removed']:,} removed, {result['resources_changed']} resource(s) "
          "changed", file=out)
    if result["pre_restore"]:
        print(f"undo with: dwsctl restore {result['pre_restore']['id']}", file=out)
    for error in result["errors"]:
        print(f"dwsctl: not restored: {error['resource']}/{shown(error['path'])}: "
              f"{error['error']}", file=sys.stderr)
    return EXIT_ERROR if result["errors"] else EXIT_OK


# A plan's "create" writes a file whether one stands there or not.
PLAN_OPS = {"create": "write"}


def render_record_line(verb: Callable[[argparse.Namespace, str], str]) -> Render:
    def render(snap: dict[str, Any], ns: argparse.Namespace, out: TextIO) -> int:
        print(verb(ns, snapshot_name(snap)), file=out)
        return EXIT_OK
    return render


def render_prune(result: dict[str, Any], ns: argparse.Namespace, out: TextIO) -> int:
    verb, keep = ("would delete", "keep") if result["dry_run"] else ("deleted", "kept")
    for sid in result["deleted"]:
        print(f"{verb} {sid}", file=out)
    print(f"{verb} {len(result['deleted'])} snapshot(s), {keep} {len(result['kept'])}",
          file=out)
    if result["gc"]:
        print(f"gc: {result['gc']['removed']:,} objects removed, "
              f"{result['gc']['kept']:,} kept", file=out)
    return EXIT_OK


def render_status(result: Any, ns: argparse.Namespace, out: TextIO) -> int:
    for line in nested_lines(result):
        print(line, file=out)
    return EXIT_OK


def nested_lines(value: Any, indent: str = "") -> list[str]:
    """A JSON value as indented `key: value` lines."""
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines += [f"{indent}{key}:"] + nested_lines(item, indent + "  ")
            else:
                lines.append(f"{indent}{key}: {_scalar(item)}")
        return lines
    if isinstance(value, list):
        return [line for item in value for line in
                (nested_lines(item, indent + "  ") if isinstance(item, (dict, list))
                 else [f"{indent}- {_scalar(item)}"])]
    return [indent + _scalar(value)]


def _scalar(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "{}" if isinstance(value, dict) else "[]"
    return "-" if value is None else str(value).lower() if isinstance(value, bool) \
        else str(value)


def render_check(result: dict[str, Any], ns: argparse.Namespace, out: TextIO) -> int:
    summary = (f"{result['trees']:,} trees, {result['blobs']:,} blobs "
               f"({result['blobs_read']:,} re-read)")
    if result["ok"]:
        print(f"store ok: {summary}", file=out)
        return EXIT_OK
    print(f"store has {len(result['problems'])} problem(s): {summary}", file=out)
    for problem in result["problems"]:
        print(f"  {problem['text']}", file=out)
    if ns.repair:
        print(f"repair: {len(result['moved_aside'])} corrupt blob(s) moved aside; the "
              "next full snapshot (dwsctl snapshot --full) stores the files that still "
              "have a bad blob's content again, which repairs every snapshot using it",
              file=out)
    return EXIT_ERROR


RENDER: dict[str, Render] = {
    "snapshot": render_snapshot, "list": render_list, "show": render_show,
    "diff": render_diff, "restore": render_restore, "prune": render_prune,
    "status": render_status, "check": render_check,
    "tag": render_record_line(lambda ns, name: f"tagged {name} as {ns.tag}"),
    "untag": render_record_line(lambda ns, name: f"removed tag {ns.tag} from {name}"),
    "delete": render_record_line(lambda ns, name: f"deleted {name}"),
}


def render_json(op: str, result: Any, out: TextIO) -> int:
    print(json.dumps(result, indent=2, ensure_ascii=True), file=out)
    failed = ((op == "check" and not result["ok"]) or (op == "restore" and result["errors"])
              or (op == "snapshot" and result["unreadable"])
              or (op == "diff" and any(change["status"] == "unavailable"
                                       for changes in result.values() for change in changes)))
    return EXIT_ERROR if failed else EXIT_OK


# -- main -------------------------------------------------------------------------------

def fail(message: str, code: int) -> int:
    print(f"dwsctl: {message}", file=sys.stderr)
    return code


def run(ns: argparse.Namespace, out: TextIO) -> int:
    """Carry out a parsed command line; returns the exit code."""
    def broken(exc: ConfigError, socket_path: Path) -> None:
        print(f"dwsctl: warning: {exc}; using the socket it names, {socket_path}",
              file=sys.stderr)
    try:
        socket_path = find_socket(ns.socket, ns.config, on_broken=broken)
    except (UsageError, ConfigError) as exc:
        return fail(str(exc), EXIT_USAGE)
    op, args = request_for(ns)
    display = ProgressDisplay(op, sys.stderr, sys.stderr.isatty())
    try:
        try:
            with ControlClient(Path(socket_path)) as client:
                result = client.call(op, args, display)
        finally:
            display.finish()
    except ConnectError as exc:
        return fail(str(exc), EXIT_NOT_RUNNING)
    except RemoteError as exc:
        return fail(f"{exc} ({exc.code})", EXIT_ERROR)
    except DwsdError as exc:
        return fail(str(exc), EXIT_ERROR)
    return render_json(op, result, out) if ns.json else RENDER[op](result, ns, out)


def main(argv: Sequence[str] | None = None) -> int:
    """The `dwsctl` command; returns its exit code (see EXIT_CODES)."""
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    # argparse drops a `--` given as a value (`dwsctl tag v1 -- --`), leaving an empty
    # list for a required REF or TAG, which reached the daemon as a type error.
    missing = [name.upper() for name in ("ref", "tag")
               if not isinstance(getattr(ns, name, ""), str)]
    if missing:
        return fail(f"{ns.command}: {' and '.join(missing)} missing ('--' ends the "
                    "options; it is not a value)", EXIT_USAGE)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")  # non-UTF-8 file names as bytes
    try:
        return run(ns, sys.stdout)
    except KeyboardInterrupt:
        return fail("interrupted (the daemon finishes what it was asked to do)", 130)
    except BrokenPipeError:  # `dwsctl list | head`: the reader has gone, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
