"""Which windows are due: their revision in window_totals differs from the ledger's newest.

A revision *older* than the ledger's (the aggregators' table was rebuilt, say) is returned too,
so the reporter can hold it loudly instead of skipping it in silence.

A window is due whether open or closed: each cycle sends what changed since the last report, so
Stripe's view lags the database by at most one interval. The aggregators bump ``revision``
each time a total changes; the ledger records the revision each row reported.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, Select, and_, func, or_, select

from meterstream.schema import ledger, window_totals

Key = tuple[str, str]  # (customer_id, meter)


@dataclass(frozen=True, slots=True)
class DueWindow:
    """A window whose newest revision has no ledger row yet."""

    customer_id: str
    meter: str
    window_start: datetime
    window_end: datetime
    revision: int
    window_value: Decimal  # window_totals.value at this revision
    last_event_time: datetime | None

    @property
    def key(self) -> Key:
        return (self.customer_id, self.meter)


def _due_query(meters: Iterable[str]) -> Select[Any]:
    reported = (
        select(
            ledger.c.customer_id,
            ledger.c.meter,
            ledger.c.window_start,
            func.max(ledger.c.revision).label("revision"),
        )
        .group_by(ledger.c.customer_id, ledger.c.meter, ledger.c.window_start)
        .subquery()
    )
    wt = window_totals.c
    query = (
        select(
            wt.customer_id,
            wt.meter,
            wt.window_start,
            wt.window_end,
            wt.revision,
            wt.value,
            wt.last_event_time,
        )
        .select_from(
            window_totals.outerjoin(
                reported,
                and_(
                    reported.c.customer_id == wt.customer_id,
                    reported.c.meter == wt.meter,
                    reported.c.window_start == wt.window_start,
                ),
            )
        )
        .where(
            wt.meter.in_(list(meters)),
            or_(reported.c.revision.is_(None), wt.revision != reported.c.revision),
        )
    )
    return query


def count_due_windows(engine: Engine, meters: Iterable[str]) -> int:
    """How many windows due_windows would return."""
    with engine.connect() as connection:
        query = select(func.count()).select_from(_due_query(meters).subquery())
        return int(connection.execute(query).scalar_one())


def due_windows(engine: Engine, meters: Iterable[str]) -> dict[Key, list[DueWindow]]:
    """The due windows of ``meters``, per (customer, meter), oldest window first."""
    wt = window_totals.c
    query = _due_query(meters).order_by(wt.customer_id, wt.meter, wt.window_start)
    due: dict[Key, list[DueWindow]] = {}
    with engine.connect() as connection:
        for row in connection.execute(query):
            window = DueWindow(
                customer_id=row.customer_id,
                meter=row.meter,
                window_start=row.window_start,
                window_end=row.window_end,
                revision=int(row.revision),
                window_value=row.value,
                last_event_time=row.last_event_time,
            )
            due.setdefault(window.key, []).append(window)
    return due
