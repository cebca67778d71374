"""The stored-before-acted-on table of Stripe events (``stripe_webhook_events``).

``store`` commits a verified event before the route answers 2xx; a second delivery of the same
event id only counts itself. Events are then acted on from the table: ``claim`` marks one
processed in the transaction that applies its effects, so an event's effects are committed
exactly once (a second process, or a duplicate, finds it processed and changes nothing); a
failed action leaves it pending with the error and a later ``next_attempt_at``, for ever:
it is retried, counted and shown, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from meterstream.schema import stripe_webhook_events as events
from reporters.webhooks.verify import PayloadKind, VerifiedEvent

RETRY_CAP_S = 300.0  # a failing action is retried at least every 5 minutes
_e = events.c


@dataclass(frozen=True)
class StoredEvent:
    event_id: str
    type: str
    payload_kind: str
    created: datetime
    body: str
    attempts: int


@dataclass(frozen=True)
class InboxCounts:
    pending: int
    failing: int
    oldest_pending_at: datetime | None


def store(engine: Engine, event: VerifiedEvent, now: datetime) -> bool:
    """Commit ``event``; True if it is new, False for a duplicate delivery (counted)."""
    for _ in range(2):  # a concurrent first insert of the same id: count it as a duplicate
        try:
            with engine.begin() as connection:
                if _count_delivery(connection, event.event_id):
                    return False
                connection.execute(
                    insert(events).values(
                        event_id=event.event_id,
                        type=event.type,
                        payload_kind=event.payload_kind,
                        created=event.created,
                        body=event.body,
                        received_at=now,
                        deliveries=1,
                        status="pending",
                        attempts=0,
                        next_attempt_at=now,
                    )
                )
                return True
        except IntegrityError:
            continue
    with engine.begin() as connection:
        _count_delivery(connection, event.event_id)
    return False


def _count_delivery(connection: Connection, event_id: str) -> bool:
    done = connection.execute(
        update(events).where(_e.event_id == event_id).values(deliveries=_e.deliveries + 1)
    )
    return bool(done.rowcount)


def due(
    engine: Engine, now: datetime, limit: int = 100, payload_kind: PayloadKind | None = None
) -> list[StoredEvent]:
    """Pending events whose next attempt is due, the longest-waiting first (index range);
    of one payload kind (snapshot, thin) when given."""
    query = select(_e.event_id, _e.type, _e.payload_kind, _e.created, _e.body, _e.attempts)
    query = query.where(_e.status == "pending", _e.next_attempt_at <= now)
    if payload_kind is not None:
        query = query.where(_e.payload_kind == payload_kind)
    with engine.connect() as connection:
        found = connection.execute(
            query.order_by(_e.next_attempt_at, _e.created).limit(limit)
        ).all()
    return [StoredEvent(*row) for row in found]


def claim(connection: Connection, event_id: str, now: datetime) -> bool:
    """Mark ``event_id`` processed inside the caller's transaction (which then applies its
    effects), only if it is still pending; False: another process took it (apply nothing).
    On PostgreSQL the update's row lock makes a concurrent claim wait for this transaction,
    then find it taken; a rollback leaves it pending."""
    done = connection.execute(
        update(events)
        .where(_e.event_id == event_id, _e.status == "pending")
        .values(status="processed", processed_at=now, last_error=None)
    )
    return bool(done.rowcount)


def set_outcome(connection: Connection, event_id: str, outcome: str) -> None:
    """What acting on a claimed event did: applied, stale or ignored."""
    connection.execute(update(events).where(_e.event_id == event_id).values(outcome=outcome))


def record_failure(engine: Engine, event_id: str, error: str, now: datetime) -> int:
    """Keep the event pending with ``error``; retried after a doubling wait (1 s to 5 min).
    Returns the attempts so far."""
    with engine.begin() as connection:
        attempts = connection.execute(
            select(_e.attempts).where(_e.event_id == event_id, _e.status == "pending")
        ).scalar()
        if attempts is None:
            return 0
        attempts = int(attempts) + 1
        wait_s = retry_wait_s(attempts)
        connection.execute(
            update(events)
            .where(_e.event_id == event_id, _e.status == "pending")
            .values(
                attempts=attempts,
                last_error=error[:2000],
                next_attempt_at=now + timedelta(seconds=wait_s),
            )
        )
    return attempts


def retry_wait_s(attempts: int) -> float:
    """The wait after the ``attempts``-th failure: 1 s doubling to RETRY_CAP_S. The exponent
    is bounded: an event failing for days (2.0 ** 1024 overflows) must not raise here, or the
    processor stops at it, the longest-due event, on every pass, and acts on nothing else."""
    return min(RETRY_CAP_S, 2.0 ** min(max(attempts - 1, 0), 30))


def counts(engine: Engine) -> InboxCounts:
    """Pending and failing events and the oldest pending one's receipt (the status index)."""
    with engine.connect() as connection:
        pending, failing, oldest = connection.execute(
            select(
                func.count(),
                func.count().filter(_e.attempts > 0),
                func.min(_e.received_at),
            ).where(_e.status == "pending")
        ).one()
    return InboxCounts(int(pending), int(failing), oldest)


def failing(engine: Engine, limit: int = 10) -> list[tuple[str, str, int, str | None]]:
    """(event id, type, attempts, last error) of pending events whose action failed."""
    with engine.connect() as connection:
        found = connection.execute(
            select(_e.event_id, _e.type, _e.attempts, _e.last_error)
            .where(_e.status == "pending", _e.attempts > 0)
            .order_by(_e.next_attempt_at)
            .limit(limit)
        ).all()
    return [(str(a), str(b), int(c), d) for a, b, c, d in found]
