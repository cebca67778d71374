"""From a Kafka message to an event the totals can take, or a rejection with its reason.

Producers in other languages write the topic too, so every rule the SDK applies is applied again
here, and so is every limit of what the database and Stripe can hold. A rejection is never
dropped: the caller sends it to the dead-letter topic and the ``rejected_events`` table.

:func:`admit` never raises: whatever one message does to the decoder (a bug of ours included)
becomes that message's rejection, so no message can stop the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal

from meterstream.content_modes import Headers, decode_message
from meterstream.dimensions import NO_COMBINATION, combination_key, read_combination
from meterstream.errors import HeaderError, InvalidEventError, MissingDimensionError
from meterstream.events import (
    UsageEvent,
    check_event_size,
    check_not_ahead,
    check_properties,
    check_stripe_digits,
    check_value,
)
from meterstream.horizon import accepted_age_text, oldest_accepted
from meterstream.meters import Catalogue, Meter

RejectReason = Literal[
    "unparseable",
    "unknown_meter",
    "beyond_horizon",
    "in_future",
    "invalid_value",
    "invalid_event",
    "beyond_stripe_digits",
    "unstorable",
    "undecodable",
    "too_large",
    "invalid_headers",
    "missing_dimension",
    "too_many_combinations",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Kafka timestamps beyond this (year 9000) are nonsense (say, microseconds written where
# milliseconds belong); they are ignored rather than turned into a datetime that overflows.
_MAX_KAFKA_S = 220_000_000_000.0


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
    # The canonical key of the event's dimension values (meterstream.dimensions); '' for none.
    combination: str = NO_COMBINATION


@dataclass(frozen=True, slots=True)
class Clock:
    """The rules of time at admission: the worker's clock, how far ahead of it an event time
    may be (``future_tolerance_s``, as in the SDK), and Stripe's horizon in days."""

    now: datetime
    future_tolerance_s: float
    horizon_days: int


def produced_at(timestamp_s: float) -> datetime | None:
    """The Kafka timestamp (seconds since the epoch) as a UTC datetime; None when absent (0 or
    less), not a number, or too far ahead to be a real time. Never raises."""
    if not 0.0 < timestamp_s < _MAX_KAFKA_S:  # also False for NaN
        return None
    return _EPOCH + timedelta(seconds=timestamp_s)


def admit(
    raw: bytes | None,
    catalogue: Catalogue,
    *,
    clock: Clock,
    produced: datetime | None,
    headers: Headers = (),
) -> Accepted | Rejection:
    """Decode ``raw`` (with its Kafka ``headers``: either CloudEvents content mode,
    meterstream/content_modes.py) and check it against the catalogue, the clock and the
    storage limits.

    Never raises: an unexpected error is the message's rejection (``undecodable``).

    The horizon is the SDK's rule (meterstream/horizon.py), measured from the Kafka timestamp
    (when the SDK accepted the event), so an event the SDK accepted is not refused because the
    workers were behind.
    """
    try:
        return _admit(raw, headers, catalogue, clock, produced)
    except Exception as exc:
        # A bug of ours that one message reaches must not stop the worker: park the message.
        return Rejection("undecodable", f"{type(exc).__name__}: {exc}"[:2000])


def _admit(
    raw: bytes | None,
    headers: Headers,
    catalogue: Catalogue,
    clock: Clock,
    produced: datetime | None,
) -> Accepted | Rejection:
    if raw is None:
        return Rejection("unparseable", "message has no value (a tombstone?)")
    try:
        # The SDK's limit: what is larger did not come from it, and would cost the worker
        # memory and the dead-letter topic more than its producer limit. Binary mode carries
        # the attributes in headers: they count too.
        check_event_size(raw, header_bytes(headers))
    except InvalidEventError as exc:
        return Rejection("too_large", str(exc))
    try:
        event = decode_message(raw, headers, catalogue)
    except HeaderError as exc:
        return Rejection("invalid_headers", str(exc))
    except InvalidEventError as exc:
        return Rejection("unparseable", str(exc))
    known = {"event_id": event.event_id, "customer_id": event.customer_id, "meter": event.meter}
    meter = catalogue.get(event.meter)
    if meter is None:
        return Rejection(
            "unknown_meter", f"type: no meter {event.meter!r} in the catalogue", **known
        )
    rejection = _check_time(event.event_time, clock, produced)
    if rejection is not None:
        return Rejection(rejection[0], rejection[1], **known)
    try:
        check_value(event.value, meter)
        check_properties(event.properties, meter)
    except InvalidEventError as exc:
        reason: RejectReason = "invalid_value" if exc.field == "value" else "invalid_event"
        return Rejection(reason, f"data.{exc}", **known)
    try:
        check_stripe_digits(event.value, meter)
    except InvalidEventError as exc:
        return Rejection("beyond_stripe_digits", f"data.{exc}", **known)
    if not meter.dimensions:
        return Accepted(event, meter)
    try:
        combination = combination_key(read_combination(meter, event.properties, event.data))
    except InvalidEventError as exc:
        reason = "missing_dimension" if isinstance(exc, MissingDimensionError) else "invalid_event"
        return Rejection(reason, f"data.{exc}", **known)
    return Accepted(event, meter, combination)


def _check_time(
    event_time: datetime, clock: Clock, produced: datetime | None
) -> tuple[RejectReason, str] | None:
    """The time rules: not more than the tolerance ahead of the worker's clock (the SDK checks
    against its host's clock the same way), and within the horizon measured from when the
    event was produced (the Kafka timestamp, when it is not ahead of the worker's clock), so
    an event the SDK accepted is not refused because the workers were behind."""
    now = clock.now
    try:
        check_not_ahead(
            event_time, now=now, future_tolerance_s=clock.future_tolerance_s, field_name="time"
        )
    except InvalidEventError as exc:
        return "in_future", str(exc)
    reference = min(produced, now) if produced is not None else now
    if event_time < oldest_accepted(reference, clock.horizon_days):
        return "beyond_horizon", (
            f"time: {event_time.isoformat()} is older than "
            f"{accepted_age_text(clock.horizon_days)}; Stripe would refuse it before it could "
            "be reported"
        )
    # Separately, an event older than the deduplication keys kept (horizon + 1 day before now)
    # is refused, since it could no longer be told apart from a re-send.
    if event_time.date() < dedup_floor(now, clock.horizon_days):
        return "beyond_horizon", (
            f"time: {event_time.isoformat()} arrived after its deduplication keys are "
            f"kept ({clock.horizon_days} days + 1); it can no longer be counted exactly once"
        )
    return None


def header_bytes(headers: Headers) -> int:
    """The bytes the headers of a message take (names and values)."""
    return sum(
        len(name.encode("utf-8", "surrogatepass")) + len(value or b"") for name, value in headers
    )


def dedup_floor(now: datetime, horizon_days: int) -> date:
    """The oldest event day whose deduplication keys are certainly still kept."""
    return now.date() - timedelta(days=horizon_days)
