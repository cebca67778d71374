"""Pruning by age in bounded batches: the one way every stage deletes what its retention let go.

Each stage prunes the tables it owns, in its own process (aggregators: ``window_totals`` and
``rejected_events``; reporter: the ledger), with this helper. Rows are found in one read, then
deleted ``batch_rows`` per transaction, each delete checking the condition again: a short
transaction never holds up a batch or a report cycle, and a row that stopped qualifying between
the read and the delete stays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, Table, delete, select, tuple_

# Keys read per pass: bounds the memory of one pass; a pass after it reads the next ones.
_KEYS_PER_PASS = 100


def cutoff(now: datetime, retention_days: int) -> datetime:
    """The oldest moment a retention of ``retention_days`` keeps at ``now``."""
    return now - timedelta(days=retention_days)


def delete_in_batches(
    engine: Engine,
    table: Table,
    condition: ColumnElement[bool],
    *,
    batch_rows: int,
    key: Sequence[str] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Delete the rows of ``table`` matching ``condition``, at most ``batch_rows`` per
    transaction; return how many went.

    ``key``: columns that identify a row (default: the primary key). ``should_stop`` is asked
    between transactions: what is left waits for the next run, nothing is half done.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    columns = [table.c[name] for name in key] if key else list(table.primary_key.columns)
    identity: Any = columns[0] if len(columns) == 1 else tuple_(*columns)
    per_pass = batch_rows * _KEYS_PER_PASS
    deleted = 0
    while not should_stop():
        with engine.connect() as connection:
            found = connection.execute(select(*columns).where(condition).limit(per_pass)).all()
        keys: list[Any] = [row[0] if len(columns) == 1 else tuple(row) for row in found]
        removed = 0
        for start in range(0, len(keys), batch_rows):
            if should_stop():
                return deleted + removed
            chunk = keys[start : start + batch_rows]
            with engine.begin() as connection:
                result = connection.execute(delete(table).where(identity.in_(chunk), condition))
            removed += result.rowcount or 0
        deleted += removed
        # Fewer than a full pass: nothing else qualified. None removed: the rest no longer
        # qualifies (changed since the read); the next run looks again.
        if len(keys) < per_pass or removed == 0:
            break
    return deleted
