"""The ledger: what was (or will be) sent to Stripe, under which identifier, and how it ended.

A row is written and committed before its call, then updated from the answer. Statuses:

- ``pending``   written, not yet acknowledged; resent (same identifier, same body) until it is.
- ``sent``      Stripe acknowledged it (v1: 200, or "already exists" for our own identifier).
- ``accepted``  the v2 stream answered 202: Stripe took it but validates later. A bad event
                then shows in Stripe's ``v1.billing.meter.error_report_triggered`` events and in
                ``meterstream reconcile``, not here.
- ``rejected``  Stripe refused it for good (400), or it was too old to send; ``error_code`` and
                ``last_error`` say why. Its units stay accounted: a person decides.
- ``carried``   a sum-meter row worth 0 whole units; nothing to send, its fraction is carried.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import Connection, Engine, func, select, update

from meterstream.schema import ledger

Status = Literal["pending", "sent", "accepted", "rejected", "carried"]
ACKNOWLEDGED: tuple[Status, ...] = ("sent", "accepted")
# Stripe has said its last word (or nothing needs saying): no more calls for the row.
FINAL: tuple[Status, ...] = ("sent", "accepted", "rejected", "carried")


def identifier_for(
    customer_id: str, meter: str, window_start: datetime, window_end: datetime, revision: int
) -> str:
    """The meter event's identifier: deterministic, so a resend after a crash is recognised.

    A hash of the parts (customer ids may be long or hold any character), 52 characters, well
    under Stripe's 100.
    """
    parts = "\x1f".join(
        (customer_id, meter, window_start.isoformat(), window_end.isoformat(), str(revision))
    )
    return "ms1_" + hashlib.sha256(parts.encode("utf-8")).hexdigest()[:48]


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One ledger row; the fields of a meter event request are all here, so a resend is
    byte-for-byte the same request."""

    customer_id: str
    meter: str
    window_start: datetime
    window_end: datetime
    revision: int
    sequence: int
    total: Decimal
    accounted_total: Decimal
    units_total: int
    value: int
    event_name: str
    stripe_customer_id: str
    timestamp: datetime
    identifier: str
    status: str
    attempts: int
    error_code: str | None
    last_error: str | None
    stripe_request_id: str | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None


def _row(mapping: Any) -> LedgerRow:
    return LedgerRow(**{name: mapping[name] for name in LedgerRow.__slots__})


def latest_row(connection: Connection, customer_id: str, meter: str) -> LedgerRow | None:
    """The newest row of one (customer, meter): it carries the running totals."""
    found = (
        connection.execute(
            select(ledger)
            .where(ledger.c.customer_id == customer_id, ledger.c.meter == meter)
            .order_by(ledger.c.sequence.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    return None if found is None else _row(found)


def window_total(
    connection: Connection, customer_id: str, meter: str, window_start: datetime
) -> tuple[int, Decimal]:
    """(revision, exact total) of a window's newest row; (0, 0) if it was never reported."""
    found = connection.execute(
        select(ledger.c.revision, ledger.c.total)
        .where(
            ledger.c.customer_id == customer_id,
            ledger.c.meter == meter,
            ledger.c.window_start == window_start,
        )
        .order_by(ledger.c.revision.desc())
        .limit(1)
    ).first()
    return (0, Decimal(0)) if found is None else (int(found[0]), found[1])


def insert_row(connection: Connection, row: LedgerRow) -> None:
    connection.execute(ledger.insert().values(**asdict(row)))


def pending_rows(engine: Engine) -> list[LedgerRow]:
    """Every pending row, in the order its (customer, meter) must send them."""
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger)
            .where(ledger.c.status == "pending")
            .order_by(ledger.c.customer_id, ledger.c.meter, ledger.c.sequence)
        ).mappings()
        return [_row(mapping) for mapping in found]


def mark_acknowledged(
    engine: Engine, identifier: str, status: Status, request_id: str | None, now: datetime
) -> None:
    _update(
        engine,
        identifier,
        status=status,
        attempts=ledger.c.attempts + 1,
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
) -> None:
    _update(
        engine,
        identifier,
        status="rejected",
        attempts=ledger.c.attempts + 1,
        error_code=code,
        last_error=message,
        stripe_request_id=request_id,
        updated_at=now,
    )


def mark_attempt(engine: Engine, identifier: str, error: str, now: datetime) -> None:
    """A failed try that may succeed later: the row stays pending."""
    _update(engine, identifier, attempts=ledger.c.attempts + 1, last_error=error, updated_at=now)


def _update(engine: Engine, identifier: str, **values: Any) -> None:
    with engine.begin() as connection:
        connection.execute(update(ledger).where(ledger.c.identifier == identifier).values(values))


def rows_for(engine: Engine, customer_id: str, meter: str) -> list[LedgerRow]:
    """Every row of one (customer, meter) in sending order (for people and tests)."""
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger)
            .where(ledger.c.customer_id == customer_id, ledger.c.meter == meter)
            .order_by(ledger.c.sequence)
        ).mappings()
        return [_row(mapping) for mapping in found]


def all_rows(engine: Engine) -> list[LedgerRow]:
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger).order_by(ledger.c.customer_id, ledger.c.meter, ledger.c.sequence)
        ).mappings()
        return [_row(mapping) for mapping in found]


def counts_by_status(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger.c.status, func.count()).group_by(ledger.c.status)
        ).all()
    return {str(status): int(count) for status, count in found}


def recent_rejections(engine: Engine, limit: int = 10) -> list[LedgerRow]:
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger)
            .where(ledger.c.status == "rejected")
            .order_by(ledger.c.updated_at.desc())
            .limit(limit)
        ).mappings()
        return [_row(mapping) for mapping in found]


def last_sent_at(engine: Engine) -> datetime | None:
    """When Stripe last acknowledged a row (None if never)."""
    with engine.connect() as connection:
        found: datetime | None = connection.execute(
            select(ledger.c.sent_at)
            .where(ledger.c.sent_at.is_not(None))
            .order_by(ledger.c.sent_at.desc())
            .limit(1)
        ).scalar()
    return found
