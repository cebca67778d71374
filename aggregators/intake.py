"""From a Kafka message to an event the totals can take, or a rejection with its reason.

Producers in other languages write the topic too, so every rule the SDK applies is applied again
here. A rejection is never dropped: the caller sends it to the dead-letter topic and the
``rejected_events`` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from meterstream.errors import InvalidEventError
from meterstream.events import (
    UsageEvent,
    check_event_time,
    check_properties,
    check_value,
    decode_event,
)
from meterstream.meters import Catalogue, Meter

RejectReason = Literal[
    "unparseable", "unknown_meter", "beyond_horizon", "in_future", "invalid_value", "invalid_event"
]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message cannot be applied, and what is known of it."""

    reason: RejectReason
    detail: str
    event_id: str | None = None
    customer_id: str | None = None
    meter: str | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    event: UsageEvent
    meter: Meter


def admit(
    raw: bytes | None, catalogue: Catalogue, *, now: datetime, horizon_days: int
) -> Accepted | Rejection:
    """Decode ``raw`` and check it against the catalogue and Stripe's time horizon."""
    if raw is None:
        return Rejection("unparseable", "message has no value (a tombstone?)")
    try:
        event = decode_event(raw)
    except InvalidEventError as exc:
        return Rejection("unparseable", str(exc))
    known = dict(event_id=event.event_id, customer_id=event.customer_id, meter=event.meter)
    meter = catalogue.get(event.meter)
    if meter is None:
        return Rejection(
            "unknown_meter", f"type: no meter {event.meter!r} in the catalogue", **known
        )
    try:
        check_event_time(event.event_time, now=now, horizon_days=horizon_days, field_name="time")
    except InvalidEventError as exc:
        reason: RejectReason = "in_future" if "ahead" in exc.reason else "beyond_horizon"
        return Rejection(reason, str(exc), **known)
    try:
        check_value(event.value, meter)
        check_properties(event.properties, meter)
    except InvalidEventError as exc:
        reason = "invalid_value" if exc.field == "value" else "invalid_event"
        return Rejection(reason, f"data.{exc}", **known)
    return Accepted(event, meter)
