"""Retention: which snapshots a policy keeps, and why. A pure function, no I/O.

`plan_retention` maps each kept snapshot id to the reasons it is kept; every snapshot
not in that mapping is to be pruned (`plan_prune` lists those). Rules follow borg and
restic: each rule is applied on its own to all snapshots of one kind, and a snapshot is
kept if any rule keeps it, so it may carry several reasons.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Protocol, TypeVar

_COUNT_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class KeepPolicy:
    """How many snapshots of one kind to keep. `None` means the rule is not used.

    `last` keeps the newest N; `hourly`..`yearly` keep the newest snapshot of each of the
    N most recent periods (UTC; weeks are ISO weeks) that have one; `within` keeps
    everything at most that old. `tagged` keeps every snapshot with a tag given by hand.
    A policy with no count or `within` rule keeps everything (the `manual: {}` case);
    `tagged` is not a rule in that sense. Raises ValueError for a negative count or
    a negative `within`.
    """

    last: int | None = None
    hourly: int | None = None
    daily: int | None = None
    weekly: int | None = None
    monthly: int | None = None
    yearly: int | None = None
    within: dt.timedelta | None = None
    tagged: bool = True

    def __post_init__(self) -> None:
        for name in _COUNT_RULES:
            n = getattr(self, name)
            if n is not None and n < 0:
                raise ValueError(f"keep {name} must be >= 0, not {n}")
        if self.within is not None and self.within < dt.timedelta(0):
            raise ValueError(f"keep within must not be negative, not {self.within}")

    def keeps_everything(self) -> bool:
        """True when no count or `within` rule is set."""
        return all(getattr(self, f.name) is None for f in fields(self) if f.name != "tagged")


class RetentionCandidate(Protocol):
    """What retention needs to know of a snapshot. `time` is timezone-aware (UTC)."""

    @property
    def id(self) -> str: ...

    @property
    def time(self) -> dt.datetime: ...

    @property
    def kind(self) -> str: ...

    @property
    def tags(self) -> Sequence[str]: ...


C = TypeVar("C", bound=RetentionCandidate)

Reasons = dict[str, tuple[str, ...]]


def _utc(t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.timezone.utc)


def _iso_week(t: dt.datetime) -> str:
    year, week, _ = _utc(t).isocalendar()
    return f"{year}-W{week:02d}"


# Period rules in the order their reasons are listed; each maps a time to its period label.
_PERIODS: tuple[tuple[str, Callable[[dt.datetime], str]], ...] = (
    ("hourly", lambda t: _utc(t).strftime("%Y-%m-%dT%H")),
    ("daily", lambda t: _utc(t).strftime("%Y-%m-%d")),
    ("weekly", _iso_week),
    ("monthly", lambda t: _utc(t).strftime("%Y-%m")),
    ("yearly", lambda t: _utc(t).strftime("%Y")),
)


def plan_retention(snapshots: Iterable[C], policies: Mapping[str, KeepPolicy],
                   now: dt.datetime) -> Reasons:
    """Return {id: reasons} for the snapshots to keep, oldest first; prune all others.

    Rules apply per kind; a kind missing from `policies` keeps everything ("no policy"),
    a policy without rules keeps everything ("keep all"). Otherwise reasons are, in this
    order: "future" (time after `now`: always kept, and counted by no other rule),
    "last K/N", "hourly K/N (2026-11-22T10)", "daily K/N (2026-11-22)",
    "weekly K/N (2026-W47)", "monthly K/N (2026-11)", "yearly K/N (2026)",
    "within 14d" (now - time <= within) and "tagged". Snapshots are ordered by
    (time, id), so the result does not depend on input order. Raises ValueError for a
    naive datetime or a repeated id. Pure: never blocks, no I/O.
    """
    ordered = _sorted_candidates(snapshots, now)
    kept: Reasons = {}
    for kind in sorted({s.kind for s in ordered}):
        group = [s for s in ordered if s.kind == kind]
        kept.update(_plan_kind(group, policies.get(kind), now))
    return {s.id: kept[s.id] for s in ordered if s.id in kept}


def plan_prune(snapshots: Iterable[C], policies: Mapping[str, KeepPolicy],
               now: dt.datetime) -> list[str]:
    """Return the ids `plan_retention` does not keep, oldest first (by time, then id)."""
    ordered = _sorted_candidates(snapshots, now)
    kept = plan_retention(ordered, policies, now)
    return [s.id for s in ordered if s.id not in kept]


def _sorted_candidates(snapshots: Iterable[C], now: dt.datetime) -> list[C]:
    """The snapshots oldest first by (time, id), after checking times and ids."""
    _require_aware(now, "now")
    snapshots = list(snapshots)
    for s in snapshots:  # before sorting: naive and aware times do not even compare
        _require_aware(s.time, f"time of snapshot {s.id!r}")
    ordered = sorted(snapshots, key=lambda s: (s.time, s.id))
    seen: set[str] = set()
    for s in ordered:
        if s.id in seen:
            raise ValueError(f"snapshot id {s.id!r} appears twice")
        seen.add(s.id)
    return ordered


def _require_aware(t: dt.datetime, what: str) -> None:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got {t.isoformat()}")


def _plan_kind(group: Sequence[C], policy: KeepPolicy | None, now: dt.datetime) -> Reasons:
    """Reasons for the kept snapshots of one kind; `group` is oldest first."""
    if policy is None:
        return {s.id: ("no policy",) for s in group}
    if policy.keeps_everything():
        return {s.id: ("keep all",) for s in group}
    # Clock skew must never prune: a snapshot from the future is kept and left out of
    # the counts, so that new snapshots still fill the rules after the clock went back.
    reasons: dict[str, list[str]] = {s.id: ["future"] for s in group if s.time > now}
    past_newest_first = [s for s in reversed(group) if s.time <= now]
    for snapshot_id, reason in _rule_reasons(past_newest_first, policy, now):
        reasons.setdefault(snapshot_id, []).append(reason)
    return {i: tuple(r) for i, r in reasons.items()}


def _rule_reasons(newest_first: Sequence[C], policy: KeepPolicy,
                  now: dt.datetime) -> Iterator[tuple[str, str]]:
    """Yield (id, reason) for each rule of `policy`, in the documented reason order."""
    if policy.last is not None:
        yield from _keep_last(newest_first, policy.last)
    for rule, label in _PERIODS:
        n = getattr(policy, rule)
        if n is not None:
            yield from _keep_periods(newest_first, rule, n, label)
    if policy.within is not None:
        yield from _keep_within(newest_first, policy.within, now)
    if policy.tagged:
        yield from ((s.id, "tagged") for s in newest_first if s.tags)


def _keep_last(newest_first: Sequence[C], n: int) -> Iterator[tuple[str, str]]:
    for rank, s in enumerate(newest_first[:n], start=1):
        yield s.id, f"last {rank}/{n}"


def _keep_periods(newest_first: Sequence[C], rule: str, n: int,
                  label: Callable[[dt.datetime], str]) -> Iterator[tuple[str, str]]:
    """The newest snapshot of each of the `n` most recent periods that have one."""
    seen: set[str] = set()
    for s in newest_first:
        if len(seen) == n:
            return
        period = label(s.time)
        if period not in seen:
            seen.add(period)
            yield s.id, f"{rule} {len(seen)}/{n} ({period})"


def _keep_within(newest_first: Sequence[C], within: dt.timedelta,
                 now: dt.datetime) -> Iterator[tuple[str, str]]:
    reason = f"within {format_duration(within)}"
    for s in newest_first:
        if now - s.time > within:
            return
        yield s.id, reason


def format_duration(d: dt.timedelta) -> str:
    """`14d`, `36h`, `90m`, `45s`: the largest unit that divides `d` exactly."""
    seconds = d.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
