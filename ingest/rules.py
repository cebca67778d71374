"""The SDK's event rules in one function: what ``UsageClient.record()`` and ``POST /v1/events``
both apply before an event may go to Kafka (the same code, so the two ways in never differ).

Each rule has a cheap test for the common valid case (a str id, an int or plain-integer value
that is far from any bound, a UTC time inside the window, printable strings) and otherwise
falls through to the full check of ``meterstream.events``, which decides and words the refusal.
So a fast test may only ever say "valid" where the full check says so too; anything else it
hands on. ``tests/ingest/test_rules.py`` holds the two paths side by side under hypothesis.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from meterstream.dimensions import read_combination
from meterstream.events import (
    MAX_CUSTOMER_CHARS,
    MAX_EVENT_BYTES,
    MAX_ID_CHARS,
    check_customer,
    check_event_id,
    check_event_size,
    check_event_time,
    check_meter,
    check_properties,
    check_stripe_digits,
    check_value,
    encode_fields,
)
from meterstream.horizon import HORIZON_MARGIN
from meterstream.meters import Catalogue

_EMPTY: Mapping[str, str] = {}
# An int value below this, times a unit_scale of at most 1, is fewer than Stripe's 15 digits.
_STRIPE_SAFE_INT = 10**15


@dataclass(frozen=True, slots=True)
class EventRules:
    """The catalogue and the time rules an event is checked against."""

    catalogue: Catalogue
    horizon_days: int
    future_tolerance_s: float
    # Derived once, not per event: how far back and ahead of ``now`` a time may be, and the
    # meters whose unit_scale cannot push an int value past Stripe's 15 digits.
    _max_age: timedelta = field(init=False, repr=False, compare=False)
    _max_ahead: timedelta = field(init=False, repr=False, compare=False)
    _small_scale: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # now - _max_age is horizon.oldest_accepted(now, horizon_days), exactly.
        object.__setattr__(self, "_max_age", timedelta(days=self.horizon_days) - HORIZON_MARGIN)
        object.__setattr__(self, "_max_ahead", timedelta(seconds=self.future_tolerance_s))
        small = frozenset(m.name for m in self.catalogue if m.unit_scale <= 1)
        object.__setattr__(self, "_small_scale", small)


def encode_checked(
    rules: EventRules,
    *,
    source: str,
    event_id: Any,
    customer: Any,
    meter: Any,
    value: Decimal | int | str,
    event_time: datetime | None,
    properties: Mapping[str, str] | None,
    now: datetime,
) -> bytes:
    """Check one event against every rule of the SDK and return its CloudEvents JSON.

    ``event_id``, ``customer`` and ``meter`` may be anything a caller was given (a JSON value
    over HTTP): each is checked before it is used. ``event_time`` None means ``now``. Raises
    InvalidEventError naming the field and the reason (the size of the encoded event included:
    field ``event``).
    """
    found = rules.catalogue.meters.get(meter) if type(meter) is str else None
    if found is None:
        found = check_meter(meter, rules.catalogue)
    if not (
        type(customer) is str
        and 0 < len(customer) <= MAX_CUSTOMER_CHARS
        and customer.isprintable()
        and not customer.isspace()
    ):
        customer = check_customer(customer)
    if type(value) is int and 0 <= value < _STRIPE_SAFE_INT:
        exact: Decimal | int = value
        if found.name not in rules._small_scale:
            check_stripe_digits(exact, found)
    else:
        exact = check_value(value, found)
        check_stripe_digits(exact, found)
    if event_time is None:
        checked_time = now
    elif (
        type(event_time) is datetime
        and event_time.tzinfo is UTC
        and now - rules._max_age <= event_time <= now + rules._max_ahead
    ):
        checked_time = event_time
    else:
        checked_time = check_event_time(
            event_time,
            now=now,
            horizon_days=rules.horizon_days,
            future_tolerance_s=rules.future_tolerance_s,
        )
    props = (
        check_properties(properties, found)
        if properties or found.unique_property or found.dimensions
        else _EMPTY
    )
    if found.dimensions:
        # The workers' rule: a dimension missing here would be dead-lettered there.
        read_combination(found, props, _EMPTY)
    if not (type(event_id) is str and 0 < len(event_id) <= MAX_ID_CHARS and event_id.isprintable()):
        event_id = check_event_id(event_id)
    payload = encode_fields(
        event_id, source, customer, meter, exact, checked_time, props, found.value_key
    )
    if len(payload) > MAX_EVENT_BYTES:
        check_event_size(payload)
    return payload
