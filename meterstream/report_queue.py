"""Telling the reporter a window changed: the upsert into ``report_queue``.

Whoever changes a window's revision in ``window_totals`` calls :func:`queue_windows` in the same
transaction (the aggregators do; tests and benchmarks that write totals themselves must too).
The reporter reads the queue instead of comparing every window with the ledger; see
reporters/due.py for why no change can be missed. The aggregators' PostgreSQL path does the
same upsert inside its one statement (aggregators/postgres.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from meterstream.dimensions import NO_COMBINATION, combination_digest
from meterstream.schema import report_queue

QueuedWindow = tuple[str, str, datetime, int]  # (customer_id, meter, window_start, revision)
# (customer_id, meter, window_start, combination, revision): see meterstream.dimensions.
QueuedCombination = tuple[str, str, datetime, str, int]


def queue_windows(connection: Connection, windows: Iterable[QueuedWindow]) -> None:
    """Upsert each window of a meter without dimensions with its new revision, in
    ``connection``'s transaction; see :func:`queue_combinations`."""
    queue_combinations(connection, ((c, m, s, NO_COMBINATION, r) for c, m, s, r in windows))


def queue_combinations(connection: Connection, windows: Iterable[QueuedCombination]) -> None:
    """Upsert each window and combination with its new revision, in ``connection``'s
    transaction.

    Rows are written in key order, as the aggregators lock windows, so two writers (or a
    writer and the reporter's deletes) cannot deadlock on them.
    """
    rows = [
        {
            "customer_id": c,
            "meter": m,
            "window_start": s,
            "combination": combination,
            "combination_digest": combination_digest(combination),
            "revision": r,
        }
        for c, m, s, combination, r in sorted(windows)
    ]
    if not rows:
        return
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(report_queue)
    connection.execute(
        insert.on_conflict_do_update(
            index_elements=[
                report_queue.c.customer_id,
                report_queue.c.meter,
                report_queue.c.window_start,
                report_queue.c.combination_digest,
            ],
            set_={"revision": insert.excluded.revision},
        ),
        rows,
    )
