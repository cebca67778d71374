"""Window totals the benchmark seeds in the database, as the aggregators would write them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, bindparam

from aggregators.windows import window_bounds
from meterstream.meters import Catalogue
from meterstream.report_queue import queue_windows
from meterstream.schema import window_totals

METERS = ("tokens", "api_calls", "peak_connections")


@dataclass
class Window:
    customer_id: str
    meter: str
    start: datetime
    end: datetime
    value: Decimal
    events: int
    revision: int
    last_event_time: datetime


def _row(window: Window, now: datetime) -> dict[str, Any]:
    return {
        "customer_id": window.customer_id,
        "meter": window.meter,
        "window_start": window.start,
        "window_end": window.end,
        "value": window.value,
        "events": window.events,
        "revision": window.revision,
        "last_event_time": window.last_event_time,
        "last_event_id": None,
        "first_applied_at": now,
        "updated_at": now,
    }


def write_windows(engine: Engine, new: Sequence[Window], changed: Sequence[Window]) -> None:
    """Insert ``new`` window totals and update ``changed`` ones (value, events, revision), and
    queue them for the reporter, as the aggregators do."""
    now = datetime.now(UTC)
    wt = window_totals.c
    with engine.begin() as connection:
        if new:
            connection.execute(window_totals.insert(), [_row(w, now) for w in new])
        if changed:
            connection.execute(
                window_totals.update()
                .where(
                    wt.customer_id == bindparam("k_customer"),
                    wt.meter == bindparam("k_meter"),
                    wt.window_start == bindparam("k_start"),
                )
                .values(
                    value=bindparam("value"),
                    events=bindparam("events"),
                    revision=bindparam("revision"),
                    last_event_time=bindparam("last_event_time"),
                    updated_at=bindparam("updated_at"),
                ),
                [
                    {
                        "k_customer": w.customer_id,
                        "k_meter": w.meter,
                        "k_start": w.start,
                        "value": w.value,
                        "events": w.events,
                        "revision": w.revision,
                        "last_event_time": w.last_event_time,
                        "updated_at": now,
                    }
                    for w in changed
                ],
            )
        queue_windows(connection, [(w.customer_id, w.meter, w.start, w.revision) for w in new])
        queue_windows(connection, [(w.customer_id, w.meter, w.start, w.revision) for w in changed])


def throughput_windows(catalogue: Catalogue, count: int, tag: str) -> list[Window]:
    """``count`` windows, one per (customer, meter): 3 meters a customer, 30 minutes ago."""
    at = datetime.now(UTC) - timedelta(minutes=30)
    windows = []
    for i in range(count):
        meter = METERS[i % len(METERS)]
        start, end = window_bounds(at, catalogue.meters[meter].window)
        windows.append(
            Window(
                f"cus_{tag}{i // len(METERS):06d}",
                meter,
                start,
                end,
                Decimal(i % 997 + 1),
                1,
                1,
                at,
            )
        )
    return windows
