"""Stripe's usage-threshold alerts (``billing.alert.triggered``), counted per alert and
customer in ``billing_alert_counts``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from meterstream.schema import billing_alert_counts, customer_links

_a = billing_alert_counts.c


@dataclass(frozen=True)
class TriggeredAlert:
    alert_id: str
    stripe_customer_id: str
    value: Decimal | None


def triggered_alert(obj: Mapping[str, Any]) -> TriggeredAlert:
    """The alert and customer of a ``billing.alert_triggered`` object; ValueError/KeyError on
    a shape it cannot read."""
    alert = obj["alert"]
    alert_id = alert["id"] if isinstance(alert, Mapping) else alert
    customer = obj["customer"]
    value = obj.get("value")
    if not isinstance(alert_id, str) or not isinstance(customer, str):
        raise ValueError("alert and customer must be ids")
    if isinstance(value, float):
        raise ValueError("value must be an exact number")
    return TriggeredAlert(
        alert_id[:255], customer[:255], Decimal(str(value)) if value is not None else None
    )


def count_alert(connection: Connection, alert: TriggeredAlert, now: datetime) -> None:
    """Add one to the alert's count for its customer, inside the caller's transaction."""
    key = (_a.alert_id == alert.alert_id, _a.stripe_customer_id == alert.stripe_customer_id)
    done = connection.execute(
        update(billing_alert_counts)
        .where(*key)
        .values(triggered=_a.triggered + 1, last_value=alert.value, last_triggered_at=now)
    )
    if done.rowcount:
        return
    customer_id = connection.execute(
        select(func.min(customer_links.c.customer_id)).where(
            customer_links.c.stripe_customer_id == alert.stripe_customer_id
        )
    ).scalar()
    connection.execute(
        insert(billing_alert_counts).values(
            alert_id=alert.alert_id,
            stripe_customer_id=alert.stripe_customer_id,
            customer_id=customer_id,
            triggered=1,
            last_value=alert.value,
            last_triggered_at=now,
        )
    )
