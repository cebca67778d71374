"""Open payment failures per invoice (``payment_failures``), from Stripe's invoice and
subscription events.

``invoice.payment_failed`` and ``invoice.payment_action_required`` open (or update) the
invoice's failure; ``invoice.paid`` closes it, and so does ``invoice.voided`` (a void invoice
can never be paid: nothing else would close it); ``invoice.marked_uncollectible`` and a
subscription turning ``past_due`` or ``unpaid`` mark it, and it stays open until paid (a
written-off invoice is money a person may still collect). Stripe delivers out of order:

- A payment or a void is final at Stripe (such an invoice cannot fail again): it closes the
  row whatever its time, and nothing after it changes the row (``stale``). A paid invoice
  with no failure leaves a closed row, so a failure delivered after its payment cannot open it.
- The invoice's facts (amount, attempts, next attempt, code) come from invoice events only;
  the row keeps the time and id of the newest one applied, and an older one is ``stale``.
- A subscription event carries none of them: it opens a row (no invoice event applied yet,
  so any invoice event fills it in) or, if newer than the row's invoice event, sets its
  reason; it never hides the amount of an invoice event delivered after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Connection, func, insert, select, update

from meterstream.schema import customer_links, payment_failures

Outcome = Literal["applied", "stale", "ignored"]
# The event time of a row no invoice event has reached yet (opened by a subscription event).
NO_INVOICE_EVENT = datetime(1970, 1, 1, tzinfo=UTC)
# What closes a failure for good: the invoice can neither fail nor be paid after it.
FINAL = ("paid", "voided")
FAILED = {
    "invoice.payment_failed": "payment_failed",
    "invoice.payment_action_required": "payment_action_required",
}
_p = payment_failures.c


@dataclass(frozen=True)
class InvoiceFacts:
    """What a payment-failure row needs from one event, checked."""

    invoice_id: str
    stripe_customer_id: str
    subscription_id: str | None
    reason: str
    failure_code: str | None
    amount_remaining: int | None  # None: the event does not say (a subscription event)
    currency: str
    attempts: int | None
    next_payment_attempt: datetime | None

    @property
    def from_invoice(self) -> bool:
        """An invoice event's facts (a subscription event's carry no amount)."""
        return self.amount_remaining is not None


def invoice_facts(event_type: str, invoice: Mapping[str, Any]) -> InvoiceFacts:
    """The facts of an ``invoice.*`` event's invoice; ValueError on a shape it cannot read."""
    reason = (
        FAILED.get(event_type)
        or {
            "invoice.paid": "paid",
            "invoice.voided": "voided",
            "invoice.marked_uncollectible": "uncollectible",
        }[event_type]
    )
    amount = invoice["amount_remaining"]
    attempts = invoice.get("attempt_count", 0)
    if not isinstance(amount, int) or amount < 0 or not isinstance(attempts, int):
        raise ValueError(f"amount_remaining {amount!r} / attempt_count {attempts!r}")
    next_at = invoice.get("next_payment_attempt")
    subscription = invoice.get("subscription")
    return InvoiceFacts(
        invoice_id=_id(invoice["id"]),
        stripe_customer_id=_id(invoice["customer"]),
        subscription_id=_id(subscription) if subscription else None,
        reason=reason,
        failure_code=_failure_code(event_type, invoice) if event_type in FAILED else None,
        amount_remaining=0 if reason in FINAL else amount,
        currency=_currency(invoice.get("currency")),
        attempts=attempts,
        next_payment_attempt=datetime.fromtimestamp(next_at, UTC) if next_at else None,
    )


def subscription_facts(subscription: Mapping[str, Any]) -> InvoiceFacts | None:
    """A subscription now ``past_due`` or ``unpaid``: a failure of its latest invoice; None
    for any other status, or when it names no invoice (only an invoice event can close a
    failure: a row keyed otherwise would stay open for ever)."""
    status = subscription.get("status")
    latest = subscription.get("latest_invoice")
    if status not in ("past_due", "unpaid") or not latest:
        return None
    return InvoiceFacts(
        invoice_id=_id(latest),
        stripe_customer_id=_id(subscription["customer"]),
        subscription_id=_id(subscription["id"]),
        reason=str(status),
        failure_code=None,
        amount_remaining=None,
        currency=_currency(subscription.get("currency")),
        attempts=None,
        next_payment_attempt=None,
    )


def apply(
    connection: Connection, facts: InvoiceFacts, event_id: str, created: datetime, now: datetime
) -> Outcome:
    """Open, update or close the invoice's failure, inside the caller's transaction."""
    # Locked (PostgreSQL): a second processor acting on another event of this invoice waits,
    # then reads what this one wrote; without the lock it would overwrite it (a failure
    # reopening the payment it raced). SQLite has one writer at a time anyway.
    row = connection.execute(
        select(_p.state, _p.reason, _p.event_created)
        .where(_p.invoice_id == facts.invoice_id)
        .with_for_update()
    ).first()
    if row is not None and not _applies(facts, created, row.reason, row.event_created):
        return "stale"
    closes = facts.reason in FINAL
    values: dict[str, Any] = {"reason": facts.reason, "state": "closed" if closes else "open"}
    if facts.from_invoice:
        values.update(event_created=created, event_id=event_id, currency=facts.currency)
        values.update(
            amount_remaining=facts.amount_remaining,
            attempts=facts.attempts,
            next_payment_attempt=facts.next_payment_attempt,
        )
        if facts.failure_code is not None:
            values["failure_code"] = facts.failure_code
    if facts.subscription_id:
        values["subscription_id"] = facts.subscription_id
    if row is None:
        connection.execute(
            insert(payment_failures).values(
                invoice_id=facts.invoice_id,
                stripe_customer_id=facts.stripe_customer_id,
                customer_id=_application_customer(connection, facts.stripe_customer_id),
                opened_at=now,
                closed_at=now if closes else None,
                **{
                    "amount_remaining": 0,
                    "attempts": 0,
                    "event_created": NO_INVOICE_EVENT,
                    "event_id": event_id,
                    "currency": facts.currency,
                    **values,
                },
            )
        )
        return "applied"
    if closes:
        values["closed_at"] = now
    connection.execute(
        update(payment_failures).where(_p.invoice_id == facts.invoice_id).values(values)
    )
    return "applied"


def _applies(facts: InvoiceFacts, created: datetime, reason: str, applied: datetime) -> bool:
    """Whether an event changes a row: never once paid or void; a payment or a void always;
    else the newer (Stripe's times are whole seconds: in a tie, the first applied stays)."""
    if reason in FINAL:
        return False
    return facts.reason in FINAL or created > applied


def _application_customer(connection: Connection, stripe_customer_id: str) -> str | None:
    """The application's id linked to the Stripe customer (the lowest, if several are)."""
    found = connection.execute(
        select(func.min(customer_links.c.customer_id)).where(
            customer_links.c.stripe_customer_id == stripe_customer_id
        )
    ).scalar()
    return str(found) if found is not None else None


def _failure_code(event_type: str, invoice: Mapping[str, Any]) -> str:
    """The decline code of the invoice's latest payment when the event carries its payments
    expanded; else what the event type says."""
    payments = invoice.get("payments")
    data = payments.get("data") if isinstance(payments, Mapping) else None
    if isinstance(data, list) and data:
        payment = data[-1].get("payment") if isinstance(data[-1], Mapping) else None
        intent = payment.get("payment_intent") if isinstance(payment, Mapping) else None
        error = intent.get("last_payment_error") if isinstance(intent, Mapping) else None
        if isinstance(error, Mapping):
            code = error.get("decline_code") or error.get("code")
            if isinstance(code, str) and code:
                return code[:100]
    if event_type == "invoice.payment_action_required":
        return "authentication_required"
    return "unknown"


def _id(value: Any) -> str:
    """An id, or the id of an expanded object."""
    if isinstance(value, Mapping):
        value = value["id"]
    if not isinstance(value, str) or not 0 < len(value) <= 255:
        raise ValueError(f"expected a Stripe id, got {type(value).__name__}")
    return value


def _currency(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 3 or not value.isalpha():
        raise ValueError(f"expected a three-letter currency, got {value!r}")
    return value.lower()


@dataclass(frozen=True)
class OpenFailure:
    invoice_id: str
    customer_id: str | None
    stripe_customer_id: str
    reason: str
    failure_code: str | None
    amount_remaining: int
    currency: str
    attempts: int
    next_payment_attempt: datetime | None
    opened_at: datetime


def open_failures(connection: Connection, limit: int | None = None) -> list[OpenFailure]:
    """The open failures, oldest first (through payment_failures_by_state)."""
    query = (
        select(
            _p.invoice_id,
            _p.customer_id,
            _p.stripe_customer_id,
            _p.reason,
            _p.failure_code,
            _p.amount_remaining,
            _p.currency,
            _p.attempts,
            _p.next_payment_attempt,
            _p.opened_at,
        )
        .where(_p.state == "open")
        .order_by(_p.opened_at, _p.invoice_id)
    )
    if limit is not None:
        query = query.limit(limit)
    return [OpenFailure(**row._mapping) for row in connection.execute(query).all()]


def at_risk(connection: Connection) -> tuple[int, dict[str, int]]:
    """Open failures, and what they still owe per currency (minor units)."""
    found = connection.execute(
        select(_p.currency, func.count(), func.sum(_p.amount_remaining))
        .where(_p.state == "open")
        .group_by(_p.currency)
    ).all()
    return sum(int(n) for _, n, _ in found), {str(c): int(a or 0) for c, _, a in found}
