"""Usage as the database holds it, for product teams: exact totals per window, or rolled up.

Read from ``window_totals`` (the aggregators' table) by its primary key (customer, meter,
window_start): one index range scan, bounded by :data:`MAX_WINDOWS` of the meter's own windows,
so a query costs the same in the tenth year as in the first.

Rolling windows up is exact for each aggregation, or refused (:class:`UsageQueryError`):
- ``sum`` and ``count`` add;
- ``max`` and ``min`` take the largest or smallest;
- ``last`` takes the value of the window whose last event is latest (by event time, then id,
  as the aggregators order them);
- ``unique_count``: distinct counts of two months cannot be added (a user active in both would
  count twice), and the digests that would allow it are pruned soon after a month closes; so a
  query over more than one of its months is refused, never answered wrong; so is a meter with
  dimensions (its counts per combination cannot be added either).

A meter with dimensions has a row per combination of their values in each window: every answer,
the meter's own windows included, combines them by the rules above.

A window is half-open ``[start, end)`` in UTC. ``from`` and ``to`` must fall on boundaries of
the requested window (a stored window cannot be split), and windows no event reached are left
out. ``revision`` of a stored window is its own revision (it rises at every change); of a rolled
up window, the sum of its windows' revisions, so it too rises whenever any of them changes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, Inexact, localcontext
from typing import Any, Literal

from sqlalchemy import Engine, Row, select

from aggregators.windows import window_bounds
from meterstream.errors import UsageQueryError
from meterstream.meters import Catalogue, Meter
from meterstream.schema import window_totals

RequestedWindow = Literal["own", "1h", "1d", "total"]
REQUESTED_WINDOWS: tuple[RequestedWindow, ...] = ("own", "1h", "1d", "total")
# The most of a meter's own windows one query reads: 1m windows for about a week, 1h windows
# for over a year. A wider range is refused, with this figure in the message.
MAX_WINDOWS = 10_000
# A range ending further ahead than this holds no usage yet, and dates near year 9999 have no
# next window: refused rather than computed.
FURTHEST_AHEAD = timedelta(days=400)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
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
class Usage:
    """The answer to one query: the meter, the range, the window asked for, the windows."""

    customer: str
    meter: Meter
    start: datetime
    end: datetime
    window: str
    windows: list[WindowUsage]


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
) -> Usage:
    """``customer``'s usage of ``meter`` in ``[start, end)``, per ``window`` (the meter's own,
    ``1h``, ``1d``) or as one ``total``.

    Raises UsageQueryError naming the parameter when the meter is unknown, the range is empty,
    too wide, older than the retention of window totals (``retention_days`` before ``now``),
    not on the window's boundaries, or when the rollup cannot be exact.
    """
    if not customer or _CONTROL.search(customer):
        raise UsageQueryError("customer", "must be a customer id without control characters")
    found = catalogue.get(meter)
    if found is None:
        known = ", ".join(sorted(catalogue.meters))
        raise UsageQueryError("meter", f"no meter {meter!r:.100} in the catalogue; known: {known}")
    start, end = _utc("from", start), _utc("to", end)
    _check_range(found, start, end, window, now, retention_days)
    rows = _stored(engine, customer, found.name, start, end)
    label = found.window if window == "own" else window
    return Usage(customer, found, start, end, label, _rolled_up(found, rows, start, end, window))


def _check_range(
    meter: Meter,
    start: datetime,
    end: datetime,
    window: RequestedWindow,
    now: datetime,
    retention_days: int,
) -> None:
    if end <= start:
        raise UsageQueryError("to", f"must be after from ({_iso(start)}), got {_iso(end)}")
    if end > now + FURTHEST_AHEAD:
        raise UsageQueryError("to", f"at most {FURTHEST_AHEAD.days} days ahead of now")
    if start < now - timedelta(days=retention_days):
        raise UsageQueryError(
            "from",
            f"{_iso(start)} is more than {retention_days} days ago "
            "(METERSTREAM_WINDOW_RETENTION_DAYS): older windows are pruned",
        )
    if window in ("1h", "1d") and window not in _DIVIDES[meter.window]:
        raise UsageQueryError(
            "window",
            f"{window} is not a whole number of meter {meter.name!r}'s {meter.window} windows; "
            f"ask for window={meter.window} or total",
        )
    if meter.aggregation == "unique_count" and meter.dimensions:
        raise UsageQueryError(
            "meter",
            f"meter {meter.name!r} counts distinct values per combination of its dimensions "
            f"({', '.join(meter.dimensions)}); those counts cannot be added (one value seen in "
            "two combinations would count twice): read them per combination with meterstream "
            "totals --group-by",
        )
    own = meter.window
    for name, at in (("from", start), ("to", end)):
        for size in {own, own if window in ("own", "total") else window}:
            if window_bounds(at, size)[0] != at:  # type: ignore[arg-type]
                raise UsageQueryError(
                    name, f"{_iso(at)} is not on a {size} window boundary (UTC); windows are whole"
                )
    count = _own_windows(own, start, end)
    if count > MAX_WINDOWS:
        raise UsageQueryError(
            "to",
            f"the range holds {count} {own} windows of meter {meter.name!r}; at most "
            f"{MAX_WINDOWS} per query: ask for a shorter range",
        )
    if meter.aggregation == "unique_count" and window == "total" and count > 1:
        raise UsageQueryError(
            "window",
            f"meter {meter.name!r} counts distinct values per month; distinct counts of several "
            "months cannot be added (one value seen in two months would count twice): ask for "
            "window=1mo, or a range of one month",
        )


def _utc(name: str, at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise UsageQueryError(name, "must carry a UTC offset (e.g. 2026-11-24T00:00:00Z)")
    try:
        return at.astimezone(UTC)
    except OverflowError:
        raise UsageQueryError(name, f"{at.isoformat()} is out of range in UTC") from None


def _own_windows(own: str, start: datetime, end: datetime) -> int:
    if own == "1mo":
        return (end.year - start.year) * 12 + end.month - start.month
    return int((end - start) / _FIXED[own])


def _stored(
    engine: Engine, customer: str, meter: str, start: datetime, end: datetime
) -> list[Row[Any]]:
    c = window_totals.c
    query = (
        select(
            c.window_start,
            c.window_end,
            c.value,
            c.events,
            c.revision,
            c.last_event_time,
            c.last_event_id,
        )
        .where(c.customer_id == customer, c.meter == meter)
        .where(c.window_start >= start, c.window_start < end)
        .order_by(c.window_start)
    )
    with engine.connect() as connection:
        return list(connection.execute(query))


def _rolled_up(
    meter: Meter, rows: list[Row[Any]], start: datetime, end: datetime, window: RequestedWindow
) -> list[WindowUsage]:
    # A meter with dimensions stores a row per combination of their values in each window:
    # its usage is theirs combined, in the meter's own windows too.
    groups: dict[tuple[datetime, datetime], list[Row[Any]]] = {}
    for row in rows:
        if window == "own":
            bounds = (row.window_start, row.window_end)
        elif window == "total":
            bounds = (start, end)
        else:
            bounds = window_bounds(row.window_start, window)
        groups.setdefault(bounds, []).append(row)
    return [
        _combined(meter, bounds_start, bounds_end, group)
        for (bounds_start, bounds_end), group in groups.items()
    ]


def _combined(
    meter: Meter, start: datetime, end: datetime, rows: Sequence[Row[Any]]
) -> WindowUsage:
    aggregation = meter.aggregation
    if aggregation in ("sum", "count", "unique_count"):  # unique_count: one month at most here
        with localcontext() as exact:
            # Totals reach 30 digits and more; the default 28 would round their sum.
            exact.prec = 80
            exact.traps[Inexact] = True
            value = sum((Decimal(r.value) for r in rows), Decimal(0))
    elif aggregation == "max":
        value = max(Decimal(r.value) for r in rows)
    elif aggregation == "min":
        value = min(Decimal(r.value) for r in rows)
    else:  # last: the window whose last event is latest
        value = Decimal(max(rows, key=_last_key).value)
    return WindowUsage(
        start,
        end,
        value,
        sum(int(r.events) for r in rows),
        sum(int(r.revision) for r in rows),
    )


def _last_key(row: Row[Any]) -> tuple[datetime, str]:
    when = row.last_event_time or datetime.min.replace(tzinfo=UTC)
    return when, row.last_event_id or ""


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")
