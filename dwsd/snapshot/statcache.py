"""Per-resource capture state: the last captured root tree and the stat cache.

The stat cache maps a file's relative path (bytes) to the stat key it had when it was
read — (size, mtime_ns, ctime_ns, inode) — with its blob id and xattrs. A file whose lstat
still gives that key is not opened again.

A key is only trusted when the file's ctime was older than the moment of reading by more
than RACY_WINDOW_NS. Timestamps come from a coarse clock; a write in the same tick as our
read might not move ctime (the "racy git" problem), so a file changed that recently is
re-read next time. Untrusted entries are kept (for counts) with ctime -1, never matching.

Stored as `<store>/state/<resource>.state` (marshal: no code execution on load). The state
is only a cache: it is written after the catalog commit, and a missing or unreadable one
just means a full read.
"""
from __future__ import annotations

import logging
import marshal
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from dwsd.store.fsutil import atomic_write
from dwsd.store.ids import ObjectId
from dwsd.store.tree import Xattrs

log = logging.getLogger(__name__)

_VERSION = 1
_CLOCK_REALTIME_COARSE = 5  # Linux constant; not exported by the time module
RACY_WINDOW_NS = max(2 * int(time.clock_getres(_CLOCK_REALTIME_COARSE) * 1e9), 0) + 2_000_000
UNTRUSTED = -1


class CachedFile(NamedTuple):
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    blob: ObjectId
    xattrs: Xattrs


class _Changes(MutableMapping[bytes, CachedFile]):
    """The files of a state derived from another (`CaptureState.derive`): the changes
    made since, over the other state's dict, which stays untouched until `apply`."""

    def __init__(self, base: dict[bytes, CachedFile]) -> None:
        self.base = base
        self.changed: dict[bytes, CachedFile | None] = {}  # None: dropped

    def get(self, key: bytes, default: CachedFile | None = None  # type: ignore[override]
            ) -> CachedFile | None:
        # The hot path (every name of a walk): two dict lookups at most.
        if key in self.changed:
            value = self.changed[key]
            return default if value is None else value
        return self.base.get(key, default)

    def __getitem__(self, key: bytes) -> CachedFile:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: bytes, value: CachedFile) -> None:
        self.changed[key] = value

    def __delitem__(self, key: bytes) -> None:
        self[key]  # KeyError if absent
        self.changed[key] = None

    def __iter__(self) -> Iterator[bytes]:  # O(files): saving, drop_under
        changed = self.changed
        yield from (k for k in self.base if k not in changed)
        yield from (k for k, v in changed.items() if v is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def apply(self) -> dict[bytes, CachedFile]:
        """Write the changes into the base dict (O(changes)) and return it."""
        base = self.base
        for key, value in self.changed.items():
            if value is None:
                base.pop(key, None)
            else:
                base[key] = value
        self.changed = {}
        return base


@dataclass
class CaptureState:
    """The stat cache of one resource and its root tree. Change `files` through `put`,
    `drop` and `drop_under`: once `totals()` has summed the files they keep it running,
    so it costs nothing after, however large the resource (a dirty-path snapshot must
    not sum 100,000 sizes; its state is derived, and so summed, first)."""

    root: ObjectId | None = None
    files: MutableMapping[bytes, CachedFile] = field(default_factory=dict)
    # The tree id of each directory at this capture, by relative path: a hint that lets
    # the next full walk keep an unchanged directory's id without encoding it again (it
    # is checked against that tree's entries). In memory only, never saved.
    dirs: dict[bytes, ObjectId] = field(default_factory=dict, compare=False, repr=False)
    _count: int = field(default=-1, compare=False, repr=False)
    _bytes: int = field(default=0, compare=False, repr=False)

    def totals(self) -> tuple[int, int]:
        """(number of files, bytes) of the captured resource."""
        if self._count < 0:  # built from a dict: sum once
            self._count = len(self.files)
            self._bytes = sum(f.size for f in self.files.values())
        return self._count, self._bytes

    def derive(self) -> "CaptureState":
        """A new state with the same files, for a capture of changes on top of this one.
        O(changes) in files, not O(files): its changes are kept apart (a dirty-path
        snapshot of 100,000 files spent 2 ms copying them; only the map of directories,
        some 20 times smaller, is copied), and this state is untouched unless the
        new one is kept (`keep`), so a failed snapshot can drop it. A state derived
        itself is kept first (see `keep`)."""
        self.keep()
        count, size = self.totals()
        files = self.files if isinstance(self.files, dict) else dict(self.files)
        return CaptureState(self.root, _Changes(files), dict(self.dirs), count, size)

    def keep(self) -> None:
        """Make this state stand alone: a derived state's changes are written into the
        files of the state it was derived from (O(changes)), which must not be used
        after this. Nothing to do for any other state."""
        if isinstance(self.files, _Changes):
            self.files = self.files.apply()

    def put(self, relpath: bytes, cached: CachedFile) -> None:
        # Totals not summed yet (a state a full walk fills) are summed when asked: the
        # walk puts every file, and keeping them running cost it a call per file.
        if self._count >= 0:
            old = self.files.get(relpath)
            if old is None:
                self._count += 1
            else:
                self._bytes -= old.size
            self._bytes += cached.size
        self.files[relpath] = cached

    def drop(self, relpath: bytes) -> None:
        old = self.files.pop(relpath, None)
        if old is not None and self._count >= 0:
            self._count -= 1
            self._bytes -= old.size

    def drop_under(self, relpath: bytes) -> None:
        """Forget `relpath` and everything below it (a scan of the cache)."""
        self.drop(relpath)
        prefix = relpath + b"/"
        for key in [k for k in self.files if k.startswith(prefix)]:
            self.drop(key)


def state_path(state_dir: Path, resource: str) -> Path:
    return state_dir / f"{resource}.state"


def load_state(state_dir: Path, resource: str) -> CaptureState:
    """The saved state, or an empty one when absent or unreadable (logged)."""
    path = state_path(state_dir, resource)
    try:
        raw = marshal.loads(path.read_bytes())
        if raw["v"] != _VERSION:
            return CaptureState()
        files = {k: CachedFile(v[0], v[1], v[2], v[3], v[4],
                               tuple((x[0], x[1]) for x in v[5]))
                 for k, v in raw["files"].items()}
        return CaptureState(root=raw["root"], files=files)
    except FileNotFoundError:
        return CaptureState()
    except (OSError, ValueError, EOFError, TypeError, KeyError) as exc:
        log.info("ignoring unreadable capture state %s (%s): files will be re-read",
                 path, exc)
        return CaptureState()


def save_state(state_dir: Path, resource: str, state: CaptureState) -> None:
    """Replace the saved state atomically (blocks). Not fsynced: after a power cut it may
    be the previous state or unreadable, and both only cost re-reading (the workspace
    walks a resource whole when its state is not the latest snapshot's)."""
    raw = {"v": _VERSION, "root": state.root,
           "files": {k: tuple(v) for k, v in state.files.items()}}
    atomic_write(state_path(state_dir, resource), marshal.dumps(raw), durable=False)
