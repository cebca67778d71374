"""Which windows are due: those in the report queue whose revision the ledger lacks.

A cycle reads what changed, never all history. The aggregators upsert ``report_queue`` (key,
revision) in the very transaction that changes a window's revision (aggregators/totals.py,
aggregators/postgres.py; ``meterstream.report_queue`` for anyone else who writes totals). The
reporter reads the queue joined, key by key, with ``window_totals`` and the ledger's newest
revision of the window, in one statement (one snapshot). It deletes a queue row only with
``DELETE ... WHERE key AND revision = <the revision it read>`` and only once the ledger holds
that revision: in the transaction that inserts the ledger row (reporters/rows.py), or, for a
window found not due, after reading a ledger that already has it (committed).

Why no interleaving loses a change. Invariant: whenever a window's revision is not the
ledger's newest for it, the queue has a row for it. Revisions of a window only grow, and each
commit that changes one writes the queue row with the new value. Take the reporter's delete of
a row it read at revision R (with the window at R in the same snapshot):

- no worker committed a change to the window since that snapshot: the window is still at R,
  the ledger has R (committed with, or before, the delete), so it is not due and needs no row;
- a worker committed R' > R since: the row holds R' != R, so the delete matches nothing
  (PostgreSQL, READ COMMITTED: a DELETE that meets a row changed by a committed transaction
  re-checks its WHERE on the newest version; SQLite runs one writer at a time);
- a worker has written the row but not committed: the delete waits for its row lock, then
  behaves as above (commit) or as the first case (rollback);
- a worker writes after the delete: its upsert inserts a fresh row (ON CONFLICT waits for the
  delete's transaction first).

Two workers on one window serialise on the window's row (its lock, taken before the queue's,
both in key order): the second computes its revision from the first's, so the queue ends
with the newer revision whatever the commit order. Windows held (customer not linked,
negative correction the meter forbids, revision went back) keep their row, set aside
(reporters/held_windows.py): a cycle skips it while its revision is the one held, and takes
it back on a new revision, a link, or a slow re-check. A periodic full comparison
(reporters/backstop.py) counts what the queue missed (meterstream_reporter_backstop_found_total,
which must stay 0).

The argument needs revisions that only grow. Two ways to break it, neither done by meterstream
today: rebuilding window_totals from scratch (revisions start again: held loudly as
``revision_went_back`` when below the ledger's, but a rebuilt window that climbs back to a
revision read before could lose its queue row to that read's delete), and deleting windows
(retention) without deleting their queue rows in the same transaction. The backstop catches
both.

A revision *older* than the ledger's (the aggregators' table was rebuilt, say) is due too, so
the reporter holds it loudly instead of skipping it in silence.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    and_,
    bindparam,
    delete,
    func,
    or_,
    select,
)

from meterstream.db import BinaryArray
from meterstream.schema import ledger, report_queue, window_totals

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
    # The queue row's revision when it was read: its row is deleted only while it still holds
    # this (see the module docstring). None: not read from the queue (nothing to delete).
    queued: int | None = None
    # The window's combination of dimension values and its digest (meterstream.dimensions);
    # empty for a meter without dimensions. A window of such a meter is one per combination.
    combination: str = ""
    combination_digest: bytes = b""

    @property
    def key(self) -> Key:
        return (self.customer_id, self.meter)


_q = report_queue.c
_wt = window_totals.c
# A queue row set aside (reporters/held_windows.py): held at the revision it still has.
IS_HELD = and_(_q.held_revision.is_not(None), _q.held_revision == _q.revision)
NOT_HELD = or_(_q.held_revision.is_(None), _q.held_revision != _q.revision)
RECHECK_PER_CYCLE = 1_000
# The ledger's newest revision of the queued window: one index lookup (its primary key).
_REPORTED = (
    select(func.max(ledger.c.revision))
    .where(
        ledger.c.customer_id == _q.customer_id,
        ledger.c.meter == _q.meter,
        ledger.c.window_start == _q.window_start,
        ledger.c.combination_digest == _q.combination_digest,
    )
    .scalar_subquery()
)
# A queue row found settled: (customer_id, meter, window_start, combination_digest, revision).
SettledRow = tuple[str, str, datetime, bytes, int]
_ORDER = (_q.customer_id, _q.meter, _q.window_start, _q.combination_digest)


def _queue_query(
    meters: Iterable[str], *, held: bool = False, recheck_before: datetime | None = None
) -> Select[Any]:
    """The queue rows not held; or the held ones (with ``recheck_before``: those last
    checked before it, RECHECK_PER_CYCLE of them, oldest check first)."""
    query = (
        select(
            _q.customer_id,
            _q.meter,
            _q.window_start,
            _q.combination,
            _q.combination_digest,
            _q.revision.label("queued"),
            _wt.window_end,
            _wt.revision,
            _wt.value,
            _wt.last_event_time,
            func.coalesce(_REPORTED, 0).label("reported"),
        )
        .select_from(
            report_queue.outerjoin(
                window_totals,
                and_(
                    _wt.customer_id == _q.customer_id,
                    _wt.meter == _q.meter,
                    _wt.window_start == _q.window_start,
                    _wt.combination_digest == _q.combination_digest,
                ),
            )
        )
        .where(_q.meter.in_(list(meters)))
    )
    if not held:
        return query.where(NOT_HELD).order_by(*_ORDER)
    if recheck_before is None:
        return query.where(IS_HELD).order_by(*_ORDER)
    return (
        query.where(IS_HELD, _q.checked_at < recheck_before)
        .order_by(_q.checked_at, *_ORDER)
        .limit(RECHECK_PER_CYCLE)
    )


def _read(
    connection: Connection, meters: Iterable[str], recheck_before: datetime | None = None
) -> tuple[dict[Key, list[DueWindow]], list[SettledRow]]:
    """(due windows per key, queue rows found not due: to settle). Held rows apart, but
    those last checked before ``recheck_before``."""
    if recheck_before is not None and recheck_before.tzinfo is None:
        raise ValueError(f"naive datetime {recheck_before!r}: meterstream uses UTC times only")
    due: dict[Key, list[DueWindow]] = {}
    settled: list[SettledRow] = []
    meters = list(meters)
    found = _fetch(connection, _queue_query(meters))
    if recheck_before is not None:
        rechecked = _fetch(
            connection, _queue_query(meters, held=True, recheck_before=recheck_before)
        )
        if rechecked:  # nearly always none: no sort of the whole queue for nothing
            found += rechecked
            found.sort(key=lambda row: (row[0], row[1], row[2], row[4]))
    for row in found:
        if row[7] is None or row[7] == row[10]:
            # Gone from window_totals, or the ledger already has this revision.
            settled.append((row[0], row[1], row[2], row[4], row[5]))
            continue
        window = _window(row)
        due.setdefault(window.key, []).append(window)
    return due, settled


# A queue row as _fetch gives it: _queue_query's columns in order, as Python values.
_QueueRow = tuple[
    str, str, datetime, str, bytes, int, datetime | None, int | None, Any, datetime | None, int
]


def _fetch(connection: Connection, query: Select[Any]) -> list[_QueueRow]:
    """The rows of a _queue_query, each a tuple of its columns in order, times in UTC (as
    UTCDateTime reads them) and the digest as bytes. On PostgreSQL through the driver, with
    no per-value processing of SQLAlchemy's: that was two thirds of the CPU of reading a
    catch-up's queue (24 us a row; 8 now)."""
    if connection.dialect.name != "postgresql":
        return [
            (r[0], r[1], r[2], r[3], bytes(r[4]), int(r[5]), r[6], r[7], r[8], r[9], int(r[10]))
            for r in connection.execute(query)
        ]
    compiled = query.compile(
        dialect=connection.dialect, compile_kwargs={"render_postcompile": True}
    )
    return [
        (
            r[0],
            r[1],
            r[2].astimezone(UTC),
            r[3],
            bytes(r[4]),
            r[5],
            None if r[6] is None else r[6].astimezone(UTC),
            r[7],
            r[8],
            None if r[9] is None else r[9].astimezone(UTC),
            r[10],
        )
        for r in connection.exec_driver_sql(compiled.string, compiled.params)
    ]


def _window(row: _QueueRow) -> DueWindow:
    """A due window of a queue row (its window_totals row present: window_end and revision)."""
    window_end, revision = row[6], row[7]
    if window_end is None or revision is None:
        raise ValueError(f"queue row {row[:3]} has no window total: it is not due")
    # Positional (DueWindow's field order): a catch-up makes one per due window.
    return DueWindow(
        row[0], row[1], row[2], window_end, revision, row[8], row[9], row[5], row[3], row[4]
    )


def due_windows(
    engine: Engine, meters: Iterable[str], *, include_held: bool = False
) -> dict[Key, list[DueWindow]]:
    """The due windows of ``meters``, per (customer, meter), oldest window first, held ones
    apart unless ``include_held``. Reads only."""
    with engine.connect() as connection:
        due = _read(connection, meters)[0]
        if include_held:
            for row in _fetch(connection, _queue_query(meters, held=True)):
                if row[7] is not None and row[7] != row[10]:
                    window = _window(row)
                    due.setdefault(window.key, []).append(window)
            for windows in due.values():
                windows.sort(key=lambda w: (w.window_start, w.combination_digest))
        return due


def take_due(
    engine: Engine, meters: Iterable[str], recheck_before: datetime | None = None
) -> dict[Key, list[DueWindow]]:
    """due_windows, plus held windows last checked before ``recheck_before`` (bounded), and
    delete the queue rows of the windows found not due (guarded)."""
    with engine.connect() as connection:
        due, settled = _read(connection, meters, recheck_before)
        connection.rollback()  # end the read's transaction before writing (SQLite: one writer)
    if settled:
        with engine.begin() as connection:
            settle(connection, settled)
    return due


def count_due_windows(engine: Engine, meters: Iterable[str]) -> int:
    """How many windows due_windows would return (the queue's size, bounded by the work)."""
    with engine.connect() as connection:
        due, _settled = _read(connection, meters)
    return sum(len(windows) for windows in due.values())


_SETTLE = delete(report_queue).where(
    _q.customer_id == bindparam("k_customer"),
    _q.meter == bindparam("k_meter"),
    _q.window_start == bindparam("k_start"),
    _q.combination_digest == bindparam("k_digest"),
    _q.revision == bindparam("k_revision"),
)


# PostgreSQL: every settled row in one statement (five arrays, one row a key), instead of a
# DELETE a row: the per-statement cost was most of a catch-up chunk's time in settle, on both
# sides. The rows are locked first, in the order given (the aggregators' key order: Python's,
# which a collation's ORDER BY on the text columns may not be), so this and an aggregator's
# batch cannot deadlock; a row whose revision moved on before its lock is not deleted.
_SETTLE_POSTGRESQL = """
DELETE FROM report_queue AS q USING (
    SELECT r.customer_id, r.meter, r.window_start, r.combination_digest, r.revision
    FROM unnest(
        %s::varchar[], %s::varchar[], %s::timestamptz[], %s::bytea[], %s::bigint[]
    ) WITH ORDINALITY AS k (customer_id, meter, window_start, combination_digest, revision, n)
    JOIN report_queue AS r ON r.customer_id = k.customer_id AND r.meter = k.meter
        AND r.window_start = k.window_start AND r.combination_digest = k.combination_digest
        AND r.revision = k.revision
    ORDER BY k.n
    FOR UPDATE OF r
) AS locked
WHERE q.customer_id = locked.customer_id AND q.meter = locked.meter
    AND q.window_start = locked.window_start AND q.combination_digest = locked.combination_digest
    AND q.revision = locked.revision
"""


def _driver_key(row: SettledRow) -> SettledRow:
    customer_id, meter, start, digest, revision = row
    if start.tzinfo is None:
        raise ValueError(f"naive datetime {start!r}: meterstream stores UTC times only")
    return (customer_id, meter, start.astimezone(UTC), digest, revision)


def settle(connection: Connection, windows: Iterable[DueWindow | SettledRow]) -> None:
    """Delete the queue rows of ``windows`` whose revision is still the one read, in
    ``connection``'s transaction: call it only where the ledger has that revision committed
    or in the same transaction. In key order, as the aggregators write them (no deadlock)."""
    rows: set[SettledRow] = set()
    for window in windows:
        if not isinstance(window, DueWindow):
            rows.add(window)
        elif window.queued is not None:
            rows.add(
                (
                    window.customer_id,
                    window.meter,
                    window.window_start,
                    window.combination_digest,
                    window.queued,
                )
            )
    if rows and connection.dialect.name == "postgresql":
        # Handed to psycopg as they are: SQLAlchemy's per-row parameter processing was most of
        # a catch-up chunk's Python time here. The times are the aware UTC datetimes
        # UTCDateTime would bind.
        columns = tuple(map(BinaryArray, zip(*map(_driver_key, sorted(rows)), strict=True)))
        connection.exec_driver_sql(_SETTLE_POSTGRESQL, columns)
    elif rows:
        connection.execute(
            _SETTLE,
            [
                {"k_customer": c, "k_meter": m, "k_start": s, "k_digest": d, "k_revision": r}
                for c, m, s, d, r in sorted(rows)
            ],
        )
