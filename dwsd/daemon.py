"""The composition root: `run_daemon(config_path)`.

Nested nurseries give the shutdown order: the view (outermost) outlives the control
server, which outlives the watcher and the scheduler (innermost). SIGTERM/SIGINT cancel
from the inside out: new requests are refused at once, an operation already on a worker
thread finishes (worker threads are never abandoned) and its client is answered, then
the view is unmounted and the store lock released.
SIGHUP reloads the configuration; a broken one is refused and the old one kept.
systemd hears READY=1 once serving, a STATUS line after each change of the catalog,
and STOPPING=1 on the way out.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import socket
from pathlib import Path
from typing import AsyncIterator

import trio

from dwsd.config import Config, load_config
from dwsd.control.ops import make_handlers
from dwsd.control.server import ControlServer, serve_control
from dwsd.errors import DwsdError
from dwsd.fuse.mount import serve_view
from dwsd.memory import tune_allocator, tune_gc
from dwsd.schedule.scheduler import Scheduler
from dwsd.watch.watcher import Watcher
from dwsd.workspace import Workspace

log = logging.getLogger(__name__)

# After the last operation of a shutdown, how long its reply (and those of requests that
# were refused meanwhile) may take to reach their clients.
ANSWER_TIMEOUT = 10.0


def sd_notify(state: str) -> None:
    """Tell systemd about our state (Type=notify); a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd: %s", exc)


async def run_daemon(config_path: Path) -> None:
    """Run until SIGTERM/SIGINT. Raises DwsdError when the daemon cannot start."""
    tune_allocator()
    tune_gc()
    await Daemon(config_path).run()


class Daemon:
    """One running daemon. Trio thread only."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config = load_config(config_path)
        self.scheduler: Scheduler | None = None
        self._control: ControlServer | None = None
        self._stop_inner = trio.CancelScope()
        self._stopping_told = False

    async def run(self) -> None:
        # Signals are caught from the start: one arriving while the view is being
        # mounted must still unmount it, not kill the process and leave it dead.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                       signal.SIGHUP) as signals:
            ws = await trio.to_thread.run_sync(Workspace.open, self.config)
            try:
                async with trio.open_nursery() as outer:
                    outer.start_soon(self._watch_signals, signals)
                    view = None
                    if self.config.mount is not None:
                        view = await outer.start(functools.partial(
                            serve_view, self.config.store, self.config.mount,
                            allow_other=self.config.allow_other))
                    await self._serve(ws, view)
                    outer.cancel_scope.cancel()  # last: the view (and signal watch)
            finally:
                self._tell_stopping()
                await trio.to_thread.run_sync(ws.close)
                log.info("dwsd stopped")

    async def _serve(self, ws: Workspace, view: object | None) -> None:
        """Control server, then watcher and scheduler inside it: on shutdown the
        scheduler stops first (finishing any operation on its thread), the control
        server after it, so a client waiting for that operation still gets its answer."""
        reload_view = getattr(view, "reload_catalog", None)

        async def catalog_changed() -> None:
            sd_notify(status_line(scheduler))
            if reload_view is not None:
                await reload_view()

        watcher = Watcher(ws.config.resources, on_change=lambda: scheduler.wake())
        scheduler = Scheduler(ws, watcher, on_catalog_change=catalog_changed)
        self.scheduler = scheduler
        async with trio.open_nursery() as control:
            server = await control.start(serve_control, ws.config.socket,
                                         make_handlers(scheduler))
            self._control = server
            with self._stop_inner:
                async with trio.open_nursery() as inner:
                    await inner.start(watcher.run)
                    await inner.start(scheduler.run)
                    sd_notify("READY=1\n" + status_line(scheduler))
                    log.info("dwsd ready: workspace %s, socket %s, view %s",
                             ws.config.workspace, ws.config.socket,
                             ws.config.mount or "off")
            # The operation a client asked for before the signal (a restore, say) runs
            # on its thread to the end whatever happens here: its client gets the
            # answer, not a closed connection.
            self._stop_taking_requests()
            await scheduler.finish_running()
            with trio.move_on_after(ANSWER_TIMEOUT):
                await server.wait_idle()
            control.cancel_scope.cancel()

    def _stop_taking_requests(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self._control is not None:
            self._control.stop()

    def _tell_stopping(self) -> None:
        """STOPPING=1, once: at the signal (systemd then knows at once), else on the
        way out of any other ending."""
        if not self._stopping_told:
            self._stopping_told = True
            sd_notify("STOPPING=1")

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                if self.scheduler is not None:
                    await reload_config(self.config_path, self.scheduler)
                continue
            log.info("%s: shutting down", signal.Signals(signum).name)
            self._tell_stopping()
            self._stop_taking_requests()
            # Cancelling a scope not yet entered is fine: the start-up then goes
            # straight to the orderly shutdown.
            self._stop_inner.cancel()
            return


async def reload_config(config_path: Path, scheduler: Scheduler) -> None:
    """Apply a changed configuration; refuse a broken one and keep the running one."""
    sd_notify("RELOADING=1")
    try:
        new = await trio.to_thread.run_sync(load_config, config_path)
    except DwsdError as exc:
        log.error("configuration reload refused, keeping the running one: %s", exc)
        sd_notify("READY=1")
        return
    old = scheduler.config
    kept = _needs_restart(old, new)
    if kept:
        log.warning("configuration reloaded; %s changed and needs a restart to apply",
                    ", ".join(kept))
        new = dataclasses.replace(new, store=old.store, mount=old.mount, socket=old.socket,
                                  resources=old.resources)
    scheduler.ws.config = new
    # New excludes change what the watcher must watch and what the last capture left
    # out: the watches are re-scanned and the resources walked whole.
    if scheduler.watcher.reconfigure(new.resources):
        scheduler.force_reconcile()
    log.info("configuration reloaded from %s", config_path)
    sd_notify("READY=1")
    scheduler.wake()


def status_line(scheduler: Scheduler) -> str:
    """A STATUS= line for systemd: what is watched, how many snapshots, the latest."""
    status = scheduler.status()
    latest = f", latest {status['latest']}" if status["latest"] else ""
    return (f"STATUS=watching {len(status['resources'])} resources; "
            f"{status['snapshots']} snapshots{latest}")


def _needs_restart(old: Config, new: Config) -> list[str]:
    changed = [k for k in ("store", "mount", "socket", "allow_other")
               if getattr(old, k) != getattr(new, k)]
    if [(r.name, r.path) for r in old.resources] != [(r.name, r.path) for r in new.resources]:
        changed.append("resources")
    return changed
