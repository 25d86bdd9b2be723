"""Run one workspace operation in a child process:
`python -m tests.crashdriver CONFIG OP [ARG...]`, OP one of snapshot,
restore [REF [PATH...]] (REF defaults to `base`), prune, gc, delete REF, dirty PATH...
(a snapshot of those paths of resource `data`), snapshot-state-whole (a snapshot whose
capture states are written whole, their logs taken as full). The crash tests set DWSD_CRASH_AT so the
process kills itself part-way through; others trace it."""
from __future__ import annotations

import sys

from dwsd.snapshot import statcache
from dwsd.workspace import Workspace


def main(config: str, op: str, *args: str) -> None:
    if op == "snapshot-state-whole":
        statcache.LOG_MIN_LIMIT = 0
        statcache.LOG_LIMIT_FRACTION = 0.0
        op = "snapshot"
    with Workspace.open(config, resume=False) as ws:
        if op == "snapshot":
            ws.snapshot(tags=["crashed"])
        elif op == "restore":
            ref, *paths = args or ("base",)
            ws.restore(ref, paths=paths or None)
        elif op == "dirty":
            ws.snapshot(tags=["crashed"], dirty={"data": [p.encode() for p in args]})
        elif op == "prune":
            ws.prune()
        elif op == "gc":
            ws.gc()
        elif op == "delete":
            ws.delete(args[0])
        else:
            raise SystemExit(f"unknown op {op}")


if __name__ == "__main__":
    main(*sys.argv[1:])
