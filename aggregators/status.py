"""What the aggregators can say about themselves, for ``meterstream status`` and the gauges."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select

from meterstream.lag import consumer_lag
from meterstream.schema import rejected_events, window_totals
from meterstream.settings import Settings


def newest_event_time(engine: Engine) -> datetime | None:
    with engine.connect() as connection:
        value: datetime | None = connection.execute(
            select(func.max(window_totals.c.last_event_time))
        ).scalar_one()
    if value is not None and value.tzinfo is None:
        # SQLite gives back what func.max saw: naive UTC text.
        value = value.replace(tzinfo=UTC)
    return value


def aggregator_status(settings: Settings, engine: Engine, now: datetime) -> dict[str, Any]:
    """Consumer lag (from the broker), event-time lag, totals and dead letters."""
    try:
        lag: dict[int, int] | str = consumer_lag(
            settings.kafka_bootstrap, settings.consumer_group, settings.topic, timeout_s=3.0
        )
    except Exception as exc:  # the status must still print what the database knows
        lag = f"unavailable ({exc})"
    with engine.connect() as connection:
        windows, events = connection.execute(
            select(func.count(), func.coalesce(func.sum(window_totals.c.events), 0)).where(
                window_totals.c.revision > 0
            )
        ).one()
        dead: dict[str, int] = {
            str(reason): int(count)
            for reason, count in connection.execute(
                select(rejected_events.c.reason, func.count()).group_by(rejected_events.c.reason)
            )
        }
    newest = newest_event_time(engine)
    return {
        "consumer_lag": lag,
        "event_time_lag_s": (now - newest).total_seconds() if newest else None,
        "windows": int(windows),
        "events": int(events),
        "dead_lettered": dead,
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
        f"  window totals       {facts['windows']:,} windows from {facts['events']:,} events",
        "  dead-lettered       "
        + (", ".join(f"{reason}: {n}" for reason, n in sorted(dead.items())) or "none"),
    ]
    return "\n".join(lines)
