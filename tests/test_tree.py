"""Tree encoding: canonical, bytes names, validated on decode."""
from __future__ import annotations

import pytest

from dwsd.errors import CorruptObjectError, InvalidIdError
from dwsd.store.ids import hash_bytes, validate_object_id
from dwsd.store.tree import DIR, FILE, MAGIC, SYMLINK, Entry, decode_tree, encode_tree

BLOB = hash_bytes(b"content")


def entry(name: bytes, **kw: object) -> Entry:
    fields: dict[str, object] = dict(kind=FILE, mode=0o644, uid=0, gid=0, mtime_ns=1,
                                     size=7, ref=BLOB)
    fields.update(kw)
    return Entry(name, **fields)  # type: ignore[arg-type]


def test_encoding_is_canonical_whatever_the_order() -> None:
    a, b = entry(b"a"), entry(b"\xffb")
    assert encode_tree([a, b]) == encode_tree([b, a])


def test_round_trip_keeps_every_field() -> None:
    items = [entry(b"f", xattrs=((b"user.a", b"1"), (b"user.b", b""))),
             entry(b"d", kind=DIR, size=0),
             entry(b"l", kind=SYMLINK, ref=None, target=b"../x\xff", size=5),
             entry(b"old", mtime_ns=-10**18, ino=99)]
    assert decode_tree(encode_tree(items)) == sorted(items, key=lambda e: e.name)


def test_a_time_beyond_64_bit_nanoseconds_is_stored_as_the_nearest_one(
        caplog: pytest.LogCaptureFixture) -> None:
    # ext4 keeps mtimes up to 2446, past what signed 64-bit nanoseconds reach (2262).
    late, early = entry(b"late", mtime_ns=2**64), entry(b"early", mtime_ns=-(2**64))
    kept = entry(b"kept", mtime_ns=2**63 - 1)
    decoded = {e.name: e for e in decode_tree(encode_tree([late, early, kept]))}
    assert decoded[b"late"] == late._replace(mtime_ns=2**63 - 1)
    assert decoded[b"early"] == early._replace(mtime_ns=-(2**63))
    assert decoded[b"kept"] == kept
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "b'late'" in warned[1] and "out of range" in warned[1]
    caplog.clear()


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"a\0b"])
def test_bad_names_are_refused(name: bytes) -> None:
    with pytest.raises(ValueError, match="invalid entry name"):
        encode_tree([entry(name)])
    with pytest.raises(ValueError, match="invalid entry name"):
        encode_tree([entry(b"a"), entry(name), entry(b"z")])


def test_a_repeated_name_is_refused() -> None:
    with pytest.raises(ValueError, match="duplicate name b'b'"):
        encode_tree([entry(b"a"), entry(b"b"), entry(b"c"), entry(b"b", size=2)])


def test_decode_refuses_a_tree_with_a_slash_in_a_name() -> None:
    data = encode_tree([entry(b"ab")]).replace(b"ab", b"a/")
    with pytest.raises(CorruptObjectError):
        decode_tree(data)


@pytest.mark.parametrize("cut", [3, 20, 40])
def test_decode_refuses_truncated_data(cut: int) -> None:
    data = encode_tree([entry(b"x", xattrs=((b"user.a", b"1"),)), entry(b"y")])
    with pytest.raises(CorruptObjectError, match="truncated|unpack"):
        decode_tree(data[:-cut])


def _renamed(data: bytes, old: bytes, new: bytes) -> bytes:
    """`data` with the name `old` overwritten by `new` (same length), as a bad store
    might hold it."""
    assert len(old) == len(new) and data.count(old) == 1
    return data.replace(old, new)


@pytest.mark.parametrize("new, message", [
    (b"..", "invalid entry name"), (b"a\0", "invalid entry name"),
    (b"aa", "duplicate name b'aa'"), (b"zz", "out of order")])
def test_decode_refuses_bad_names_and_order(new: bytes, message: str) -> None:
    data = _renamed(encode_tree([entry(b"aa"), entry(b"mm"), entry(b"qq")]), b"mm", new)
    with pytest.raises(CorruptObjectError, match=message):
        decode_tree(data)


def test_decode_refuses_an_unknown_kind() -> None:
    data = encode_tree([entry(b"l", kind=SYMLINK, ref=None, target=b"t", size=1)])
    bad = data[:len(MAGIC)] + b"q" + data[len(MAGIC) + 1:]
    with pytest.raises(CorruptObjectError, match="unknown kind"):
        decode_tree(bad)


@pytest.mark.parametrize("text", ["", "abc", "../" + "0" * 61, "A" * 64, "0" * 65])
def test_object_ids_are_validated(text: str) -> None:
    with pytest.raises(InvalidIdError):
        validate_object_id(text)
