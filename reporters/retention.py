"""Retention of the ledger: which rows may go without changing anything the reporter decides.

A row is pruned only if every one of these holds (each is checked again in the delete):

- it is final and settled: ``sent`` or ``carried``. Never ``pending``, ``unknown`` or
  ``accepted`` (not confirmed), nor ``rejected``: that is usage a person must bill by hand.
- its window ended, and it was last updated, more than ``METERSTREAM_LEDGER_RETENTION_DAYS``
  ago (at least the horizon plus two days): Stripe refuses its timestamp, so no call can
  concern it again, and ``reconcile --since`` within the retention sees every row it sums.
- it is not the head (highest ``sequence``) of its (customer, meter): the head carries the
  running totals (``accounted_total``, ``units_total``) that the next report starts from.
- it is not the newest revision of a window still in ``window_totals``: due windows, the
  previous total of the next revision, a ``last`` meter's previous timestamp and the billing lag
  all read that row. A window the aggregators pruned is never due again, so its rows may go.
- no ``unknown`` row of its (Stripe customer, meter) waits for reconcile, which decides it from
  the ``sent`` rows of its minute.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import ColumnElement, Engine, and_, exists, func, not_, or_, select

from meterstream.retention import cutoff, delete_in_batches
from meterstream.schema import ledger, window_totals

PRUNABLE = ("sent", "carried")

_row = ledger.c
_newer = ledger.alias("newer_row")
_undecided = ledger.alias("undecided_row")
_wt = window_totals.c


def prunable(before: datetime) -> ColumnElement[bool]:
    """The condition a ledger row must meet to be pruned (see the module docstring)."""
    same_key = and_(
        _newer.c.customer_id == _row.customer_id,
        _newer.c.meter == _row.meter,
    )
    # A scalar max per row (ledger_sequence, read backwards), not EXISTS: PostgreSQL would
    # rather hash the whole ledger for a semi-join than probe the index for each candidate.
    not_head = _row.sequence < select(func.max(_newer.c.sequence)).where(same_key).scalar_subquery()
    newer_revision = exists(
        select(_newer.c.revision).where(
            same_key,
            _newer.c.window_start == _row.window_start,
            _newer.c.revision > _row.revision,
        )
    )
    window_kept = exists(
        select(_wt.revision).where(
            _wt.customer_id == _row.customer_id,
            _wt.meter == _row.meter,
            _wt.window_start == _row.window_start,
        )
    )
    unknown_waits = exists(
        select(_undecided.c.identifier).where(
            _undecided.c.status == "unknown",
            _undecided.c.stripe_customer_id == _row.stripe_customer_id,
            _undecided.c.meter == _row.meter,
        )
    )
    return and_(
        _row.status.in_(PRUNABLE),
        _row.updated_at < before,
        _row.window_end < before,
        not_head,
        or_(newer_revision, not_(window_kept)),
        not_(unknown_waits),
    )


def prune_ledger(
    engine: Engine,
    now: datetime,
    retention_days: int,
    batch_rows: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Delete the prunable ledger rows, ``batch_rows`` per transaction; return how many went.

    Run it in the reporter's process between cycles: a cycle's writes are what the checks read.
    """
    return delete_in_batches(
        engine,
        ledger,
        prunable(cutoff(now, retention_days)),
        batch_rows=batch_rows,
        key=("identifier",),
        should_stop=should_stop,
    )
