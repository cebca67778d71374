"""Reading stored totals grouped by dimension: ``meterstream totals --group-by`` and the usage
API's ``group_by``.

The aggregators keep one exact total per customer, window and combination of all of a meter's
dimensions. Grouping by some of them merges combinations, exactly, as the aggregation allows:
sums and counts add up, max and min take the largest and smallest, last takes the newest event
(by event time, then event id, as the aggregators decide). A unique_count cannot: one user
seen under two models would count twice, so it is grouped by all its dimensions or refused.

The read covers the windows starting in ``[since, until)``: a caller serving requests (the usage
API) must bound it, so its cost is that range's rows (the key leads with customer and meter;
without a customer, the window_end index bounds the range). None leaves that side open.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow, localcontext
from typing import Any

from sqlalchemy import Connection, Row, select

from meterstream.dimensions import combination_values
from meterstream.errors import InvalidQueryError
from meterstream.meters import Meter
from meterstream.schema import window_totals

__all__ = ["GroupedTotal", "check_group_by", "grouped_totals", "merged_value"]

_LONGEST_WINDOW = timedelta(days=31)  # a calendar month
# Totals of 12 decimals reach 29 digits and more; the default 28 would round their sum, so
# sums are made with room to spare, and a rounding that still happened raises.
_EXACT = Context(prec=80, traps=[Inexact, InvalidOperation, Overflow])


@dataclass(frozen=True, slots=True)
class GroupedTotal:
    """The exact total of one customer, window and group (the values of ``group_by``)."""

    customer_id: str
    window_start: datetime
    window_end: datetime
    group: dict[str, str]
    value: Decimal
    events: int


def grouped_totals(
    connection: Connection,
    meter: Meter,
    *,
    since: datetime | None,
    until: datetime | None,
    group_by: Sequence[str] = (),
    customer_id: str | None = None,
) -> list[GroupedTotal]:
    """The totals of ``meter`` per customer, window (starting in ``[since, until)``) and the
    values of ``group_by``, ordered by customer, window and group. Raises InvalidQueryError
    naming ``group_by`` (or ``since``) when the request cannot be answered exactly."""
    _check(meter, group_by, since, until)
    c = window_totals.c
    query = select(
        c.customer_id,
        c.window_start,
        c.window_end,
        c.combination,
        c.value,
        c.events,
        c.last_event_time,
        c.last_event_id,
    ).where(c.meter == meter.name, c.revision > 0)
    # Each bound twice, by window end too, so without a customer the window_end index serves.
    if since is not None:
        query = query.where(c.window_start >= since, c.window_end > since)
    if until is not None:
        query = query.where(c.window_start < until, c.window_end <= until + _LONGEST_WINDOW)
    if customer_id is not None:
        query = query.where(c.customer_id == customer_id)
    groups: dict[tuple[str, datetime, tuple[str, ...]], list[Row[Any]]] = {}
    stored: list[Row[Any]] = list(connection.execute(query))
    for row in stored:
        values = combination_values(row.combination)
        group = tuple(values.get(name, "") for name in group_by)
        groups.setdefault((row.customer_id, row.window_start, group), []).append(row)
    return [
        GroupedTotal(
            customer,
            start,
            rows[0].window_end,
            dict(zip(group_by, group, strict=True)),
            merged_value(meter, rows),
            sum(int(r.events) for r in rows),
        )
        for (customer, start, group), rows in sorted(groups.items(), key=lambda i: i[0])
    ]


def _check(
    meter: Meter, group_by: Sequence[str], since: datetime | None, until: datetime | None
) -> None:
    check_group_by(meter, group_by)
    for name, moment in (("since", since), ("until", until)):
        if moment is not None and moment.tzinfo is None:
            raise InvalidQueryError(name, f"must be timezone-aware, got {moment.isoformat()}")
    if since is not None and until is not None and since >= until:
        raise InvalidQueryError("until", f"must be after since ({since.isoformat()})")


def check_group_by(meter: Meter, group_by: Sequence[str]) -> None:
    """Raises InvalidQueryError naming ``group_by`` unless ``meter``'s combinations can be
    merged exactly into groups by those dimensions (none: one total over all combinations)."""
    unknown = [name for name in group_by if name not in meter.dimensions]
    if unknown:
        known = ", ".join(meter.dimensions) or "none"
        raise InvalidQueryError(
            "group_by",
            f"meter {meter.name!r} has no dimension {unknown[0]!r}; its dimensions: {known}",
        )
    if len(set(group_by)) != len(group_by):
        raise InvalidQueryError("group_by", f"names a dimension twice: {list(group_by)!r}")
    if meter.aggregation == "unique_count" and set(group_by) != set(meter.dimensions):
        raise InvalidQueryError(
            "group_by",
            f"meter {meter.name!r} counts distinct values per combination of "
            f"{', '.join(meter.dimensions)}; they do not add up across combinations (one value "
            "seen under two would count twice): group by all of them",
        )


def merged_value(meter: Meter, rows: Sequence[Row[Any]]) -> Decimal:
    """The exact value of ``rows`` of ``window_totals`` (``value``, ``last_event_time``,
    ``last_event_id``; windows or combinations of one meter) merged into one, as ``meter``'s
    aggregation allows: sum and count add (raising decimal.Inexact rather than rounding), max
    and min take the largest and smallest, last takes the row whose last event is newest (by
    event time, then event id; the first of equals).

    unique_count rows are added too: the caller has refused any merge that could count a
    value twice (several combinations, see :func:`check_group_by`, or several months).
    """
    aggregation = meter.aggregation
    if aggregation in ("sum", "count", "unique_count"):
        with localcontext(_EXACT):
            return sum((Decimal(r.value) for r in rows), Decimal(0))
    if aggregation == "max":
        return max(Decimal(r.value) for r in rows)
    if aggregation == "min":
        return min(Decimal(r.value) for r in rows)
    return Decimal(max(rows, key=_newest).value)  # last


def _newest(row: Row[Any]) -> tuple[datetime, str]:
    # A row with no last event recorded sorts before every other.
    when = row.last_event_time or datetime.min.replace(tzinfo=UTC)
    return when, row.last_event_id or ""
