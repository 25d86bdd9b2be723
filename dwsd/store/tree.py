"""Trees: one directory's entries in a canonical binary encoding.

Entries are sorted by their byte name and every field has exactly one encoding, so equal
directories (same names, content and metadata) always get the same tree id, as in git.
Names are bytes end to end. `decode_tree` validates names (no `/`, NUL, `.` or `..`, strictly
increasing), so nothing read from the store can make a restore or the view leave its root.

Layout: MAGIC, then per entry
    header  struct ">cHIIIqQQQHH": kind, name length, mode, uid, gid, mtime_ns, size, rdev,
            ino, target length, xattr count
    name, [32-byte ref for files and directories], target, then per xattr
    struct ">HI" name length, value length, name, value.
A time outside what 64-bit nanoseconds hold (before 1677-09-21 or after 2262-04-11; ext4
takes mtimes up to 2446) is stored as the nearest one they do, with a warning, so one odd
file does not fail the snapshot of its whole resource.
"""
from __future__ import annotations

import logging
import stat as stat_mod
import struct
from typing import Iterable, NamedTuple

from dwsd.errors import CorruptObjectError
from dwsd.store.ids import ObjectId, raw_id

MAGIC = b"dwsd-tree-1\n"

FILE, DIR, SYMLINK, FIFO, SOCKET, CHAR, BLOCK = (b"f", b"d", b"l", b"p", b"s", b"c", b"b")
KINDS = (FILE, DIR, SYMLINK, FIFO, SOCKET, CHAR, BLOCK)
_WITH_REF = (FILE, DIR)

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">cHIIIqQQQHH")
_NS_MIN, _NS_MAX = -(2**63), 2**63 - 1
_XATTR = struct.Struct(">HI")

Xattrs = tuple[tuple[bytes, bytes], ...]


class Entry(NamedTuple):
    """One name in a directory.

    `ref` is the blob id of a file's content or the tree id of a directory, else None.
    `size` is the content length (files), target length (symlinks), 0 otherwise.
    `ino` is non-zero only for files with more than one link; entries of one resource
    with the same `ino` are hard links to one file.

    A NamedTuple, not a frozen dataclass: decoding a tree builds one per name, and a
    frozen dataclass took 3.8 µs each (its __init__ goes through object.__setattr__),
    most of the cost of decoding for the view, gc and restore.
    """

    name: bytes
    kind: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    ref: ObjectId | None = None
    target: bytes = b""
    rdev: int = 0
    ino: int = 0
    xattrs: Xattrs = ()

    @property
    def st_mode(self) -> int:
        """The full st_mode (type bits and permissions)."""
        return TYPE_BITS[self.kind] | self.mode


TYPE_BITS = {  # kind -> the st_mode type bits
    FILE: stat_mod.S_IFREG, DIR: stat_mod.S_IFDIR, SYMLINK: stat_mod.S_IFLNK,
    FIFO: stat_mod.S_IFIFO, SOCKET: stat_mod.S_IFSOCK, CHAR: stat_mod.S_IFCHR,
    BLOCK: stat_mod.S_IFBLK,
}


_KIND_OF_TYPE = {bits: kind for kind, bits in TYPE_BITS.items()}


def kind_of_mode(st_mode: int) -> bytes:
    """Map an st_mode to an entry kind."""
    try:
        return _KIND_OF_TYPE[stat_mod.S_IFMT(st_mode)]
    except KeyError:
        raise ValueError(f"unknown file type {st_mode:o}") from None


def encode_tree(entries: Iterable[Entry]) -> bytes:
    """Encode entries canonically (sorted by name). Raises ValueError on bad names.

    It runs for every directory on the path of every change, so the names are checked
    all at once (one scan of their concatenation, one set) rather than one call each."""
    ordered = sorted(entries, key=entry_name)
    _check_names([e.name for e in ordered])
    parts = [MAGIC]
    append, pack, with_ref = parts.append, _HEADER.pack, _WITH_REF
    for e in ordered:
        name, kind, target, xattrs = e.name, e.kind, e.target, e.xattrs
        try:
            header = pack(kind, len(name), e.mode, e.uid, e.gid, e.mtime_ns, e.size,
                          e.rdev, e.ino, len(target), len(xattrs))
        except struct.error:  # off the hot path: only an out-of-range time gets here
            header = pack(kind, len(name), e.mode, e.uid, e.gid, _clamped_time(e),
                          e.size, e.rdev, e.ino, len(target), len(xattrs))
        append(header)
        append(name)
        if kind in with_ref:
            if e.ref is None:
                raise ValueError(f"{name!r} has no content reference")
            append(raw_id(e.ref))
        append(target)
        for xname, xvalue in sorted(xattrs):
            append(_XATTR.pack(len(xname), len(xvalue)))
            append(xname)
            append(xvalue)
    return b"".join(parts)


def entry_name(entry: Entry) -> bytes:
    """The sort key of entries in a tree (for `sorted` and `bisect`)."""
    return entry.name


def _check_names(names: list[bytes]) -> None:
    """Raise ValueError unless every name is valid (see `check_name`) and none repeats;
    `names` are sorted."""
    joined = b"".join(names)
    distinct = set(names)
    if b"/" in joined or b"\0" in joined or distinct & _SPECIAL_NAMES:
        for name in names:
            check_name(name)
    if len(distinct) != len(names):
        twice = next(a for a, b in zip(names, names[1:]) if a == b)
        raise ValueError(f"duplicate name {twice!r}")


_SPECIAL_NAMES = {b"", b".", b".."}


def check_name(name: bytes) -> None:
    """Raise ValueError unless `name` is a single, non-special path component."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise ValueError(f"invalid entry name {name!r}")


def _clamped_time(e: Entry) -> int:
    clamped = min(max(e.mtime_ns, _NS_MIN), _NS_MAX)
    if clamped != e.mtime_ns:
        log.warning("the mtime of %r is out of range; stored as %d ns", e.name, clamped)
    return clamped


def decode_tree(data: bytes, oid: str = "?") -> list[Entry]:
    """Decode a tree; raise CorruptObjectError on any malformation (names included)."""
    try:
        return _decode(data)
    except (struct.error, ValueError) as exc:
        raise CorruptObjectError(f"tree {oid} is corrupt: {exc}") from exc


def _decode(data: bytes) -> list[Entry]:
    # The view decodes every tree a walk enters, so the loop does only the unpacking:
    # the names are checked once per tree, all together, after it (as in encode_tree).
    if not data.startswith(MAGIC):
        raise ValueError("bad magic")
    entries: list[Entry] = []
    names: list[bytes] = []
    append, add_name = entries.append, names.append
    unpack, header, with_ref = _HEADER.unpack_from, _HEADER.size, _WITH_REF
    # Entries are made as tuples of their class directly, and ids are left as the str
    # `hex()` gives (ObjectId is that str): the class's __new__ and NewType's call were
    # a fifth of decoding.
    new, entry_class = tuple.__new__, Entry
    pos, end = len(MAGIC), len(data)
    while pos < end:
        (kind, nlen, mode, uid, gid, mtime, size, rdev, ino, tlen,
         nx) = unpack(data, pos)
        pos += header
        name = data[pos:pos + nlen]
        pos += nlen
        ref = None
        if kind in with_ref:
            ref = data[pos:pos + 32].hex()
            pos += 32
        elif kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        target = data[pos:pos + tlen] if tlen else b""
        pos += tlen
        xattrs: Xattrs = ()
        if nx:
            pos, xattrs = _decode_xattrs(data, pos, nx)
        if pos > end:
            raise ValueError("truncated")
        add_name(name)
        append(new(entry_class, (name, kind, mode, uid, gid, mtime, size, ref, target, rdev,
                                 ino, xattrs)))
    _check_names(names)
    if names != sorted(names):
        raise ValueError("names out of order")
    return entries


def _decode_xattrs(data: bytes, pos: int, count: int) -> tuple[int, Xattrs]:
    xattrs = []
    for _ in range(count):
        xl, vl = _XATTR.unpack_from(data, pos)
        pos += _XATTR.size
        xattrs.append((data[pos:pos + xl], data[pos + xl:pos + xl + vl]))
        pos += xl + vl
    return pos, tuple(xattrs)
