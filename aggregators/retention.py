"""Retention of the aggregators' tables: windows nothing can change any more, old refusals.

- ``window_totals``: a window that ended more than ``METERSTREAM_WINDOW_RETENTION_DAYS`` ago
  (at least the horizon plus two days) is final: its events are refused as too old, and Stripe
  refuses its timestamp. The reporter keeps the newest ledger row of a window for as long as the
  window is here, so a window gone from here is simply no longer due; nothing is sent again.
- ``unique_values``: the digests of a unique_count window (a calendar month) that ended before
  the oldest event the aggregators still admit; nothing can add to its count again.
- ``rejected_events``: refusals older than ``METERSTREAM_REJECTED_RETENTION_DAYS``; their raw
  bytes stay on the dead-letter topic for as long as its own retention keeps them.

Deduplication keys are pruned by aggregators.dedup, a day partition at a time, in the applying
child (which caches the partitions); these deletes run in a thread of the worker process, so
batches go on meanwhile: they never touch these rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta

from sqlalchemy import Engine, and_, exists

from meterstream.metrics import AggregatorMetrics
from meterstream.retention import cutoff, delete_in_batches
from meterstream.schema import rejected_events, report_queue, unique_values, window_totals
from meterstream.settings import Settings

_log = logging.getLogger(__name__)
# The longest unique_count window: a calendar month.
_LONGEST_WINDOW = timedelta(days=31)


def prune_aggregates(
    engine: Engine,
    settings: Settings,
    now: datetime,
    metrics: AggregatorMetrics | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, int]:
    """Delete windows, unique values and refusals past their retention, in bounded
    transactions; count (``meterstream_aggregator_pruned_rows_total{table}``) and log what
    went, and return the rows removed per table."""
    pruned = {
        "window_totals": _prune_windows(engine, settings, now, should_stop),
        "unique_values": _prune_unique_values(engine, settings, now, should_stop),
        "rejected_events": _prune_rejected(engine, settings, now, should_stop),
    }
    for table, rows in pruned.items():
        if rows:
            if metrics is not None:
                metrics.pruned_rows.labels(table).inc(rows)
            _log.info("pruned %d row(s) of %s past their retention", rows, table)
    return pruned


def _prune_windows(
    engine: Engine, settings: Settings, now: datetime, should_stop: Callable[[], bool]
) -> int:
    # A window still in the report queue has not reached the ledger (held: an unlinked
    # customer, a forbidden negative correction): it stays, and keeps showing as held usage,
    # until the reporter records it; deleting it would drop that usage without a word.
    queued = exists().where(
        report_queue.c.customer_id == window_totals.c.customer_id,
        report_queue.c.meter == window_totals.c.meter,
        report_queue.c.window_start == window_totals.c.window_start,
        report_queue.c.combination_digest == window_totals.c.combination_digest,
    )
    return delete_in_batches(
        engine,
        window_totals,
        and_(
            window_totals.c.window_end < cutoff(now, settings.window_retention_days),
            ~queued,
        ),
        batch_rows=settings.prune_batch_rows,
        should_stop=should_stop,
    )


def _prune_unique_values(
    engine: Engine, settings: Settings, now: datetime, should_stop: Callable[[], bool]
) -> int:
    # A window starting before this ended before the oldest day an event may still fall on
    # (the horizon, plus a day for the keys' day boundary).
    oldest_day = now.astimezone(UTC).date() - timedelta(days=settings.horizon_days + 1)
    before = datetime.combine(oldest_day, time(0), tzinfo=UTC) - _LONGEST_WINDOW
    return delete_in_batches(
        engine,
        unique_values,
        unique_values.c.window_start < before,
        batch_rows=settings.prune_batch_rows,
        should_stop=should_stop,
    )


def _prune_rejected(
    engine: Engine, settings: Settings, now: datetime, should_stop: Callable[[], bool]
) -> int:
    return delete_in_batches(
        engine,
        rejected_events,
        rejected_events.c.rejected_at < cutoff(now, settings.rejected_retention_days),
        batch_rows=settings.prune_batch_rows,
        should_stop=should_stop,
    )
