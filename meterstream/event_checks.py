"""The checks of a usage event's fields: one set of rules for the SDK, the HTTP API and the
aggregators, each raising InvalidEventError that names the field and the reason.

meterstream.events holds the event and its wire format, and names these too (its ``__all__``),
so ``from meterstream.events import check_value`` keeps working.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, InvalidOperation
from typing import Any

from meterstream.errors import InvalidEventError
from meterstream.horizon import accepted_age_text, oldest_accepted
from meterstream.meters import Catalogue, Meter

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
PLAIN_DECIMAL = re.compile(r"^[+-]?[0-9]+(\.[0-9]+)?\Z")
# Control characters (NUL above all) cannot be stored in PostgreSQL text and mean a bug upstream.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
# How far ahead of the checking host's clock an event time may be (METERSTREAM_FUTURE_TOLERANCE_S):
# the SDK and the workers apply the same rule, each with its own clock. The reporter never sends
# Stripe a timestamp after its own clock, so Stripe's 5 minutes are kept whatever this is.
DEFAULT_FUTURE_TOLERANCE_S = 600.0


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
    if not text.isprintable() and CONTROL_CHARACTERS.search(text):
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
        whole = plain_int(value)
        if whole is not None:
            return check_value(whole, meter)
        if not PLAIN_DECIMAL.match(value):
            raise InvalidEventError(
                "value", f"not a plain decimal number like '12.5': {value!r:.80}"
            )
    try:
        exact = value if isinstance(value, Decimal) else Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        raise InvalidEventError("value", f"not a decimal number: {value!r:.80}") from None
    return _check_exact(exact, meter)


def plain_int(text: str) -> int | None:
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
