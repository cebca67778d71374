"""Retention of the aggregators' tables: windows nothing can change any more, old refusals.

- ``window_totals``: a window that ended more than ``METERSTREAM_WINDOW_RETENTION_DAYS`` ago
  (at least the horizon plus two days) is final: its events are refused as too old, and Stripe
  refuses its timestamp. The reporter keeps the newest ledger row of a window for as long as the
  window is here, so a window gone from here is simply no longer due; nothing is sent again.
- ``rejected_events``: refusals older than ``METERSTREAM_REJECTED_RETENTION_DAYS``; their raw
  bytes stay on the dead-letter topic for as long as its own retention keeps them.

Deduplication keys and unique_count values are pruned by aggregators.dedup (day partitions).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine

from meterstream.retention import cutoff, delete_in_batches
from meterstream.schema import rejected_events, window_totals
from meterstream.settings import Settings


def prune_aggregates(
    engine: Engine,
    settings: Settings,
    now: datetime,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, int]:
    """Delete windows and refusals past their retention, in bounded transactions; return the
    rows removed per table."""
    windows = delete_in_batches(
        engine,
        window_totals,
        window_totals.c.window_end < cutoff(now, settings.window_retention_days),
        batch_rows=settings.prune_batch_rows,
        should_stop=should_stop,
    )
    rejected = delete_in_batches(
        engine,
        rejected_events,
        rejected_events.c.rejected_at < cutoff(now, settings.rejected_retention_days),
        batch_rows=settings.prune_batch_rows,
        should_stop=should_stop,
    )
    return {"window_totals": windows, "rejected_events": rejected}
