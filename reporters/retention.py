"""Retention of the ledger: which rows may go without changing anything the reporter decides.

A row is pruned only if every one of these holds (each is checked again in the delete):

- it is final and settled: ``sent`` or ``carried``, or ``rejected`` (usage a person bills by
  hand) when a rejected retention is given. Never ``pending``, ``unknown`` or ``accepted``
  (not confirmed).
- its window ended, and it was last updated, more than ``METERSTREAM_LEDGER_RETENTION_DAYS``
  ago (at least the horizon plus two days): Stripe refuses its timestamp, so no call can
  concern it again, and ``reconcile --since`` within the retention sees every row it sums.
  A rejected row: more than ``METERSTREAM_LEDGER_REJECTED_RETENTION_DAYS`` ago (400), for
  the people who bill it by hand.
- it is not the head (highest ``sequence``) of its (customer, meter): the head carries the
  running totals (``accounted_total``, ``units_total``) that the next report starts from.
- it is not the newest revision of a window still in ``window_totals``: due windows, the
  previous total of the next revision, a ``last`` meter's previous timestamp and the billing lag
  all read that row. A window the aggregators pruned is never due again, so its rows may go.
- no ``unknown`` row of its (Stripe customer, meter) waits for reconcile, which decides it from
  the ``sent`` rows of its minute, nor any ``pending`` row already called (it turns
  ``unknown`` at its next check, maybe after the prune: a key held for weeks, a stopped
  reporter).

The reporter's passes (:func:`prune_ledger_pass`) start where the last one ended, so a pass
does not read again the rows it kept (the newest rows of windows 45 to 60 days old, about a
quarter of the ledger). Marks in ``ledger_prune_marks``:

- ``updated_mark``: rows last updated before it were examined (ledger_by_status); a pass reads
  the final rows updated in [mark, retention cutoff): those that turned old since.
- ``timestamp_mark``: rows timestamped before it were examined after their window was pruned
  (ledger_by_time); a pass reads the rows timestamped in [mark, window cutoff - the longest
  window of the catalogue): a row's timestamp lies in its window, so their windows are gone
  (METERSTREAM_WINDOW_RETENTION_DAYS) and the rows kept for them may go now.
- rejected rows: those last updated in [rejected cutoff at ``last_pass_at``, rejected cutoff)
  (ledger_by_status): the ones that turned old since the last pass. A rejected retention
  lowered since leaves the rows between the two cutoffs to the next full pass.
- a row kept as its key's head, or for an ``unknown`` row, becomes prunable without either
  range moving over it: every FULL_PASS_EVERY a pass reads everything again.

A pass runs when PRUNE_EVERY has passed since the last one (``last_pass_at``), so ``report
--once`` run by cron each minute prunes hourly, as the long-running reporter does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    Engine,
    and_,
    case,
    exists,
    func,
    insert,
    not_,
    or_,
    select,
    update,
)

from meterstream.meters import Window
from meterstream.retention import cutoff, delete_in_batches
from meterstream.schema import has_combination, ledger, ledger_prune_marks, window_totals

PRUNABLE = ("sent", "carried")
PRUNE_EVERY = timedelta(hours=1)
FULL_PASS_EVERY = timedelta(days=7)
# The longest a window of each length can be (a calendar month: 31 days).
WINDOW_LENGTHS: dict[Window, timedelta] = {
    "1m": timedelta(minutes=1),
    "1h": timedelta(hours=1),
    "1d": timedelta(days=1),
    "1mo": timedelta(days=31),
}

_row = ledger.c
_newer = ledger.alias("newer_row")
_undecided = ledger.alias("undecided_row")
_wt = window_totals.c


def prunable(before: datetime, rejected_before: datetime | None = None) -> ColumnElement[bool]:
    """The condition a ledger row must meet to be pruned (see the module docstring);
    ``rejected_before`` None: no rejected row is."""
    same_pair = and_(
        _newer.c.customer_id == _row.customer_id,
        _newer.c.meter == _row.meter,
    )
    same_key = and_(same_pair, _newer.c.combination_digest == _row.combination_digest)
    # A scalar max per row (an index read backwards), not EXISTS: PostgreSQL would rather hash
    # the whole ledger for a semi-join than probe the index for each candidate. Each
    # combination's newest row carries its own running totals, so each is a head to keep: the
    # pair's newest (ledger_sequence) without dimensions, the combination's
    # (ledger_by_combination, with its own predicate) with them.
    pair_head = select(func.max(_newer.c.sequence)).where(same_pair).scalar_subquery()
    combination_head = (
        select(func.max(_newer.c.sequence))
        .where(same_key, has_combination(_newer))
        .scalar_subquery()
    )
    not_head = _row.sequence < case((has_combination(ledger), combination_head), else_=pair_head)
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
            _wt.combination_digest == _row.combination_digest,
        )
    )
    # A pending row already called becomes unknown at its next check (20 h, or too old):
    # the sent rows of its minute must still be there when reconcile decides it.
    may_become_unknown = or_(
        _undecided.c.status == "unknown",
        and_(_undecided.c.status == "pending", _undecided.c.first_attempt_at.is_not(None)),
    )
    unknown_waits = exists(
        select(_undecided.c.identifier).where(
            may_become_unknown,
            _undecided.c.stripe_customer_id == _row.stripe_customer_id,
            _undecided.c.meter == _row.meter,
        )
    )
    old = and_(_row.status.in_(PRUNABLE), _row.updated_at < before, _row.window_end < before)
    if rejected_before is not None:
        old = or_(
            old,
            and_(
                _row.status == "rejected",
                _row.updated_at < rejected_before,
                _row.window_end < rejected_before,
            ),
        )
    return and_(
        old,
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
    rejected_retention_days: int | None = None,
) -> int:
    """Delete the prunable ledger rows, ``batch_rows`` per transaction; return how many went.
    ``rejected_retention_days`` None: rejected rows stay.

    Run it in the reporter's process between cycles: a cycle's writes are what the checks read.
    """
    rejected_before = (
        None if rejected_retention_days is None else cutoff(now, rejected_retention_days)
    )
    return delete_in_batches(
        engine,
        ledger,
        prunable(cutoff(now, retention_days), rejected_before),
        batch_rows=batch_rows,
        key=("identifier",),
        should_stop=should_stop,
    )


@dataclass(frozen=True, slots=True)
class PruneMarks:
    updated_mark: datetime | None = None
    timestamp_mark: datetime | None = None
    full_pass_at: datetime | None = None
    last_pass_at: datetime | None = None


def load_marks(engine: Engine) -> PruneMarks:
    m = ledger_prune_marks.c
    with engine.connect() as connection:
        found = connection.execute(
            select(m.updated_mark, m.timestamp_mark, m.full_pass_at, m.last_pass_at)
        ).first()
    return PruneMarks() if found is None else PruneMarks(*found)


def _save_marks(engine: Engine, marks: PruneMarks) -> None:
    values = {
        "updated_mark": marks.updated_mark,
        "timestamp_mark": marks.timestamp_mark,
        "full_pass_at": marks.full_pass_at,
        "last_pass_at": marks.last_pass_at,
    }
    with engine.begin() as connection:
        changed = connection.execute(update(ledger_prune_marks).values(**values)).rowcount
        if not changed:
            connection.execute(insert(ledger_prune_marks).values(singleton=1, **values))


@dataclass(frozen=True, slots=True)
class PassRanges:
    """What one pass reads: final rows updated in [updated_from, updated_to), rows
    timestamped in [timestamp_from, timestamp_to) and rejected rows updated in
    [rejected_from, rejected_to); ``*_from`` None: from the oldest; ``rejected_to`` None:
    no rejected row goes."""

    updated_from: datetime | None
    updated_to: datetime
    timestamp_from: datetime | None
    timestamp_to: datetime
    rejected_from: datetime | None = None
    rejected_to: datetime | None = None

    @property
    def full(self) -> bool:
        return self.updated_from is None

    def condition(self) -> ColumnElement[bool]:
        """The rows the pass reads (each must also be ``prunable``)."""
        if self.updated_from is None:
            read = _row.updated_at < self.updated_to
        else:
            read = or_(
                and_(_row.updated_at >= self.updated_from, _row.updated_at < self.updated_to),
                and_(
                    _row.timestamp >= (self.timestamp_from or self.timestamp_to),
                    _row.timestamp < self.timestamp_to,
                ),
            )
        if self.rejected_to is None:
            return read
        rejected = and_(_row.status == "rejected", _row.updated_at < self.rejected_to)
        if self.rejected_from is not None:
            rejected = and_(rejected, _row.updated_at >= self.rejected_from)
        return or_(read, rejected)


def pass_ranges(
    marks: PruneMarks,
    now: datetime,
    retention_days: int,
    window_retention_days: int,
    windows: Iterable[Window],
    rejected_retention_days: int | None = None,
) -> PassRanges:
    """The ranges of the next pass: from the marks, or everything when a full pass is due.
    ``rejected_retention_days`` None: no rejected row goes."""
    longest = max((WINDOW_LENGTHS[w] for w in windows), default=WINDOW_LENGTHS["1mo"])
    windows_gone = cutoff(now, window_retention_days) - longest
    before = cutoff(now, retention_days)
    rejected_to = None if rejected_retention_days is None else cutoff(now, rejected_retention_days)
    full_due = marks.full_pass_at is None or now - marks.full_pass_at >= FULL_PASS_EVERY
    if full_due or marks.updated_mark is None:
        return PassRanges(None, before, None, windows_gone, None, rejected_to)
    timestamp_from = marks.timestamp_mark if marks.timestamp_mark is not None else windows_gone
    # Where the last pass's rejected range ended: its cutoff then (no column of its own).
    rejected_from = (
        None
        if rejected_retention_days is None or marks.last_pass_at is None
        else cutoff(marks.last_pass_at, rejected_retention_days)
    )
    # A mark never runs ahead of its end (a retention raised since): nothing read twice.
    return PassRanges(
        min(marks.updated_mark, before),
        before,
        min(timestamp_from, windows_gone),
        windows_gone,
        rejected_from,
        rejected_to,
    )


def prune_ledger_pass(
    engine: Engine,
    now: datetime,
    retention_days: int,
    window_retention_days: int,
    windows: Iterable[Window],
    batch_rows: int,
    should_stop: Callable[[], bool] = lambda: False,
    rejected_retention_days: int | None = None,
) -> int | None:
    """One pass from the marks, if PRUNE_EVERY has passed since the last; how many rows went,
    or None when no pass was due. Marks move only when the pass ran to its end (a stop leaves
    them: the next pass reads the same ranges again). ``rejected_retention_days`` None:
    rejected rows stay."""
    marks = load_marks(engine)
    if marks.last_pass_at is not None and now - marks.last_pass_at < PRUNE_EVERY:
        return None
    ranges = pass_ranges(
        marks, now, retention_days, window_retention_days, windows, rejected_retention_days
    )
    stopped = False

    def stop() -> bool:
        nonlocal stopped
        stopped = stopped or should_stop()
        return stopped

    pruned = delete_in_batches(
        engine,
        ledger,
        and_(ranges.condition(), prunable(ranges.updated_to, ranges.rejected_to)),
        batch_rows=batch_rows,
        key=("identifier",),
        should_stop=stop,
    )
    if not stopped:
        _save_marks(
            engine,
            PruneMarks(
                updated_mark=ranges.updated_to,
                timestamp_mark=ranges.timestamp_to,
                full_pass_at=now if ranges.full else marks.full_pass_at,
                last_pass_at=now,
            ),
        )
    return pruned
