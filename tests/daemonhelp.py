"""A real `dwsd --config` process for end-to-end tests, driven with the real `dwsctl`.

Readiness is the daemon's own "dwsd ready" log line; `stop()` sends SIGTERM and always
clears a mount left behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from dwsd.config import load_config

BIN = Path(sys.executable).parent
READY_LINE = "dwsd ready"
TIMEOUT = 60.0


class Daemon:
    def __init__(self, config: Path, wrapper: Sequence[str] = (),
                 env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.socket = load_config(config).socket  # the config may be broken later
        self.wrapper = list(wrapper)
        self.env = dict(env or {})
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self._cond = threading.Condition()
        self._ended = False
        self._reader: threading.Thread | None = None

    def start(self) -> "Daemon":
        self.proc = subprocess.Popen(
            [*self.wrapper, str(BIN / "dwsd"), "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self.wait_for_log(READY_LINE)
        return self

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.log.append(line)
                self._cond.notify_all()
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def wait_for_log(self, text: str, timeout: float = TIMEOUT) -> str:
        """Wait for a line of the daemon's log containing `text`; return that line."""
        def found() -> str | None:
            return next((line for line in self.log if text in line), None)

        with self._cond:
            self._cond.wait_for(lambda: found() is not None or self._ended, timeout)
            line = found()
        if line is None:
            raise AssertionError(f"no {text!r} in the daemon's log:\n{''.join(self.log)}")
        return line

    def ctl(self, *args: str, check: bool = True, json_out: bool = False) -> Any:
        """Run dwsctl; with `json_out`, parse its --json output."""
        argv = [str(BIN / "dwsctl"), "--socket", str(self.socket)]
        argv += ["--json", *args] if json_out else list(args)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
        if check:
            assert proc.returncode == 0, f"{argv}: {proc.stderr}"
        return json.loads(proc.stdout) if json_out and proc.returncode == 0 else proc

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.ctl("status", json_out=True)
        return result

    def wait_until(self, predicate: Any, what: str, timeout: float = TIMEOUT) -> None:
        """Poll dwsctl until `predicate()` holds (the daemon works on its own clock)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{''.join(self.log)}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> int:
        """SIGTERM; return the exit code (the rest of the log is kept)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=TIMEOUT)
        return self.proc.returncode


def unmount(path: Path | None) -> None:
    if path is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
