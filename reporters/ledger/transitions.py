"""The ledger's state transitions: each update is guarded by the status it expects, so a late
answer or a second reporter cannot overwrite a settled row (see model for the statuses).

Stamping an attempt (committed before the call), acknowledging, rejecting, holding as
unknown, and reconcile's moves back to pending or on to sent; the stream's acceptance of one
batch and the stamp of the next in one transaction.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, any_, bindparam, case, func, select, update

from meterstream.db import BinaryStrings
from meterstream.errors import AcknowledgementMismatchError
from meterstream.schema import ledger
from reporters.ledger.bulk import FilterOnly, still_pending
from reporters.ledger.model import Status

_l = ledger.c

_STAMP = (
    update(ledger)
    .where(_l.identifier.in_(bindparam("identifiers", expanding=True)), still_pending())
    .values(
        attempts=_l.attempts + 1,
        first_attempt_at=func.coalesce(_l.first_attempt_at, bindparam("now")),
        updated_at=bindparam("now"),
    )
    .returning(_l.identifier)
)


# PostgreSQL: the same statements with the identifiers as one array parameter, so each is one
# statement text whatever the batch's size: psycopg prepares it once per connection instead of
# SQLAlchemy expanding and PostgreSQL parsing and planning 100 placeholders for every call.
_IDENTIFIERS = any_(bindparam("identifier_array", type_=BinaryStrings))
_STAMP_ARRAY = (
    update(ledger)
    .where(_l.identifier == _IDENTIFIERS, still_pending())
    .values(
        attempts=_l.attempts + 1,
        first_attempt_at=func.coalesce(_l.first_attempt_at, bindparam("now")),
        updated_at=bindparam("now"),
    )
    .returning(_l.identifier)
)
# The stream's acceptance (no request ids) in one statement: the rows still pending, locked in
# identifier order (two writers locking overlapping rows cannot deadlock), then updated, still
# guarded by ``status = 'pending'``; RETURNING gives exactly the rows updated. The locking
# subquery is what orders the locks: the plans PostgreSQL picks for ``identifier = ANY(array)``
# (a seq scan of a small ledger, a bitmap heap scan of a large one) meet the rows in the
# table's order, not the identifiers' (test_stream_acceptance_locks_its_rows_in_identifier_order).
# The update joins the locked rows (UPDATE ... FROM): each found again by its identifier's
# index. ``identifier IN (locking subquery)`` was planned as a nested loop that rescanned the
# locked rows for every row updated, quadratic in the batch: 296 ms for 1,000 rows against
# 39 ms joined (bench.report.stream: that statement was most of the database's time).
_LOCKING = ledger.alias("locking")
_LOCKED_PENDING = (
    select(_LOCKING.c.identifier)
    .where(_LOCKING.c.identifier == _IDENTIFIERS, FilterOnly(_LOCKING.c.status, "pending"))
    .order_by(_LOCKING.c.identifier)
    .with_for_update()
    .subquery("locked")
)
_ACCEPT_ARRAY = (
    update(ledger)
    .where(_l.identifier == _LOCKED_PENDING.c.identifier, still_pending())
    .values(
        status="accepted",
        stripe_request_id=None,
        last_error=None,
        error_code=None,
        updated_at=bindparam("now"),
        sent_at=bindparam("now"),
    )
    .returning(_l.identifier)
)


def start_attempts(engine: Engine, identifiers: Collection[str], now: datetime) -> set[str]:
    """start_attempt for many rows in one committed statement; the identifiers stamped (the
    others are no longer pending: do not call them)."""
    if not identifiers:
        return set()
    with engine.begin() as connection:
        return _start_attempts(connection, identifiers, now)


def _start_attempts(
    connection: Connection, identifiers: Collection[str], now: datetime
) -> set[str]:
    if not identifiers:
        return set()
    if connection.dialect.name == "postgresql":
        found = connection.execute(
            _STAMP_ARRAY, {"identifier_array": list(identifiers), "now": now}
        )
    else:
        found = connection.execute(_STAMP, {"identifiers": list(identifiers), "now": now})
    return {str(identifier) for (identifier,) in found}


_UNSTAMP_VALUES = {
    "attempts": _l.attempts - 1,
    # The old row's attempts: 1 means this was its only stamp.
    "first_attempt_at": case((_l.attempts == 1, None), else_=_l.first_attempt_at),
    "updated_at": bindparam("now"),
}
_UNSTAMP = (
    update(ledger)
    .where(
        _l.identifier.in_(bindparam("identifiers", expanding=True)),
        still_pending(),
        _l.attempts > 0,
    )
    .values(_UNSTAMP_VALUES)
)
_UNSTAMP_ARRAY = (
    update(ledger)
    .where(_l.identifier == _IDENTIFIERS, still_pending(), _l.attempts > 0)
    .values(_UNSTAMP_VALUES)
)
# Identifiers in one SQLite statement: within the 999 variables of SQLite before 3.32.
_SQLITE_PARAMETERS = 900


def undo_attempts(engine: Engine, identifiers: Collection[str], now: datetime) -> None:
    """Take back one stamp of each of ``identifiers``, whose calls were never made (a stop
    request came between the stamp and the call): ``unknown`` must only ever mean "Stripe may
    have it". A row left with no stamp has no first attempt either; one with another stamp (an
    earlier call, or another reporter's) keeps its first attempt, the earliest."""
    if not identifiers:
        return
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":  # one array: no limit on the number
            connection.execute(_UNSTAMP_ARRAY, {"identifier_array": list(identifiers), "now": now})
            return
        listed = list(identifiers)
        for start in range(0, len(listed), _SQLITE_PARAMETERS):
            connection.execute(
                _UNSTAMP, {"identifiers": listed[start : start + _SQLITE_PARAMETERS], "now": now}
            )


_STILL_PENDING = (
    select(_l.identifier)
    .where(_l.identifier.in_(bindparam("identifiers", expanding=True)), still_pending())
    # Locked in one order, so two writers locking overlapping rows cannot deadlock.
    .order_by(_l.identifier)
    .with_for_update()
)
_ACKNOWLEDGE = (
    update(ledger)
    .where(_l.identifier.in_(bindparam("identifiers", expanding=True)), still_pending())
    .values(
        status=bindparam("new_status"),
        stripe_request_id=None,
        last_error=None,
        error_code=None,
        updated_at=bindparam("now"),
        sent_at=bindparam("now"),
    )
)
_SET_REQUEST_ID = (
    update(ledger)
    .where(_l.identifier == bindparam("row_identifier"), _l.status == bindparam("new_status"))
    .values(stripe_request_id=bindparam("request_id"))
)


def mark_all_acknowledged(
    engine: Engine, request_ids: Mapping[str, str | None], status: Status, now: datetime
) -> set[str]:
    """mark_acknowledged for many pending rows (identifier -> Stripe's request id) in one
    committed transaction; the identifiers updated (the others were settled elsewhere).

    Statements that compile once and stay cached (a CASE over 100 request ids compiled anew
    every time was a tenth of the v1 reporter's CPU): the rows still pending, locked in
    identifier order (PostgreSQL; SQLite's writer already holds the database); one update of
    them all, still guarded by ``status = 'pending'``, with no request id; then, in one
    executemany, the request id of each row that has one (the stream's rows have none). The
    rows each update changed must be the rows it meant to: the identifiers returned are those
    updated. If not (a row changed despite the lock), AcknowledgementMismatchError, and the
    transaction is rolled back: nothing is marked, the rows stay pending and are resent under
    their identifiers, which Stripe deduplicates.
    """
    if not request_ids:
        return set()
    with engine.begin() as connection:
        return _acknowledge(connection, request_ids, status, now)


def _acknowledge(
    connection: Connection, request_ids: Mapping[str, str | None], status: Status, now: datetime
) -> set[str]:
    if not request_ids:
        return set()
    found = connection.execute(_STILL_PENDING, {"identifiers": list(request_ids)})
    pending = {str(identifier) for (identifier,) in found}
    if pending:
        updated = connection.execute(
            _ACKNOWLEDGE,
            {"identifiers": sorted(pending), "new_status": status, "now": now},
        ).rowcount
        with_ids = [
            {"row_identifier": i, "new_status": status, "request_id": request_ids[i]}
            for i in sorted(pending)
            if request_ids[i] is not None
        ]
        ids_set = connection.execute(_SET_REQUEST_ID, with_ids).rowcount if with_ids else 0
        if updated != len(pending) or ids_set != len(with_ids):
            raise AcknowledgementMismatchError(
                f"acknowledging {len(pending)} pending ledger row(s) updated {updated} "
                f"(request ids: {ids_set} of {len(with_ids)}); rolled back, the rows stay "
                "pending (is another writer bypassing the lock?)"
            )
    return pending


def start_attempt(engine: Engine, identifier: str, now: datetime) -> bool:
    """Record, committed, that a call for a pending row is about to start; False if the row
    is no longer pending (another reporter or a late answer settled it): then do not call."""
    return _update(
        engine,
        identifier,
        "pending",
        attempts=ledger.c.attempts + 1,
        first_attempt_at=func.coalesce(ledger.c.first_attempt_at, now),
        updated_at=now,
    )


def mark_acknowledged(
    engine: Engine,
    identifier: str,
    status: Status,
    request_id: str | None,
    now: datetime,
    expected: Status = "pending",
) -> bool:
    return _update(
        engine,
        identifier,
        expected,
        status=status,
        stripe_request_id=request_id,
        last_error=None,
        error_code=None,
        updated_at=now,
        sent_at=now,
    )


def mark_rejected(
    engine: Engine,
    identifier: str,
    code: str,
    message: str,
    request_id: str | None,
    now: datetime,
) -> bool:
    return _update(
        engine,
        identifier,
        "pending",
        status="rejected",
        error_code=code,
        last_error=message,
        stripe_request_id=request_id,
        updated_at=now,
    )


def mark_attempt(engine: Engine, identifier: str, error: str, now: datetime) -> bool:
    """A failed try that may succeed later: the row stays pending."""
    return _update(engine, identifier, "pending", last_error=error, updated_at=now)


def mark_unknown(engine: Engine, identifier: str, reason: str, now: datetime) -> bool:
    """A pending row too old to resend blindly (UNKNOWN_AFTER); reconcile decides."""
    return _update(
        engine,
        identifier,
        "pending",
        status="unknown",
        error_code="resend_window_expired",
        last_error=reason,
        updated_at=now,
    )


def mark_pending_again(engine: Engine, identifier: str, now: datetime) -> bool:
    """An unknown row Stripe's summaries show it never recorded: safe to send afresh, with
    no stamp (none of its calls counts: a stamp taken back later leaves none)."""
    return _update(
        engine,
        identifier,
        "unknown",
        status="pending",
        attempts=0,
        first_attempt_at=None,
        error_code=None,
        last_error="reconcile: not in Stripe's summaries; sending again",
        updated_at=now,
    )


def confirm_accepted(engine: Engine, identifier: str, now: datetime) -> bool:
    """An ``accepted`` (v2 stream) row that Stripe's summaries show counted: ``sent``."""
    return _update(engine, identifier, "accepted", status="sent", updated_at=now)


def _update(engine: Engine, identifier: str, expected: Status, **values: Any) -> bool:
    """Update one row only while it has status ``expected``, so a late answer or a second
    reporter cannot overwrite a settled row; True if the row was updated."""
    with engine.begin() as connection:
        done = connection.execute(
            update(ledger)
            .where(ledger.c.identifier == identifier, FilterOnly(ledger.c.status, expected))
            .values(values)
        )
        return bool(done.rowcount)


def accept_then_stamp(
    engine: Engine, accepted: Collection[str], to_stamp: Collection[str], now: datetime
) -> tuple[set[str], set[str]]:
    """mark_all_acknowledged(``accepted``, status accepted) then start_attempts(``to_stamp``)
    in one committed transaction: the stream's answer to one call and the stamp of the next
    cost one commit. Returns (identifiers accepted, identifiers stamped); if either part
    fails, neither is written (the accepted rows stay pending and are resent under their
    identifiers, which Stripe deduplicates; the next batch is not called)."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            marked = _accept(connection, accepted, now)
        else:
            marked = _acknowledge(connection, dict.fromkeys(accepted), "accepted", now)
        return marked, _start_attempts(connection, to_stamp, now)


# Stripe's error reports may name a row in any status its call can leave it in: accepted (the
# stream's 202), pending or unknown (a crash before the answer was recorded), even sent
# (reconcile matched totals that another event made up). Its word is final: rejected.
_REPORTABLE = ("accepted", "pending", "unknown", "sent")


def reject_reported(
    connection: Connection, identifier: str, code: str, message: str, now: datetime
) -> bool:
    """Make the row of ``identifier`` ``rejected`` with Stripe's asynchronous error (its
    ``v1.billing.meter.error_report_triggered``), inside the caller's transaction; False when
    no such row is in a status a call leaves (not ours, pruned, or already final)."""
    done = connection.execute(
        update(ledger)
        .where(ledger.c.identifier == identifier, ledger.c.status.in_(_REPORTABLE))
        .values(
            status="rejected",
            error_code=code[:100],
            last_error=message,
            updated_at=now,
        )
    )
    return bool(done.rowcount)


def _accept(connection: Connection, identifiers: Collection[str], now: datetime) -> set[str]:
    """PostgreSQL: mark the pending rows of ``identifiers`` accepted in one statement (they
    carry no request id); the identifiers updated."""
    if not identifiers:
        return set()
    found = connection.execute(_ACCEPT_ARRAY, {"identifier_array": list(identifiers), "now": now})
    return {str(identifier) for (identifier,) in found}
