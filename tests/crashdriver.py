"""Run one workspace operation in a child process: `python -m tests.crashdriver CONFIG OP`.
The crash tests set DWSD_CRASH_AT so the process kills itself part-way through."""
from __future__ import annotations

import sys

from dwsd.workspace import Workspace


def main(config: str, op: str) -> None:
    with Workspace.open(config, resume=False) as ws:
        if op == "snapshot":
            ws.snapshot(tags=["crashed"])
        elif op == "restore":
            ws.restore("base")
        elif op == "prune":
            ws.prune()
        elif op == "gc":
            ws.gc()
        else:
            raise SystemExit(f"unknown op {op}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
