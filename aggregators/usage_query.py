"""Usage as the database holds it, for product teams: exact totals per window, or rolled up.

Read from ``window_totals`` (the aggregators' table) by its primary key (customer, meter,
window_start): one index range scan, bounded by :data:`MAX_WINDOWS` of the meter's own windows
and :data:`MAX_STORED_ROWS` rows (windows times combinations), so a query costs the same in the
tenth year as in the first.

Rolling windows up is exact for each aggregation, or refused (:class:`InvalidQueryError`):
- ``sum`` and ``count`` add;
- ``max`` and ``min`` take the largest or smallest;
- ``last`` takes the value of the window whose last event is latest (by event time, then id,
  as the aggregators order them);
- ``unique_count``: distinct counts of two months cannot be added (a user active in both would
  count twice), and the digests that would allow it are pruned soon after a month closes; so a
  query over more than one of its months is refused, never answered wrong.

A meter with dimensions keeps one row per window and combination of its dimension values.
Without ``group_by`` the combinations of a window are merged into one total by the same rules
(a unique_count refuses: one value seen under two combinations would count twice); with
``group_by`` (some of the dimensions) there is one series per group of their values
(meterstream/grouped_totals.py decides which groupings are exact).

A window is half-open ``[start, end)`` in UTC. ``from`` and ``to`` must fall on boundaries of
the requested window (a stored window cannot be split), and windows no event reached are left
out. ``revision`` of a stored window is its own revision (it rises at every change); of a rolled
up window, the sum of its windows' revisions, so it too rises whenever any of them changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import Engine, Row, select

from aggregators.windows import window_bounds
from meterstream.dimensions import combination_values
from meterstream.errors import InvalidQueryError
from meterstream.event_checks import CONTROL_CHARACTERS
from meterstream.grouped_totals import check_group_by, merged_value
from meterstream.meters import Catalogue, Meter
from meterstream.schema import window_totals

RequestedWindow = Literal["own", "1h", "1d", "total"]
REQUESTED_WINDOWS: tuple[RequestedWindow, ...] = ("own", "1h", "1d", "total")
# The most of a meter's own windows one query reads: 1m windows for about a week, 1h windows
# for over a year. A wider range is refused, with this figure in the message.
MAX_WINDOWS = 10_000
# The most stored rows one query reads: windows times combinations of a meter with dimensions
# (up to METERSTREAM_MAX_COMBINATIONS per window). One more is read to tell; then refused.
MAX_STORED_ROWS = 100_000
# A range ending further ahead than this holds no usage yet, and dates near year 9999 have no
# next window: refused rather than computed.
FURTHEST_AHEAD = timedelta(days=400)
_FIXED = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}
# Which rolled-up windows a meter's own window divides exactly.
_DIVIDES = {"1m": ("1h", "1d"), "1h": ("1h", "1d"), "1d": ("1d",), "1mo": ()}


@dataclass(frozen=True, slots=True)
class WindowUsage:
    """One window's exact usage. ``value`` is exact; ``events`` counts the events counted."""

    start: datetime
    end: datetime
    value: Decimal
    events: int
    revision: int


@dataclass(frozen=True, slots=True)
class GroupUsage:
    """One group's series: its values of the dimensions grouped by, and its windows."""

    dimensions: dict[str, str]
    windows: list[WindowUsage]


@dataclass(frozen=True, slots=True)
class Usage:
    """The answer to one query: the meter, the range, the window asked for, and either the
    windows over all combinations (no ``group_by``) or one series per group."""

    customer: str
    meter: Meter
    start: datetime
    end: datetime
    window: str
    windows: list[WindowUsage]
    group_by: tuple[str, ...] = ()
    groups: list[GroupUsage] = field(default_factory=list)


def query_usage(
    engine: Engine,
    catalogue: Catalogue,
    *,
    customer: str,
    meter: str,
    start: datetime,
    end: datetime,
    window: RequestedWindow,
    now: datetime,
    retention_days: int,
    group_by: Sequence[str] | None = None,
    max_rows: int = MAX_STORED_ROWS,
) -> Usage:
    """``customer``'s usage of ``meter`` in ``[start, end)``, per ``window`` (the meter's own,
    ``1h``, ``1d``) or as one ``total``; over all combinations of the meter's dimensions, or,
    with ``group_by`` (dimension names), one series per group of their values.

    Raises InvalidQueryError naming the parameter when the meter is unknown, the range is empty,
    too wide, older than the retention of window totals (``retention_days`` before ``now``),
    not on the window's boundaries, or when the rollup or the grouping cannot be exact.
    """
    if not customer or CONTROL_CHARACTERS.search(customer):
        raise InvalidQueryError("customer", "must be a customer id without control characters")
    found = catalogue.get(meter)
    if found is None:
        known = ", ".join(sorted(catalogue.meters))
        raise InvalidQueryError(
            "meter", f"no meter {meter!r:.100} in the catalogue; known: {known}"
        )
    grouping = tuple(group_by or ())
    check_group_by(found, grouping)
    start, end = _utc("from", start), _utc("to", end)
    _check_range(found, start, end, window, now, retention_days)
    rows = _stored(engine, customer, found.name, start, end, max_rows + 1)
    if len(rows) > max_rows:
        raise InvalidQueryError(
            "to",
            f"the range holds more than {max_rows} stored totals of meter {found.name!r} "
            "(windows times combinations of its dimensions); ask for a shorter range",
        )
    label = found.window if window == "own" else window
    series = _rolled_up(found, rows, start, end, window, grouping)
    if not grouping:
        return Usage(customer, found, start, end, label, series.get((), []))
    groups = [
        GroupUsage(dict(zip(grouping, values, strict=True)), windows)
        for values, windows in sorted(series.items())
    ]
    return Usage(customer, found, start, end, label, [], grouping, groups)


def _check_range(
    meter: Meter,
    start: datetime,
    end: datetime,
    window: RequestedWindow,
    now: datetime,
    retention_days: int,
) -> None:
    if end <= start:
        raise InvalidQueryError("to", f"must be after from ({_iso(start)}), got {_iso(end)}")
    if end > now + FURTHEST_AHEAD:
        raise InvalidQueryError("to", f"at most {FURTHEST_AHEAD.days} days ahead of now")
    if start < now - timedelta(days=retention_days):
        raise InvalidQueryError(
            "from",
            f"{_iso(start)} is more than {retention_days} days ago "
            "(METERSTREAM_WINDOW_RETENTION_DAYS): older windows are pruned",
        )
    if window in ("1h", "1d") and window not in _DIVIDES[meter.window]:
        raise InvalidQueryError(
            "window",
            f"{window} is not a whole number of meter {meter.name!r}'s {meter.window} windows; "
            f"ask for window={meter.window} or total",
        )
    own = meter.window
    for name, at in (("from", start), ("to", end)):
        for size in {own, own if window in ("own", "total") else window}:
            if window_bounds(at, size)[0] != at:  # type: ignore[arg-type]
                raise InvalidQueryError(
                    name, f"{_iso(at)} is not on a {size} window boundary (UTC); windows are whole"
                )
    count = _own_windows(own, start, end)
    if count > MAX_WINDOWS:
        raise InvalidQueryError(
            "to",
            f"the range holds {count} {own} windows of meter {meter.name!r}; at most "
            f"{MAX_WINDOWS} per query: ask for a shorter range",
        )
    if meter.aggregation == "unique_count" and window == "total" and count > 1:
        raise InvalidQueryError(
            "window",
            f"meter {meter.name!r} counts distinct values per month; distinct counts of several "
            "months cannot be added (one value seen in two months would count twice): ask for "
            "window=1mo, or a range of one month",
        )


def _utc(name: str, at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise InvalidQueryError(name, "must carry a UTC offset (e.g. 2026-11-24T00:00:00Z)")
    try:
        return at.astimezone(UTC)
    except OverflowError:
        raise InvalidQueryError(name, f"{at.isoformat()} is out of range in UTC") from None


def _own_windows(own: str, start: datetime, end: datetime) -> int:
    if own == "1mo":
        return (end.year - start.year) * 12 + end.month - start.month
    return int((end - start) / _FIXED[own])


def _stored(
    engine: Engine, customer: str, meter: str, start: datetime, end: datetime, limit: int
) -> list[Row[Any]]:
    c = window_totals.c
    query = (
        select(
            c.window_start,
            c.window_end,
            c.combination,
            c.value,
            c.events,
            c.revision,
            c.last_event_time,
            c.last_event_id,
        )
        .where(c.customer_id == customer, c.meter == meter)
        .where(c.window_start >= start, c.window_start < end)
        .order_by(c.window_start)
        .limit(limit)
    )
    with engine.connect() as connection:
        return list(connection.execute(query))


def _rolled_up(
    meter: Meter,
    rows: list[Row[Any]],
    start: datetime,
    end: datetime,
    window: RequestedWindow,
    group_by: tuple[str, ...],
) -> dict[tuple[str, ...], list[WindowUsage]]:
    """Per group of ``group_by`` values (``()`` when none), its windows in time order: the
    rows of each requested window and group (its stored windows and their combinations)
    merged by :func:`_combined`."""
    buckets: dict[tuple[str, ...], dict[tuple[datetime, datetime], list[Row[Any]]]] = {}
    for row in rows:  # in window_start order, so each group's windows are too
        if window == "own":
            bounds = (row.window_start, row.window_end)
        elif window == "total":
            bounds = (start, end)
        else:
            bounds = window_bounds(row.window_start, window)
        values = combination_values(row.combination) if group_by else {}
        group = tuple(values.get(name, "") for name in group_by)
        buckets.setdefault(group, {}).setdefault(bounds, []).append(row)
    return {
        group: [_combined(meter, s, e, merged) for (s, e), merged in windows.items()]
        for group, windows in buckets.items()
    }


def _combined(
    meter: Meter, start: datetime, end: datetime, rows: Sequence[Row[Any]]
) -> WindowUsage:
    # unique_count: one month and one combination at most here (refused before otherwise)
    return WindowUsage(
        start,
        end,
        merged_value(meter, rows),
        sum(int(r.events) for r in rows),
        sum(int(r.revision) for r in rows),
    )


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")
