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

Written whole, a state costs O(files): 2.9 MB and 20-100 ms for the bench set's 20,204
files, a second and 150 MB for a million. So a state whose changes since it was last
written are known (`CaptureState.unsaved`: a dirty-path capture's, or a full walk's over
a state whose saved copy is known: the walk reports them, see `capture._Walker.changes`)
is saved as one record appended to `<resource>.state.log` instead: O(changes). A record
names the state file it applies to (`epoch`, random, new with each whole write), its
place in the chain (`seq`) and the root it starts from (`base`); it carries its own
length and CRC-32. Loading applies the records in order and stops at the first that is
torn, from another epoch or out of chain, and then the next save writes the state whole
(and removes the log). A whole write is also due once the log has grown past
LOG_LIMIT_FRACTION of the state file. Records are not fsynced either: a power cut leaves
the state of an earlier record, which costs a full walk (the workspace's state is then
not the latest snapshot's) that re-reads only the files changed since.
"""
from __future__ import annotations

import logging
import marshal
import os
import secrets
import struct
import time
import zlib
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from dwsd.crashpoints import crash_point
from dwsd.store.fsutil import atomic_write
from dwsd.store.ids import ObjectId
from dwsd.store.tree import Xattrs

log = logging.getLogger(__name__)

_VERSION = 1
_CLOCK_REALTIME_COARSE = 5  # Linux constant; not exported by the time module
RACY_WINDOW_NS = max(2 * int(time.clock_getres(_CLOCK_REALTIME_COARSE) * 1e9), 0) + 2_000_000
UNTRUSTED = -1
LOG_SUFFIX = ".log"  # <resource>.state.log
# The log is written whole again (with the state) once it passes this part of the state
# file, or LOG_MIN_LIMIT: loading replays it all, and a state is mostly read at start.
LOG_LIMIT_FRACTION = 0.25
LOG_MIN_LIMIT = 1 << 20
_FRAME = struct.Struct("<II")  # record length, CRC-32 of the record


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
    # The files changed (None: dropped) since this state was as its saved copy, or None
    # when that is not known (a new state, a full walk's): then it is saved whole.
    unsaved: dict[bytes, CachedFile | None] | None = field(default=None, compare=False,
                                                          repr=False)
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
        # The new state shares `unsaved`, and adds its changes to it only in `keep`.
        return CaptureState(self.root, _Changes(files), dict(self.dirs), self.unsaved,
                            count, size)

    def keep(self) -> None:
        """Make this state stand alone: a derived state's changes are written into the
        files of the state it was derived from (O(changes)), which must not be used
        after this. Nothing to do for any other state."""
        if isinstance(self.files, _Changes):
            if self.unsaved is not None:
                self.unsaved.update(self.files.changed)
            self.files = self.files.apply()

    def removed(self) -> int:
        """A derived state's (see `derive`), not yet kept: how many files of the state
        it was derived from it drops. O(changes)."""
        files = self.files
        assert isinstance(files, _Changes)
        return sum(1 for k, v in files.changed.items() if v is None and k in files.base)

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


class SavedState(NamedTuple):
    """What a resource's state files hold, as this process last read or wrote them."""
    epoch: str               # of the state file, named by each record of its log
    root: ObjectId | None    # after the last record
    records: int
    log_bytes: int
    state_bytes: int

    def log_is_full(self) -> bool:
        return self.log_bytes >= max(LOG_MIN_LIMIT, self.state_bytes * LOG_LIMIT_FRACTION)


def state_path(state_dir: Path, resource: str) -> Path:
    return state_dir / f"{resource}.state"


def log_path(state_dir: Path, resource: str) -> Path:
    return state_dir / f"{resource}.state{LOG_SUFFIX}"


def load_state(state_dir: Path, resource: str) -> tuple[CaptureState, SavedState | None]:
    """The saved state with its log applied, or an empty one when absent or unreadable
    (logged); and what is on disk, or None when the next save must write it whole (no
    epoch: a state written before logs; a log with a record that does not apply)."""
    path = state_path(state_dir, resource)
    try:
        data = path.read_bytes()
        raw = marshal.loads(data)
        if raw["v"] != _VERSION:
            return CaptureState(), None
        files = {k: _cached(v) for k, v in raw["files"].items()}
    except FileNotFoundError:
        return CaptureState(), None
    except (OSError, ValueError, EOFError, TypeError, KeyError, IndexError,
            AttributeError) as exc:
        log.info("ignoring unreadable capture state %s (%s): files will be re-read",
                 path, exc)
        return CaptureState(), None
    state = CaptureState(root=raw["root"], files=files, unsaved={})
    epoch = raw.get("epoch")
    if not isinstance(epoch, str):
        return state, None
    saved = _replay(log_path(state_dir, resource), state,
                    SavedState(epoch, state.root, 0, 0, len(data)))
    return state, saved


def _cached(v: Any) -> CachedFile:
    """A CachedFile from its saved tuple (raises on a malformed one)."""
    return CachedFile(v[0], v[1], v[2], v[3], v[4], tuple((x[0], x[1]) for x in v[5]))


def _replay(path: Path, state: CaptureState, saved: SavedState) -> SavedState | None:
    """Apply the records of the log at `path` to `state` (loaded from the file `saved`
    describes), in order, up to the first that does not apply; the SavedState after
    them, or None when one did not apply (then the log is not appended to again)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return saved
    except OSError as exc:
        log.info("ignoring unreadable capture state log %s (%s)", path, exc)
        return None
    pos = 0
    while pos < len(data):
        record = _record_at(data, pos)
        if record is None:
            log.info("capture state log %s: torn record at byte %d; the state is the one "
                     "before it", path, pos)
            return None
        try:
            raw = marshal.loads(record)
            if (raw["epoch"] != saved.epoch or raw["seq"] != saved.records + 1
                    or raw["base"] != saved.root):
                log.info("capture state log %s: the record at byte %d does not follow; "
                         "the state is the one before it", path, pos)
                return None
            changes = {k: None if v is None else _cached(v) for k, v in raw["files"].items()}
        except (ValueError, EOFError, TypeError, KeyError, IndexError,
                AttributeError) as exc:
            log.info("capture state log %s: unreadable record at byte %d (%s)", path, pos,
                     exc)
            return None
        assert isinstance(state.files, dict)
        for key, value in changes.items():
            if value is None:
                state.files.pop(key, None)
            else:
                state.files[key] = value
        state.root = raw["root"]
        pos += _FRAME.size + len(record)
        saved = saved._replace(root=state.root, records=saved.records + 1, log_bytes=pos)
    return saved


def _record_at(data: bytes, pos: int) -> bytes | None:
    """The record framed at `pos`, or None when it is torn or its CRC differs."""
    if pos + _FRAME.size > len(data):
        return None
    length, crc = _FRAME.unpack_from(data, pos)
    record = data[pos + _FRAME.size:pos + _FRAME.size + length]
    if len(record) != length or zlib.crc32(record) != crc:
        return None
    return record


def save_state(state_dir: Path, resource: str, state: CaptureState,
               saved: SavedState | None, whole: bool = True) -> SavedState | None:
    """Save `state` (blocks): as a record appended to the log when its changes since
    `saved` (what is on disk) are known and the log has room, else, if `whole`, as a
    new state file (the log removed). Returns what is on disk then; None when only a
    whole write would do and `whole` is False (then the next save must be whole). Not
    fsynced: see the module docstring."""
    if (saved is not None and state.unsaved is not None and state.root is not None
            and not saved.log_is_full()):
        record = marshal.dumps({
            "epoch": saved.epoch, "seq": saved.records + 1, "base": saved.root,
            "root": state.root,
            "files": {k: None if v is None else tuple(v) for k, v in state.unsaved.items()}})
        frame = _FRAME.pack(len(record), zlib.crc32(record)) + record
        try:
            fd = os.open(log_path(state_dir, resource),
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                written = os.write(fd, frame)
            finally:
                os.close(fd)
        except OSError as exc:  # the snapshot is recorded; the state can wait
            log.warning("cannot append to the capture state log of %s: %s", resource,
                        exc.strerror)
            written = 0
        # A short write leaves a torn record, which ends the log for the next load; so
        # a failed append is followed by a whole write (None below).
        if written == len(frame):
            state.unsaved = {}
            return saved._replace(root=state.root, records=saved.records + 1,
                                  log_bytes=saved.log_bytes + len(frame))
    if not whole:
        return None
    epoch = secrets.token_hex(8)
    data = marshal.dumps({"v": _VERSION, "root": state.root, "epoch": epoch,
                          "files": {k: tuple(v) for k, v in state.files.items()}})
    atomic_write(state_path(state_dir, resource), data, durable=False)
    crash_point("state-rewritten")
    # After the new file: a log left by a crash here names the old epoch, and is ignored.
    try:
        os.unlink(log_path(state_dir, resource))
    except FileNotFoundError:
        pass
    state.unsaved = {}
    return SavedState(epoch, state.root, 0, 0, len(data))
