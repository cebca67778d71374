"""Usage Stripe accepted but may never invoice: meter events that reached Stripe late.

Stripe bills a billing period's usage when the period ends, after a one-hour grace for meter
events (its default); usage that arrives later, timestamped inside the period, is accepted and
counted in the summaries (so reconcile calls it fine) but is on no invoice. The reporter cannot
see billing periods through the meter API, and subscriptions may be anchored at any second, on
daily to yearly intervals. So the rule takes no setting and assumes the worst: a meter event
acknowledged more than INVOICE_GRACE after its timestamp may have missed an invoice, because a
period could have ended between the two. Within the grace, no period end can have been invoiced
before the event arrived, so everything else is certainly on time.

Late events (older than their window's newest), late customer links and backlogs after an
outage are what produce such rows. Only rows acknowledged within the horizon are counted: the
metric and status stay about recent sending.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select, text

from meterstream.schema import SENT_LATE, ledger
from reporters.ledger import ACKNOWLEDGED

# SENT_LATE (meterstream/schema.py, the partial index ledger_sent_late) spells the same hour.
INVOICE_GRACE = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class PossiblyInvoiced:
    """Per customer and meter: rows that reached Stripe late, their Stripe units, and the
    oldest and newest timestamp among them (the billing periods to check)."""

    customer_id: str
    stripe_customer_id: str
    meter: str
    rows: int
    units: int
    oldest: datetime
    newest: datetime


def possibly_invoiced(engine: Engine, now: datetime, horizon_days: int) -> list[PossiblyInvoiced]:
    """Acknowledged rows sent in the last ``horizon_days`` more than INVOICE_GRACE after their
    timestamp, grouped per (customer, Stripe customer, meter)."""
    c = ledger.c
    query: Any = (
        select(
            c.customer_id,
            c.stripe_customer_id,
            c.meter,
            func.count(),
            func.sum(c.value),
            func.min(c.timestamp),
            func.max(c.timestamp),
        )
        .where(
            c.status.in_(ACKNOWLEDGED),
            c.sent_at.is_not(None),
            c.sent_at >= now - timedelta(days=horizon_days),
            # This very predicate lets the database read the partial index ledger_sent_late
            # (the few rows sent late), not the ledger's history.
            text(SENT_LATE[engine.dialect.name]),
        )
        .group_by(c.customer_id, c.stripe_customer_id, c.meter)
        .order_by(c.customer_id, c.meter)
    )
    with engine.connect() as connection:
        found = connection.execute(query).all()
    return [
        PossiblyInvoiced(customer, stripe_customer, meter, int(rows), int(units), oldest, newest)
        for customer, stripe_customer, meter, rows, units, oldest, newest in found
    ]
