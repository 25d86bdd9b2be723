"""Retention tables: hand-made timelines in, the exact kept set (and why) out. No I/O."""
from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from dwsd.snapshot.retention import KeepPolicy, format_duration, plan_prune, \
    plan_retention

HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Snap:
    id: str
    time: dt.datetime
    kind: str = "periodic"
    tags: tuple[str, ...] = ()


def at(text: str) -> dt.datetime:
    """`2026-10-29T23:00` (UTC unless an offset is given) as an aware datetime."""
    t = dt.datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def sid(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def snap(when: str, kind: str = "periodic", tags: tuple[str, ...] = ()) -> Snap:
    t = at(when)
    return Snap(sid(t), t, kind, tags)


def ids(*whens: str) -> set[str]:
    return {sid(at(w)) for w in whens}


def every_hour(first: str, last: str) -> set[str]:
    """Ids of hourly snapshots from `first` to `last`, both included."""
    t, end, out = at(first), at(last), set()
    while t <= end:
        out.add(sid(t))
        t += HOUR
    return out


# 90 days of hourly snapshots: 2026-08-01T00:00 .. 2026-10-29T23:00 (a Thursday, ISO W44).
NINETY_DAYS = [Snap(sid(t), t) for t in
               (at("2026-08-01T00:00") + i * HOUR for i in range(90 * 24))]
NOW = at("2026-10-30T00:00")


@pytest.mark.parametrize("policy, expected", [
    (KeepPolicy(last=5), every_hour("2026-10-29T19:00", "2026-10-29T23:00")),
    (KeepPolicy(last=0), set()),
    (KeepPolicy(hourly=24), every_hour("2026-10-29T00:00", "2026-10-29T23:00")),
    (KeepPolicy(daily=7), ids(*(f"2026-10-{d}T23:00" for d in range(23, 30)))),
    (KeepPolicy(weekly=4), ids("2026-10-11T23:00", "2026-10-18T23:00", "2026-10-25T23:00",
                               "2026-10-29T23:00")),
    (KeepPolicy(monthly=12), ids("2026-08-31T23:00", "2026-09-30T23:00", "2026-10-29T23:00")),
    (KeepPolicy(yearly=3), ids("2026-10-29T23:00")),
    (KeepPolicy(within=14 * DAY), every_hour("2026-10-16T00:00", "2026-10-29T23:00")),
    (KeepPolicy(daily=7, weekly=4, monthly=12),
     ids(*(f"2026-10-{d}T23:00" for d in range(23, 30)), "2026-10-11T23:00",
         "2026-10-18T23:00", "2026-08-31T23:00", "2026-09-30T23:00")),
], ids=["last5", "last0", "hourly24", "daily7", "weekly4", "monthly12", "yearly3",
        "within14d", "daily7+weekly4+monthly12"])
def test_ninety_days_of_hourly_snapshots(policy: KeepPolicy, expected: set[str]) -> None:
    kept = plan_retention(NINETY_DAYS, {"periodic": policy}, NOW)
    assert set(kept) == expected


def test_expected_counts_per_rule_over_ninety_days() -> None:
    counts = {rule: len(plan_retention(NINETY_DAYS, {"periodic": p}, NOW)) for rule, p in {
        "hourly24": KeepPolicy(hourly=24), "daily7": KeepPolicy(daily=7),
        "daily365": KeepPolicy(daily=365), "within14d": KeepPolicy(within=14 * DAY),
    }.items()}
    assert counts == {"hourly24": 24, "daily7": 7, "daily365": 90, "within14d": 14 * 24}


def test_reasons_name_rule_rank_and_period() -> None:
    policy = KeepPolicy(last=2, daily=2, weekly=2, monthly=2, yearly=1)
    assert plan_retention(NINETY_DAYS, {"periodic": policy}, NOW) == {
        sid(at("2026-09-30T23:00")): ("monthly 2/2 (2026-09)",),
        sid(at("2026-10-25T23:00")): ("weekly 2/2 (2026-W43)",),
        sid(at("2026-10-28T23:00")): ("daily 2/2 (2026-10-28)",),
        sid(at("2026-10-29T22:00")): ("last 2/2",),
        sid(at("2026-10-29T23:00")): ("last 1/2", "daily 1/2 (2026-10-29)",
                                      "weekly 1/2 (2026-W44)", "monthly 1/2 (2026-10)",
                                      "yearly 1/1 (2026)"),
    }


def test_hourly_reason_names_the_hour() -> None:
    kept = plan_retention(NINETY_DAYS, {"periodic": KeepPolicy(hourly=2)}, NOW)
    assert kept == {sid(at("2026-10-29T22:00")): ("hourly 2/2 (2026-10-29T22)",),
                    sid(at("2026-10-29T23:00")): ("hourly 1/2 (2026-10-29T23)",)}


def test_days_without_snapshots_do_not_count() -> None:
    timeline = [snap(w) for w in ("2026-11-01T09:00", "2026-11-02T09:00", "2026-11-05T09:00",
                                  "2026-11-09T09:00", "2026-11-10T09:00")]
    kept = plan_retention(timeline, {"periodic": KeepPolicy(daily=3)}, at("2026-11-20T00:00"))
    assert kept == {sid(at("2026-11-05T09:00")): ("daily 3/3 (2026-11-05)",),
                    sid(at("2026-11-09T09:00")): ("daily 2/3 (2026-11-09)",),
                    sid(at("2026-11-10T09:00")): ("daily 1/3 (2026-11-10)",)}


def test_only_the_newest_snapshot_of_each_hour_is_kept() -> None:
    timeline = [snap(f"2026-11-22T{h:02d}:{m:02d}") for h in (8, 9, 10) for m in (5, 30, 55)]
    kept = plan_retention(timeline, {"periodic": KeepPolicy(hourly=2)}, at("2026-11-22T12:00"))
    assert set(kept) == ids("2026-11-22T09:55", "2026-11-22T10:55")


def test_same_time_is_ordered_by_id() -> None:
    t = at("2026-11-22T10:00")
    timeline = [Snap("b", t), Snap("c", t), Snap("a", t)]
    now = at("2026-11-22T11:00")
    assert plan_retention(timeline, {"periodic": KeepPolicy(hourly=1)}, now) == {
        "c": ("hourly 1/1 (2026-11-22T10)",)}
    assert plan_prune(timeline, {"periodic": KeepPolicy(hourly=1)}, now) == ["a", "b"]


def test_within_keeps_exactly_those_inside_boundary_included() -> None:
    now = at("2026-11-22T10:00")
    timeline = [snap(w) for w in ("2026-11-08T09:59:59", "2026-11-08T10:00",
                                  "2026-11-08T10:00:01", "2026-11-22T10:00")]
    kept = plan_retention(timeline, {"periodic": KeepPolicy(within=14 * DAY)}, now)
    assert kept == {i: ("within 14d",) for i in
                    ids("2026-11-08T10:00", "2026-11-08T10:00:01", "2026-11-22T10:00")}


def test_last_and_daily_reasons_combine() -> None:
    timeline = [snap(w) for w in ("2026-11-20T12:00", "2026-11-21T08:00", "2026-11-21T12:00",
                                  "2026-11-22T08:00", "2026-11-22T12:00")]
    policy = KeepPolicy(last=2, daily=3)
    assert plan_retention(timeline, {"periodic": policy}, at("2026-11-23T00:00")) == {
        sid(at("2026-11-20T12:00")): ("daily 3/3 (2026-11-20)",),
        sid(at("2026-11-21T12:00")): ("daily 2/3 (2026-11-21)",),
        sid(at("2026-11-22T08:00")): ("last 2/2",),
        sid(at("2026-11-22T12:00")): ("last 1/2", "daily 1/3 (2026-11-22)"),
    }


def test_kinds_are_kept_separately() -> None:
    timeline = [snap("2026-11-22T08:00"), snap("2026-11-22T09:00"),
                snap("2026-11-22T10:00", kind="manual"), snap("2026-11-22T11:00", kind="manual")]
    policies = {"periodic": KeepPolicy(last=1), "manual": KeepPolicy()}
    assert plan_retention(timeline, policies, at("2026-11-22T12:00")) == {
        sid(at("2026-11-22T09:00")): ("last 1/1",),
        sid(at("2026-11-22T10:00")): ("keep all",),
        sid(at("2026-11-22T11:00")): ("keep all",),
    }


def test_kind_without_policy_keeps_everything() -> None:
    timeline = [snap("2026-01-01T00:00", kind="pre-restore"), snap("2026-11-22T09:00")]
    kept = plan_retention(timeline, {"periodic": KeepPolicy(last=0)}, at("2026-11-22T12:00"))
    assert kept == {sid(at("2026-01-01T00:00")): ("no policy",)}


def test_manual_empty_policy_keeps_all() -> None:
    timeline = [snap(f"20{y}-06-01T00:00", kind="manual") for y in (20, 24, 26)]
    kept = plan_retention(timeline, {"manual": KeepPolicy()}, at("2026-11-22T12:00"))
    assert kept == {s.id: ("keep all",) for s in timeline}


def test_tagged_snapshots_are_kept() -> None:
    timeline = [snap("2026-11-01T09:00", tags=("baseline",)), snap("2026-11-10T09:00"),
                snap("2026-11-22T09:00", tags=("final",))]
    kept = plan_retention(timeline, {"periodic": KeepPolicy(last=1)}, at("2026-11-22T12:00"))
    assert kept == {sid(at("2026-11-01T09:00")): ("tagged",),
                    sid(at("2026-11-22T09:00")): ("last 1/1", "tagged")}


def test_tagged_false_drops_tagged_snapshots() -> None:
    timeline = [snap("2026-11-01T09:00", tags=("baseline",)), snap("2026-11-22T09:00")]
    policy = KeepPolicy(last=1, tagged=False)
    assert plan_retention(timeline, {"periodic": policy}, at("2026-11-22T12:00")) == {
        sid(at("2026-11-22T09:00")): ("last 1/1",)}


def test_tagged_is_not_a_rule() -> None:
    assert KeepPolicy().keeps_everything()
    assert KeepPolicy(tagged=False).keeps_everything()
    assert not KeepPolicy(last=0).keeps_everything()
    assert not KeepPolicy(within=dt.timedelta(0)).keeps_everything()


def test_empty_input() -> None:
    assert plan_retention([], {"periodic": KeepPolicy(last=3)}, NOW) == {}
    assert plan_prune([], {}, NOW) == []


# ISO 8601: 2026 starts on a Thursday, so it has a week 53: Mon 2026-12-28 .. Sun 2027-01-03.
YEAR_END = [snap(w) for w in ("2026-12-20T12:00", "2026-12-27T12:00", "2026-12-28T12:00",
                              "2026-12-31T12:00", "2027-01-02T12:00", "2027-01-03T12:00",
                              "2027-01-04T12:00", "2027-01-05T12:00")]


def test_iso_calendar_assumption() -> None:
    assert dt.date(2027, 1, 3).isocalendar()[:2] == (2026, 53)
    assert dt.date(2027, 1, 4).isocalendar()[:2] == (2027, 1)


def test_weekly_across_year_boundary_uses_iso_weeks() -> None:
    kept = plan_retention(YEAR_END, {"periodic": KeepPolicy(weekly=3)}, at("2027-01-06T00:00"))
    assert kept == {sid(at("2026-12-27T12:00")): ("weekly 3/3 (2026-W52)",),
                    sid(at("2027-01-03T12:00")): ("weekly 2/3 (2026-W53)",),
                    sid(at("2027-01-05T12:00")): ("weekly 1/3 (2027-W01)",)}


def test_yearly_across_year_boundary_uses_calendar_years() -> None:
    kept = plan_retention(YEAR_END, {"periodic": KeepPolicy(yearly=2)}, at("2027-01-06T00:00"))
    assert kept == {sid(at("2026-12-31T12:00")): ("yearly 2/2 (2026)",),
                    sid(at("2027-01-05T12:00")): ("yearly 1/2 (2027)",)}


def test_periods_are_utc() -> None:
    # 01:30 at +02:00 is 23:30 UTC the day before.
    timeline = [snap("2026-11-21T12:00"), snap("2026-11-22T01:30+02:00")]
    kept = plan_retention(timeline, {"periodic": KeepPolicy(daily=1)}, at("2026-11-23T00:00"))
    assert kept == {sid(at("2026-11-21T23:30")): ("daily 1/1 (2026-11-21)",)}


def test_future_snapshots_are_kept_and_take_no_slot() -> None:
    timeline = [snap("2026-11-22T08:00"), snap("2026-11-22T09:00"),
                snap("2026-11-22T10:00:01"), snap("2027-12-25T00:00")]
    policy = KeepPolicy(last=1, within=HOUR)
    assert plan_retention(timeline, {"periodic": policy}, at("2026-11-22T10:00")) == {
        sid(at("2026-11-22T09:00")): ("last 1/1", "within 1h"),
        sid(at("2026-11-22T10:00:01")): ("future",),
        sid(at("2027-12-25T00:00")): ("future",),
    }


def test_plan_prune_lists_the_rest_oldest_first() -> None:
    pruned = plan_prune(NINETY_DAYS, {"periodic": KeepPolicy(hourly=24)}, NOW)
    assert pruned == [s.id for s in NINETY_DAYS[:-24]]


def test_result_does_not_depend_on_input_order() -> None:
    shuffled = list(NINETY_DAYS)
    random.Random(7).shuffle(shuffled)
    policy = {"periodic": KeepPolicy(last=3, daily=7, weekly=4, within=2 * DAY)}
    expected = plan_retention(NINETY_DAYS, policy, NOW)
    got = plan_retention(shuffled, policy, NOW)
    assert list(got.items()) == list(expected.items())
    assert list(got) == sorted(got)  # oldest first: ids here sort like times


@pytest.mark.parametrize("bad", [
    lambda: plan_retention([snap("2026-11-22T10:00")], {}, dt.datetime(2026, 11, 22)),
    lambda: plan_retention([Snap("x", dt.datetime(2026, 11, 22))], {}, NOW),
    lambda: plan_retention([Snap("x", NOW), Snap("y", dt.datetime(2026, 11, 22))], {}, NOW),
    lambda: plan_retention([Snap("x", NOW), Snap("x", NOW - HOUR)], {}, NOW),
    lambda: KeepPolicy(daily=-1),
    lambda: KeepPolicy(within=-DAY),
], ids=["naive-now", "naive-time", "naive-among-aware", "repeated-id", "negative-count",
        "negative-within"])
def test_invalid_input_raises(bad: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        bad()


@pytest.mark.parametrize("duration, text", [
    (14 * DAY, "14d"), (36 * HOUR, "36h"), (dt.timedelta(minutes=90), "90m"),
    (dt.timedelta(seconds=45), "45s"), (dt.timedelta(0), "0d"),
])
def test_format_duration(duration: dt.timedelta, text: str) -> None:
    assert format_duration(duration) == text
