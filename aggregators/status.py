"""What the aggregators can say about themselves, for ``meterstream status`` and the gauges."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select

from meterstream.lag import consumer_lag
from meterstream.schema import rejected_events, window_totals
from meterstream.settings import Settings

# Window totals are counted up to this many: a count of all history would grow with it.
COUNT_UP_TO = 100_000
# The newest event time is read from this many most recently changed windows.
_RECENT_WINDOWS = 1_000


def newest_event_time(engine: Engine) -> datetime | None:
    """The newest event time among the windows changed last (window_totals_by_update), not
    all history: a window whose value did not change (a max meter's smaller value) keeps its
    place, so the lag shown can be a little high until a value changes, never low."""
    recent = (
        select(window_totals.c.last_event_time)
        .order_by(window_totals.c.updated_at.desc())
        .limit(_RECENT_WINDOWS)
        .subquery()
    )
    with engine.connect() as connection:
        value: datetime | None = connection.execute(
            select(func.max(recent.c.last_event_time))
        ).scalar_one()
    if value is not None and value.tzinfo is None:
        # SQLite gives back what func.max saw: naive UTC text.
        value = value.replace(tzinfo=UTC)
    return value


def totals_facts(engine: Engine) -> dict[str, Any]:
    """Windows (counted up to COUNT_UP_TO), their events (None past it), dead letters by
    reason, the newest event time: what the database knows, each read bounded."""
    counted = (
        select(window_totals.c.events)
        .where(window_totals.c.revision > 0)
        # the primary key's order, so the database walks its index and stops at the limit
        .order_by(window_totals.c.customer_id, window_totals.c.meter, window_totals.c.window_start)
        .limit(COUNT_UP_TO)
        .subquery()
    )
    with engine.connect() as connection:
        windows, events = connection.execute(
            select(func.count(), func.coalesce(func.sum(counted.c.events), 0))
        ).one()
        dead: dict[str, int] = {
            str(reason): int(count)
            for reason, count in connection.execute(
                select(rejected_events.c.reason, func.count()).group_by(rejected_events.c.reason)
            )
        }
    return {
        "windows": int(windows),
        "windows_counted_up_to": COUNT_UP_TO,
        "events": int(events) if windows < COUNT_UP_TO else None,
        "dead_lettered": dead,
        "newest_event_time": newest_event_time(engine),
    }


def aggregator_status(settings: Settings, engine: Engine, now: datetime) -> dict[str, Any]:
    """Consumer lag (from the broker), event-time lag, totals and dead letters."""
    try:
        lag: dict[int, int] | str = consumer_lag(
            settings.kafka_bootstrap, settings.consumer_group, settings.topic, timeout_s=3.0
        )
    except Exception as exc:  # the status must still print what the database knows
        lag = f"unavailable ({exc})"
    facts = totals_facts(engine)
    newest = facts.pop("newest_event_time")
    return {
        "consumer_lag": lag,
        "event_time_lag_s": (now - newest).total_seconds() if newest else None,
        **facts,
    }


def format_aggregator_status(facts: dict[str, Any]) -> str:
    lag = facts["consumer_lag"]
    if isinstance(lag, dict):
        total = sum(lag.values())
        per_partition = ", ".join(f"{p}:{n}" for p, n in sorted(lag.items()))
        lag_line = f"{total} message(s) behind ({per_partition})"
    else:
        lag_line = str(lag)
    event_lag = facts["event_time_lag_s"]
    dead = facts["dead_lettered"]
    lines = [
        "aggregators",
        f"  consumer lag        {lag_line}",
        f"  event-time lag      {'-' if event_lag is None else f'{event_lag:,.0f} s'}",
        "  window totals       " + _totals_line(facts),
        "  dead-lettered       "
        + (", ".join(f"{reason}: {n}" for reason, n in sorted(dead.items())) or "none"),
    ]
    return "\n".join(lines)


def _totals_line(facts: dict[str, Any]) -> str:
    if facts["events"] is None:
        return f"{facts['windows']:,}+ windows"
    return f"{facts['windows']:,} windows from {facts['events']:,} events"
