"""The SDK's event rules in one function: what ``UsageClient.record()`` and ``POST /v1/events``
both apply before an event may go to Kafka (the same code, so the two ways in never differ)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from meterstream.dimensions import read_combination
from meterstream.events import (
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
from meterstream.meters import Catalogue

_EMPTY: Mapping[str, str] = {}


@dataclass(frozen=True, slots=True)
class EventRules:
    """The catalogue and the time rules an event is checked against."""

    catalogue: Catalogue
    horizon_days: int
    future_tolerance_s: float


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
    found = check_meter(meter, rules.catalogue)
    customer = check_customer(customer)
    exact = check_value(value, found)
    check_stripe_digits(exact, found)
    checked_time = (
        now
        if event_time is None
        else check_event_time(
            event_time,
            now=now,
            horizon_days=rules.horizon_days,
            future_tolerance_s=rules.future_tolerance_s,
        )
    )
    props = (
        check_properties(properties, found)
        if properties or found.unique_property or found.dimensions
        else _EMPTY
    )
    if found.dimensions:
        # The workers' rule: a dimension missing here would be dead-lettered there.
        read_combination(found, props, _EMPTY)
    payload = encode_fields(
        check_event_id(event_id),
        source,
        customer,
        meter,
        exact,
        checked_time,
        props,
        found.value_key,
    )
    check_event_size(payload)
    return payload
