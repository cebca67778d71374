"""From a Kafka message to an event the totals can take, or a rejection with its reason.

Producers in other languages write the topic too, so every rule the SDK applies is applied again
here. A rejection is never dropped: the caller sends it to the dead-letter topic and the
``rejected_events`` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
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
    "unparseable",
    "unknown_meter",
    "beyond_horizon",
    "in_future",
    "invalid_value",
    "invalid_event",
    "unstorable",
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
    raw: bytes | None,
    catalogue: Catalogue,
    *,
    now: datetime,
    produced_at: datetime | None,
    horizon_days: int,
) -> Accepted | Rejection:
    """Decode ``raw`` and check it against the catalogue and Stripe's time horizon.

    The horizon (the SDK's rule, meterstream/horizon.py) and the 5-minute limit are measured
    from ``produced_at`` (the Kafka timestamp: when the SDK accepted it), so an event the SDK
    accepted is not refused because the workers were behind. Separately, an event older than
    the deduplication keys kept (horizon + 1 day before ``now``) is refused, since it could no
    longer be told apart from a re-send.
    """
    if raw is None:
        return Rejection("unparseable", "message has no value (a tombstone?)")
    try:
        event = decode_event(raw)
    except InvalidEventError as exc:
        return Rejection("unparseable", str(exc))
    known = {"event_id": event.event_id, "customer_id": event.customer_id, "meter": event.meter}
    meter = catalogue.get(event.meter)
    if meter is None:
        return Rejection(
            "unknown_meter", f"type: no meter {event.meter!r} in the catalogue", **known
        )
    reference = produced_at if produced_at is not None and produced_at <= now else now
    try:
        check_event_time(
            event.event_time, now=reference, horizon_days=horizon_days, field_name="time"
        )
    except InvalidEventError as exc:
        reason: RejectReason = "in_future" if "ahead" in exc.reason else "beyond_horizon"
        return Rejection(reason, str(exc), **known)
    if event.event_time.date() < dedup_floor(now, horizon_days):
        return Rejection(
            "beyond_horizon",
            f"time: {event.event_time.isoformat()} arrived after its deduplication keys are "
            f"kept ({horizon_days} days + 1); it can no longer be counted exactly once",
            **known,
        )
    try:
        check_value(event.value, meter)
        check_properties(event.properties, meter)
    except InvalidEventError as exc:
        reason = "invalid_value" if exc.field == "value" else "invalid_event"
        return Rejection(reason, f"data.{exc}", **known)
    return Accepted(event, meter)


def dedup_floor(now: datetime, horizon_days: int) -> date:
    """The oldest event day whose deduplication keys are certainly still kept."""
    return now.date() - timedelta(days=horizon_days)
