"""The usage event and its wire format (CloudEvents 1.0 structured JSON).

On Kafka an event is::

    {"specversion": "1.0", "id": "...", "source": "billing-api", "type": "<meter>",
     "subject": "<customer_id>", "time": "2026-11-24T10:00:00.123456Z",
     "datacontenttype": "application/json",
     "data": {"value": "12.5", "properties": {"region": "eu"}}}

The value travels as a decimal string, never a JSON float, so no cent is rounded on the wire.
Producers in other languages may write the topic too: :func:`decode_event` checks everything.
The rules of each field live in meterstream/event_checks.py; this module names them too, so
``from meterstream.events import check_value`` keeps working.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from meterstream.errors import InvalidEventError
from meterstream.event_checks import (
    CONTROL_CHARACTERS,
    DEFAULT_FUTURE_TOLERANCE_S,
    MAX_CUSTOMER_CHARS,
    MAX_EVENT_BYTES,
    MAX_FRACTION_DIGITS,
    MAX_ID_CHARS,
    MAX_PROPERTIES,
    MAX_PROPERTY_KEY_CHARS,
    MAX_PROPERTY_VALUE_CHARS,
    MAX_VALUE,
    PLAIN_DECIMAL,
    STRIPE_MAX_UNITS,
    check_customer,
    check_event_id,
    check_event_size,
    check_event_time,
    check_meter,
    check_not_ahead,
    check_properties,
    check_stripe_digits,
    check_value,
    plain_int,
)
from meterstream.meters import Catalogue

__all__ = [
    "DEFAULT_FUTURE_TOLERANCE_S",
    "MAX_CUSTOMER_CHARS",
    "MAX_EVENT_BYTES",
    "MAX_FRACTION_DIGITS",
    "MAX_ID_CHARS",
    "MAX_PROPERTIES",
    "MAX_PROPERTY_KEY_CHARS",
    "MAX_PROPERTY_VALUE_CHARS",
    "MAX_VALUE",
    "SPECVERSION",
    "STRIPE_MAX_UNITS",
    "UsageEvent",
    "check_customer",
    "check_event_id",
    "check_event_size",
    "check_event_time",
    "check_meter",
    "check_not_ahead",
    "check_properties",
    "check_stripe_digits",
    "check_value",
    "decode_document",
    "decode_event",
    "dedup_key",
    "encode_event",
    "encode_fields",
    "event_from_document",
    "format_value",
    "parse_json_time",
    "parse_json_value",
]

SPECVERSION = "1.0"


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One usage event. ``(source, event_id, customer_id, meter)`` is its deduplication key."""

    event_id: str
    source: str
    customer_id: str
    meter: str
    value: Decimal
    event_time: datetime
    properties: Mapping[str, str] = field(default_factory=dict)
    # The event's whole ``data`` object as decoded: a meter's value_property and dimensions may
    # name its fields (events shaped by other systems, such as OpenMeter's).
    data: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def dedup_key(self) -> bytes:
        return dedup_key(self.source, self.event_id, self.customer_id, self.meter)


def dedup_key(source: str, event_id: str, customer_id: str, meter: str) -> bytes:
    """A compact 16-byte key for ``(source, event_id, customer_id, meter)``: what the aggregators
    store per event. One request id recorded for two meters, or an order number that repeats
    across customers, is two events; a re-send keeps all four, so it still counts once."""
    # NUL separates the parts: none of them may contain one (check_event_id, check_customer).
    joined = "\x00".join((source, event_id, customer_id, meter))
    return hashlib.blake2b(joined.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def format_value(value: Decimal | int) -> str:
    """A plain decimal string (never exponent notation) for the wire and for Stripe."""
    return str(value) if type(value) is int else format(value, "f")


def encode_event(event: UsageEvent) -> bytes:
    """The CloudEvents structured JSON of ``event`` (the Kafka message value)."""
    return encode_fields(
        event.event_id,
        event.source,
        event.customer_id,
        event.meter,
        event.value,
        event.event_time.astimezone(UTC),
        event.properties,
    )


def encode_fields(
    event_id: str,
    source: str,
    customer_id: str,
    meter: str,
    value: Decimal | int,
    event_time: datetime,
    properties: Mapping[str, str],
    value_key: str = "value",
) -> bytes:
    """Like :func:`encode_event` without building a UsageEvent first (the SDK's hot path).

    ``event_time`` must be in UTC (orjson writes it as RFC 3339 with a ``Z``). ``value_key`` is
    the meter's :attr:`~meterstream.meters.Meter.value_key`, where the aggregators read it.
    """
    return orjson.dumps(
        {
            "specversion": SPECVERSION,
            "id": event_id,
            "source": source,
            "type": meter,
            "subject": customer_id,
            "time": event_time,
            "datacontenttype": "application/json",
            "data": {value_key: format_value(value), "properties": properties},
        },
        option=orjson.OPT_UTC_Z,
    )


def decode_event(raw: bytes, catalogue: Catalogue | None = None) -> UsageEvent:
    """Parse one structured-mode message value. Raises InvalidEventError naming the field.

    This checks the structure only; the catalogue and the horizon are the reader's business,
    but for where the value is: ``data.value``, or the field the event's meter in ``catalogue``
    names as its ``value_property``.
    """
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEventError("message", f"not JSON: {exc}") from None
    return decode_document(doc, catalogue)


def decode_document(doc: Any, catalogue: Catalogue | None = None) -> UsageEvent:
    """Like :func:`decode_event` for a document already parsed from JSON (one element of a
    CloudEvents batch, or the attributes of a binary-mode event with its data)."""
    if not isinstance(doc, dict):
        raise InvalidEventError("message", "expected a CloudEvents JSON object")
    return event_from_document(doc, catalogue=catalogue)


def event_from_document(
    doc: dict[str, Any], field_prefix: str = "", catalogue: Catalogue | None = None
) -> UsageEvent:
    """The event of a CloudEvents document: the structured JSON, or binary mode's headers
    with its data (meterstream/content_modes.py). One set of rules for both; errors name the
    attribute with ``field_prefix`` (``ce_`` for a header)."""
    if doc.get("specversion") != SPECVERSION:
        raise InvalidEventError(
            f"{field_prefix}specversion", f"expected '1.0', got {doc.get('specversion')!r:.40}"
        )
    data = doc.get("data")
    if not isinstance(data, dict):
        raise InvalidEventError("data", "expected an object with 'value' and 'properties'")
    properties = data.get("properties") or {}
    if not isinstance(properties, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and not CONTROL_CHARACTERS.search(k + v)
        for k, v in properties.items()
    ):
        raise InvalidEventError(
            "data.properties", "must be an object of strings without control characters"
        )
    meter = _decode_meter(doc.get("type"), f"{field_prefix}type")
    found = catalogue.get(meter) if catalogue is not None else None
    value_key = found.value_key if found is not None else "value"
    return UsageEvent(
        event_id=check_event_id(doc.get("id"), f"{field_prefix}id"),
        source=check_event_id(doc.get("source"), f"{field_prefix}source"),
        customer_id=check_customer(doc.get("subject")),
        meter=meter,
        value=_decode_value(data.get(value_key), f"data.{value_key}"),
        event_time=_parse_time(doc.get("time"), f"{field_prefix}time"),
        properties=properties,
        data=data,
    )


def _decode_meter(meter: Any, field_name: str) -> str:
    if not isinstance(meter, str) or not 0 < len(meter) <= 100 or CONTROL_CHARACTERS.search(meter):
        raise InvalidEventError(
            field_name, f"must be a meter name of 1 to 100 characters: {meter!r:.60}"
        )
    return meter


def _decode_value(raw: Any, field_name: str) -> Decimal:
    # A missing value is an error, never 1: a producer writing {"amount": ...} would otherwise be
    # billed one unit per event in silence.
    if raw is None:
        raise InvalidEventError(field_name, "missing; send the value as a decimal string")
    if isinstance(raw, float):
        raise InvalidEventError(
            field_name,
            f"a JSON float ({raw!r:.40}) is not exact; send a decimal string (or an integer "
            "below 2**63)",
        )
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise InvalidEventError(field_name, f"must be a decimal string, got {raw!r:.40}")
    if isinstance(raw, str) and not PLAIN_DECIMAL.match(raw):
        raise InvalidEventError(field_name, f"not a plain decimal number: {raw!r:.40}")
    return Decimal(raw)


def _parse_time(raw: Any, field_name: str) -> datetime:
    if not isinstance(raw, str):
        raise InvalidEventError(field_name, "must be an RFC 3339 timestamp")
    try:
        # RFC 3339 allows a lowercase t and z; fromisoformat does not.
        parsed = datetime.fromisoformat(raw.upper())
    except ValueError:
        raise InvalidEventError(field_name, f"not an RFC 3339 timestamp: {raw!r:.40}") from None
    if parsed.tzinfo is None:
        raise InvalidEventError(field_name, f"must carry a UTC offset: {raw!r:.40}")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T00:00:00+14:00 and 9999-12-31T23:59:59-14:00 have no UTC datetime.
        raise InvalidEventError(field_name, f"out of range in UTC: {raw!r:.40}") from None


def parse_json_value(raw: Any, field_name: str = "data.value") -> Decimal | int:
    """The value of a JSON event as the workers read it: a decimal string or an integer, never
    a float or a missing value. Raises InvalidEventError on ``field_name``.

    An integer, or a string of up to 18 digits, comes back as an int: the number the workers'
    Decimal holds, without building it (the HTTP API's common case)."""
    if type(raw) is int:
        return raw
    if type(raw) is str:
        whole = plain_int(raw)
        if whole is not None:
            return whole
    return _decode_value(raw, field_name)


def parse_json_time(raw: Any) -> datetime:
    """``time`` of a JSON event as the workers read it (RFC 3339 with an offset), in UTC.
    Raises InvalidEventError on ``time``."""
    return _parse_time(raw, "time")
