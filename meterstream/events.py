"""The usage event, its rules, and its wire format (CloudEvents 1.0 structured JSON).

On Kafka an event is::

    {"specversion": "1.0", "id": "...", "source": "billing-api", "type": "<meter>",
     "subject": "<customer_id>", "time": "2026-11-24T10:00:00.123456Z",
     "datacontenttype": "application/json",
     "data": {"value": "12.5", "properties": {"region": "eu"}}}

The value travels as a decimal string, never a JSON float, so no cent is rounded on the wire.
Producers in other languages may write the topic too: :func:`decode_event` checks everything.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, InvalidOperation
from typing import Any

import orjson

from meterstream.errors import InvalidEventError
from meterstream.horizon import accepted_age_text, oldest_accepted
from meterstream.meters import Catalogue, Meter

SPECVERSION = "1.0"
MAX_EVENT_BYTES = 64 * 1024
MAX_ID_CHARS = 200
MAX_CUSTOMER_CHARS = 200
MAX_PROPERTIES = 100
MAX_PROPERTY_KEY_CHARS = 64
MAX_PROPERTY_VALUE_CHARS = 1024
# Values are bounded so every total fits NUMERIC comfortably and Stripe's 15 digits after scaling.
MAX_VALUE = Decimal(10) ** 18
MAX_FRACTION_DIGITS = 12
_MAX_INT = 10**18
# Stripe refuses meter event values of more than 15 significant digits; the reporter sends whole
# units (value * unit_scale), so one event's units must stay below this.
STRIPE_MAX_UNITS = Decimal(10) ** 15
# Wide enough that value * unit_scale is never rounded before it is compared.
_WIDE = Context(prec=100)
_ZERO = Decimal(0)
_PLAIN_DECIMAL = re.compile(r"^[+-]?[0-9]+(\.[0-9]+)?\Z")
# Control characters (NUL above all) cannot be stored in PostgreSQL text and mean a bug upstream.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# How far ahead of the checking host's clock an event time may be (METERSTREAM_FUTURE_TOLERANCE_S):
# the SDK and the workers apply the same rule, each with its own clock. The reporter never sends
# Stripe a timestamp after its own clock, so Stripe's 5 minutes are kept whatever this is.
DEFAULT_FUTURE_TOLERANCE_S = 600.0


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


def check_event_size(payload: bytes, header_bytes: int = 0) -> None:
    """The one size rule of an encoded event (its value and any headers), for the SDK and the
    aggregators alike."""
    size = len(payload) + header_bytes
    if size > MAX_EVENT_BYTES:
        raise InvalidEventError(
            "event", f"encodes to {size} bytes; at most {MAX_EVENT_BYTES} allowed"
        )


def check_event_id(event_id: Any, field_name: str = "event_id") -> str:
    if not isinstance(event_id, str) or not event_id or len(event_id) > MAX_ID_CHARS:
        raise InvalidEventError(
            field_name, f"must be a string of 1 to {MAX_ID_CHARS} characters, got {event_id!r:.80}"
        )
    _check_printable(field_name, event_id)
    return event_id


def _check_printable(field_name: str, text: str) -> None:
    # isprintable() is False for every control character (and for a few harmless ones, which
    # the search then clears): the common case costs no regular expression.
    if not text.isprintable() and _CONTROL.search(text):
        raise InvalidEventError(
            field_name, f"must not contain control characters (such as NUL), got {text!r:.80}"
        )


def check_customer(customer_id: Any) -> str:
    if not isinstance(customer_id, str) or not customer_id.strip():
        raise InvalidEventError("customer", f"must be a non-empty string, got {customer_id!r:.80}")
    if len(customer_id) > MAX_CUSTOMER_CHARS:
        raise InvalidEventError(
            "customer", f"must be at most {MAX_CUSTOMER_CHARS} characters, got {len(customer_id)}"
        )
    _check_printable("customer", customer_id)
    return customer_id


def check_meter(meter: Any, catalogue: Catalogue) -> Meter:
    found = catalogue.get(meter) if isinstance(meter, str) else None
    if found is None:
        known = ", ".join(sorted(catalogue.meters))
        raise InvalidEventError("meter", f"unknown meter {meter!r:.80}; known meters: {known}")
    return found


def check_value(value: Any, meter: Meter) -> Decimal | int:
    """The value, exact (an int stays an int), or InvalidEventError naming the rule it breaks."""
    if type(value) is int:  # the common case, checked cheaply (bool is not int here)
        if value < 0 and not meter.allow_negative:
            raise InvalidEventError(
                "value",
                f"must be >= 0 for meter {meter.name!r} (allow_negative = false), got {value}",
            )
        if not -_MAX_INT < value < _MAX_INT:
            raise InvalidEventError("value", f"must be below 1e18 in magnitude, got {value}")
        return value
    if isinstance(value, bool | float):
        # A float cannot hold 0.1 exactly; the caller must choose the exact value.
        raise InvalidEventError(
            "value", f"must be a Decimal, an int or a decimal string, got {type(value).__name__}"
        )
    if isinstance(value, str):
        whole = _plain_int(value)
        if whole is not None:
            return check_value(whole, meter)
        if not _PLAIN_DECIMAL.match(value):
            raise InvalidEventError(
                "value", f"not a plain decimal number like '12.5': {value!r:.80}"
            )
    try:
        exact = value if isinstance(value, Decimal) else Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        raise InvalidEventError("value", f"not a decimal number: {value!r:.80}") from None
    return _check_exact(exact, meter)


def _plain_int(text: str) -> int | None:
    """The int a string of up to 18 ASCII digits spells, else None (then it is read as a
    Decimal): the same number, read without a Decimal and its checks, and written the same
    (str(int) and format(Decimal, 'f') agree on every such number, leading zeros dropped)."""
    if len(text) <= 18 and text.isdigit() and text.isascii():
        return int(text)
    return None


def _check_exact(exact: Decimal, meter: Meter) -> Decimal:
    # Only exact operations here (no abs(), no normalize()): they would round to the context's
    # 28 digits, and values may have 30.
    if not exact.is_finite():
        raise InvalidEventError("value", f"must be a finite number, got {exact}")
    if exact.is_zero():
        return _ZERO  # also turns -0 into 0
    if exact.is_signed() and not meter.allow_negative:
        raise InvalidEventError(
            "value", f"must be >= 0 for meter {meter.name!r} (allow_negative = false), got {exact}"
        )
    if exact.adjusted() >= 18:
        raise InvalidEventError("value", f"must be below 1e18 in magnitude, got {exact}")
    if _fraction_digits(exact) > MAX_FRACTION_DIGITS:
        raise InvalidEventError(
            "value", f"at most {MAX_FRACTION_DIGITS} digits after the point, got {exact}"
        )
    return exact


def check_stripe_digits(value: Decimal | int, meter: Meter) -> None:
    """Refuse a value whose Stripe units (value * unit_scale) have more than 15 digits: Stripe
    would refuse every report of its window. Raises InvalidEventError on ``value``."""
    if _WIDE.multiply(abs(Decimal(value)), meter.unit_scale) >= STRIPE_MAX_UNITS:
        raise InvalidEventError(
            "value",
            f"{value} times unit_scale {meter.unit_scale} of meter {meter.name!r} is 1e15 "
            "Stripe units or more; Stripe takes at most 15 digits: record it in parts",
        )


def _fraction_digits(exact: Decimal) -> int:
    """Significant digits after the point (trailing zeros, as in 0.100000000000000, are not)."""
    _sign, digits, exponent = exact.as_tuple()
    if not isinstance(exponent, int):  # NaN and infinities are refused before this
        return 0
    if exponent >= -MAX_FRACTION_DIGITS:
        return -exponent if exponent < 0 else 0  # the common case: no need to strip zeros
    trailing = len(digits) - len("".join(map(str, digits)).rstrip("0"))
    return max(0, -(exponent + trailing))


def check_event_time(
    event_time: Any,
    *,
    now: datetime,
    horizon_days: int,
    future_tolerance_s: float = DEFAULT_FUTURE_TOLERANCE_S,
    field_name: str = "timestamp",
) -> datetime:
    """The event time in UTC; refused when naive, more than ``future_tolerance_s`` ahead of
    ``now``, or past Stripe's horizon."""
    if not isinstance(event_time, datetime):
        raise InvalidEventError(field_name, f"must be a datetime, got {type(event_time).__name__}")
    if event_time.tzinfo is None or event_time.utcoffset() is None:
        raise InvalidEventError(field_name, "must be timezone-aware (e.g. datetime.now(UTC))")
    try:
        utc = event_time.astimezone(UTC)
    except OverflowError:
        raise InvalidEventError(field_name, f"{event_time!r} is out of range in UTC") from None
    check_not_ahead(utc, now=now, future_tolerance_s=future_tolerance_s, field_name=field_name)
    if utc < oldest_accepted(now, horizon_days):
        raise InvalidEventError(
            field_name,
            f"{utc.isoformat()} is older than {accepted_age_text(horizon_days)}; Stripe "
            "would refuse it before it could be reported",
        )
    return utc


def check_not_ahead(
    event_time: datetime, *, now: datetime, future_tolerance_s: float, field_name: str
) -> None:
    """The one rule for event times ahead of the clock, in the SDK and in the workers alike:
    at most ``future_tolerance_s`` (METERSTREAM_FUTURE_TOLERANCE_S) ahead of ``now``, the
    checking host's clock. Raises InvalidEventError."""
    if event_time > now + timedelta(seconds=future_tolerance_s):
        raise InvalidEventError(
            field_name,
            f"{event_time.isoformat()} is more than {future_tolerance_s:g} s ahead of now "
            f"({now.isoformat()}); METERSTREAM_FUTURE_TOLERANCE_S sets how far; check the "
            "clock of the host that recorded it",
        )


def check_properties(properties: Any, meter: Meter) -> dict[str, str]:
    if properties is None:
        properties = {}
    if type(properties) is dict and _plain_properties(properties, meter):
        return dict(properties)
    if not isinstance(properties, Mapping):
        raise InvalidEventError(
            "properties", f"must be a mapping of str to str, got {properties!r:.80}"
        )
    if len(properties) > MAX_PROPERTIES:
        raise InvalidEventError(
            "properties", f"at most {MAX_PROPERTIES} entries, got {len(properties)}"
        )
    for key, value in properties.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_PROPERTY_KEY_CHARS:
            raise InvalidEventError(
                "properties",
                f"keys must be strings of 1 to {MAX_PROPERTY_KEY_CHARS} characters, "
                f"got {key!r:.80}",
            )
        if not isinstance(value, str) or len(value) > MAX_PROPERTY_VALUE_CHARS:
            raise InvalidEventError(
                f"properties.{key}",
                f"must be a string of at most {MAX_PROPERTY_VALUE_CHARS} characters, "
                f"got {value!r:.80}",
            )
        _check_printable(f"properties.{key}", key + value)
    if meter.unique_property is not None and not properties.get(meter.unique_property):
        raise InvalidEventError(
            f"properties.{meter.unique_property}",
            f"meter {meter.name!r} counts distinct values of this property; it is missing",
        )
    return dict(properties)


def _plain_properties(properties: dict[Any, Any], meter: Meter) -> bool:
    """Whether ``properties`` pass check_properties' rules at first sight (a cheap test of the
    common case; False hands them to the full checks, which decide)."""
    if len(properties) > MAX_PROPERTIES:
        return False
    for key, value in properties.items():
        if not (
            type(key) is str
            and type(value) is str
            and 0 < len(key) <= MAX_PROPERTY_KEY_CHARS
            and len(value) <= MAX_PROPERTY_VALUE_CHARS
            and key.isprintable()
            and value.isprintable()
        ):
            return False
    return meter.unique_property is None or bool(properties.get(meter.unique_property))


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
        isinstance(k, str) and isinstance(v, str) and not _CONTROL.search(k + v)
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
    if not isinstance(meter, str) or not 0 < len(meter) <= 100 or _CONTROL.search(meter):
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
    if isinstance(raw, str) and not _PLAIN_DECIMAL.match(raw):
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
        whole = _plain_int(raw)
        if whole is not None:
            return whole
    return _decode_value(raw, field_name)


def parse_json_time(raw: Any) -> datetime:
    """``time`` of a JSON event as the workers read it (RFC 3339 with an offset), in UTC.
    Raises InvalidEventError on ``time``."""
    return _parse_time(raw, "time")
