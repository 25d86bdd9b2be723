"""Catalog: references, tag rules, merging, atomic commit."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest

from dwsd.errors import RefError, TagError
from dwsd.store.catalog import Catalog, Counts, SnapshotRecord, check_tag, \
    manifest_hash, snapshot_id_for
from dwsd.store.ids import hash_bytes

T0 = dt.datetime(2026, 11, 22, 10, 30, 5, tzinfo=dt.timezone.utc)


def record(cat: Catalog, n: int, tags: tuple[str, ...] = (), kind: str = "manual"
           ) -> SnapshotRecord:
    roots = {"data": hash_bytes(str(n).encode())}
    t = T0 + dt.timedelta(minutes=n)
    return cat.add(SnapshotRecord(cat.new_id(t), manifest_hash(roots), 0, kind, tags,
                                  "", "host", t, roots))


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    c = Catalog(tmp_path / "catalog.json")
    for n in range(3):
        record(c, n, ("first",) if n == 0 else ())
    return c


def test_references_resolve_every_way(cat: Catalog) -> None:
    first, _, last = cat.history()[::-1]
    assert cat.resolve("latest") == last
    assert cat.resolve("first") == first
    assert cat.resolve(first.id) == first
    assert cat.resolve(first.hash[:6]) == first


def test_short_or_unknown_references_fail(cat: Catalog) -> None:
    with pytest.raises(RefError, match="no snapshot matches 'abc'"):
        cat.resolve("abc")
    with pytest.raises(RefError):
        cat.resolve("nope")


def test_ambiguous_hash_prefix_is_an_error(tmp_path: Path) -> None:
    c = Catalog(tmp_path / "c.json")
    recs = [record(c, n) for n in range(400)]
    prefix = next(a.hash[:4] for a in recs for b in recs
                  if a is not b and a.hash[:4] == b.hash[:4])
    with pytest.raises(RefError, match="ambiguous"):
        c.resolve(prefix)


@pytest.mark.parametrize("tag", ["", "a/b", ".", "..", "x" * 129, "latest", "20261122T103005Z",
                                 "beef", "0123abcd", "tab\there", " ", " padded",
                                 "padded ", ".hidden", "-rf", "caf\udce9"])
def test_bad_tags_are_refused(tag: str) -> None:
    with pytest.raises(TagError):
        check_tag(tag)


@pytest.mark.parametrize("tag", ["before-training", "v1.2", "ü-data", "abc", "x" * 128,
                                 "with space", "a.", "a-"])
def test_good_tags_pass(tag: str) -> None:
    check_tag(tag)


def test_a_tag_lives_on_one_snapshot(cat: Catalog) -> None:
    with pytest.raises(TagError, match="already on snapshot"):
        cat.tag("latest", "first")


def test_merge_adds_tags_and_message_once(cat: Catalog) -> None:
    rec = cat.merge(cat.resolve("latest"), ["again"], "note")
    rec = cat.merge(rec, ["again"], "note")
    assert rec.tags == ("again",) and rec.message == "note"


def test_ids_stay_unique_within_one_second() -> None:
    taken = {snapshot_id_for(T0, [])}
    assert snapshot_id_for(T0, taken) == "20261122T103006Z"


def test_commit_and_load_round_trip(cat: Catalog) -> None:
    cat.commit()
    again = Catalog.load(cat.path)
    assert again.history() == cat.history()
    assert again.next_number == 4
    assert [r.number for r in again.history()] == [3, 2, 1]
    # One JSON document, a snapshot a line, oldest first (grep finds a snapshot's line).
    lines = cat.path.read_text().splitlines()
    assert len(lines) == 2 + 3
    assert [json.loads(line.rstrip(","))["number"] for line in lines[1:-1]] == [1, 2, 3]
    assert json.loads(cat.path.read_text())["next_number"] == 4
    empty = Catalog(cat.path.with_name("empty.json"))
    empty.commit()
    assert Catalog.load(empty.path).history() == []


def test_a_record_as_json_has_every_field_and_reads_back() -> None:
    """to_json is written field by field (for speed): a field added to the record or
    its counts must not be left out of the catalog file."""
    roots = {"data": hash_bytes(b"d"), "code": hash_bytes(b"c")}
    rec = SnapshotRecord("20261122T103005Z", manifest_hash(roots), 7, "periodic",
                         ("v1", "best"), "a message", "host", T0, roots,
                         Counts(files=3, bytes=40, changed_files=2, added_bytes=30,
                                removed_files=4),
                         {"data": (0o755, 1000, 100, 17), "code": (0o700, 0, 0, -5)})
    doc = rec.to_json()
    assert set(doc) == {f.name for f in dataclasses.fields(rec)}
    assert doc["counts"] == dataclasses.asdict(rec.counts)
    assert doc["time"] == "2026-11-22T10:30:05Z" and doc["root_meta"]["code"] == [448, 0, 0, -5]
    assert SnapshotRecord.from_json(json.loads(json.dumps(doc))) == rec
    del doc["counts"]["removed_files"]  # a record written before it was counted
    assert SnapshotRecord.from_json(doc).counts.removed_files == 0


def test_history_filters_and_limits(cat: Catalog) -> None:
    assert len(cat.history(limit=2)) == 2
    assert cat.history(kind="periodic") == []
    periodic = [record(cat, n, kind="periodic") for n in (3, 4, 5)]
    assert cat.history(kind="periodic") == periodic[::-1]
    assert cat.history(kind="periodic", limit=2) == periodic[:0:-1]
    assert [r.number for r in cat.history(kind="manual")] == [3, 2, 1]
