"""Test-only crash injection: `DWSD_CRASH_AT=<point>[:<n>[:<SIGNAL>]]` makes the process
SIGKILL itself the n-th time (default 1st) it reaches `crash_point(<point>)`, or send
itself SIGNAL (`TERM`, say) instead: a shutdown asked for at a named point of the work.

Points: objects-written (after each new object), before-catalog-commit,
after-catalog-commit, restore-file (before each restore action), restore-temp-written (a
restored file written under its temp name, not yet renamed into place),
delete-before-commit (a delete made in memory, the catalog not yet replaced),
after-delete-commit (deleted from the catalog by prune or delete, gc not run), gc-remove
(before each object gc removes), state-rewritten (a capture state written whole, the
log of the one it replaced not yet removed).
The variable is read once, at import: a crash point runs for every object written, and
with the variable unset it costs one test of a constant.
"""
from __future__ import annotations

import os
import signal

_ENV = "DWSD_CRASH_AT"
_SPEC = os.environ.get(_ENV, "")
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    if not _SPEC:
        return
    point, _, rest = _SPEC.partition(":")
    if point != name:
        return
    count, _, signame = rest.partition(":")
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{signame}") if signame else signal.SIGKILL)
