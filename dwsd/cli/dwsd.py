"""`dwsd` entry point.

    dwsd [--config FILE] [-v]                  the daemon, in the foreground (default
                                               config: ~/.config/dwsd/config.yaml)
    dwsd mount --config FILE                   serve the read-only view of a workspace's
    dwsd mount --store DIR --mount DIR         store, without the watcher; until SIGINT,
             [--allow-other]                   SIGTERM or an outside unmount

`dwsd mount` prints one line, `mounted <store> at <mount>`, once the view is served.
Errors are one line on stderr and a non-zero exit code.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import trio

from dwsd.config import default_config_path, load_config
from dwsd.errors import DwsdError, UsageError

# The daemon (watcher, capture, restore, control server) and the view (pyfuse3) are
# imported by the command that runs them: `dwsd mount` is timed from its start until the
# root lists, and importing the daemon's modules as well would add ~0.15 s to it (more
# with a cold page cache).

log = logging.getLogger("dwsd.cli")


@dataclass(frozen=True)
class MountRequest:
    store: Path
    mount: Path
    allow_other: bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dwsd", description="dwsd snapshot daemon")
    parser.add_argument("--config", type=Path, help="workspace configuration (YAML)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command")
    mount = sub.add_parser("mount", help="serve the read-only snapshot view of a store")
    mount.add_argument("--config", type=Path, dest="mount_config",
                       help="take the store, mount point and allow_other from this config")
    mount.add_argument("--store", type=Path, help="the store directory")
    mount.add_argument("--mount", type=Path, help="where to mount the view")
    mount.add_argument("--allow-other", action="store_true", default=None,
                       help="let other users reach the view (file modes still apply)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        if args.command == "mount":
            trio.run(run_mount, mount_request(args))
        else:
            from dwsd.daemon import run_daemon
            trio.run(run_daemon, args.config or default_config_path())
    except BaseException as exc:
        error = expected_error(exc)
        if error is None:
            raise
        print(f"dwsd: {error}", file=sys.stderr)
        return 1
    return 0


class _JournalFormatter(logging.Formatter):
    """Under systemd (JOURNAL_STREAM set) prefix each line with its syslog priority,
    which journald reads as the level; elsewhere, a timestamped line."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                 logging.CRITICAL: 2}

    def __init__(self, journald: bool) -> None:
        super().__init__("%(name)s: %(message)s" if journald else
                         "%(asctime)s dwsd %(levelname)s %(name)s: %(message)s")
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journald:
            return f"<{self._PRIORITY.get(record.levelno, 6)}>{text}"
        return text


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalFormatter("JOURNAL_STREAM" in os.environ))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def expected_error(exc: BaseException) -> DwsdError | None:
    """The DwsdError behind `exc`, looking through nurseries' single-exception groups;
    None when `exc` is something else (a bug: its traceback is worth seeing)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, DwsdError) else None


def mount_request(args: argparse.Namespace) -> MountRequest:
    """Store, mount point and allow_other from the config and/or the options (options
    win). Raises ConfigError, UsageError."""
    store, mount, allow_other = args.store, args.mount, args.allow_other
    config_path = args.mount_config or args.config
    if config_path is not None:
        config = load_config(config_path)
        store = store or config.store
        mount = mount or config.mount
        allow_other = config.allow_other if allow_other is None else allow_other
    if store is None or mount is None:
        raise UsageError("dwsd mount needs --config FILE (with a `mount:`), or --store "
                         "DIR and --mount DIR")
    return MountRequest(Path(store), Path(mount), bool(allow_other))


async def run_mount(request: MountRequest) -> None:
    """Serve the view until SIGINT/SIGTERM (then unmount) or an outside unmount."""
    from dwsd.fuse.mount import serve_view
    from dwsd.memory import tune_gc

    tune_gc()

    async def serve(scope: trio.CancelScope,
                    task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        await serve_view(request.store, request.mount, allow_other=request.allow_other,
                         follow=True, task_status=task_status)
        scope.cancel()

    # The handlers are installed before mounting: a signal never finds the view mounted
    # with the default (non-unmounting) action.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, nursery.cancel_scope)
            print(f"mounted {request.store} at {request.mount}", flush=True)
            async for signum in signals:
                log.info("%s: unmounting", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    sys.exit(main())
