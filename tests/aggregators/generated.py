"""Hypothesis strategies for usage messages: good events, and hostile messages that break a
rule for certain (so the tests know, without asking the code under test, which is which).
Each comes in either CloudEvents content mode: structured (the value is the event) or binary
(the attributes are ``ce_`` headers, the value is the data).

Every message comes with a Kafka timestamp (seconds, as faust gives it) drawn from the whole
int64 range of milliseconds, or 0 (none).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import strategies as st

from meterstream.events import UsageEvent, encode_event

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
HORIZON_DAYS = 35
METERS = [
    "api_calls",
    "tokens",
    "storage_gb_hours",
    "peak_connections",
    "min_replicas",
    "seats",
    "active_users",
]
_CONTROL = "".join(chr(c) for c in range(0x20)) + "\x7f"
# Any character a JSON string may carry and PostgreSQL text can hold, multibyte included.
_TEXT = st.characters(exclude_categories=("Cs",), exclude_characters=_CONTROL)
_FIELDS = ("specversion", "id", "source", "type", "subject", "time", "data")
_EDGE_TIMES = [
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999Z",
    "2026-11-24T10:00:00",  # no offset
    "2026-02-30T10:00:00Z",
    "",
    "yesterday",
]
_NOT_PLAIN_DECIMALS = ["1e5", "NaN", "Infinity", "-inf", " 1", "1.", ".5", "+", "", "0x10", "١٢"]


@dataclass(frozen=True, slots=True)
class Generated:
    """One Kafka message: its value, its Kafka timestamp, and the event it is (None: hostile)."""

    value: bytes | None
    timestamp_s: float
    event: UsageEvent | None
    headers: tuple[tuple[str, bytes | None], ...] = ()


kafka_timestamps = st.one_of(
    st.just(0.0),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(lambda ms: ms / 1000),
    st.floats(allow_nan=True, allow_infinity=True),
)
_texts = st.text(_TEXT, min_size=1, max_size=40)
_customers = st.one_of(
    st.sampled_from(["c1", "c,2", 'c"3', "c\\4", "{c5}", "NULL", " c 6 ", "ü7", "😀8"]),
    st.text(_TEXT, min_size=1, max_size=200).filter(str.strip),
)
# A few ids, so one id is used for two meters or two customers (each a separate event).
_ids = st.one_of(st.sampled_from(["req-8812", "1", "order-1"]), st.text(_TEXT, max_size=200))


@st.composite
def good_events(draw: st.DrawFn) -> UsageEvent:
    meter = draw(st.sampled_from(METERS))
    # storage_gb_hours has unit_scale 1000: below 1e12 stays within Stripe's 15 digits.
    units = draw(st.integers(-(10**12) + 1 if meter == "storage_gb_hours" else 0, 10**12 - 1))
    value = Decimal(units) / Decimal(10) ** draw(st.integers(0, 12))
    properties = {}
    if meter == "active_users" or draw(st.booleans()):
        properties["user_id"] = draw(st.text(_TEXT, min_size=1, max_size=1024))
    return UsageEvent(
        event_id=draw(_ids.filter(bool)),
        source=draw(st.sampled_from(["svc", "go-service"])),
        customer_id=draw(_customers),
        meter=meter,
        value=value,
        # Up to 33 days late (intake keeps 1 day of the 35 for the pipeline: meterstream.horizon),
        # or up to 9 minutes ahead of the worker (a fast producer clock).
        event_time=NOW
        - timedelta(microseconds=draw(st.integers(-9 * 60 * 10**6, 33 * 86_400 * 10**6))),
        properties=properties,
    )


def _document(event: UsageEvent) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(encode_event(event))
    return doc


_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(_TEXT, max_size=50),
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(_TEXT, max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
_not_strings = _json.filter(lambda v: not isinstance(v, str))


def _drop_field(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    del doc[draw(st.sampled_from(_FIELDS))]


def _wrong_type(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    doc[draw(st.sampled_from(["id", "source", "type", "subject", "time"]))] = draw(_not_strings)


def _too_long(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    limits = [("id", 200), ("source", 200), ("subject", 200), ("type", 100)]
    field, limit = draw(st.sampled_from(limits))
    doc[field] = draw(st.text(_TEXT, min_size=limit + 1, max_size=limit + 300))


def _control_character(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    field = draw(st.sampled_from(["id", "source", "subject", "type"]))
    doc[field] = doc[field] + draw(st.sampled_from(list(_CONTROL)))


def _edge_time(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    doc["time"] = draw(st.sampled_from(_EDGE_TIMES))


def _beyond_tolerance(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    doc["time"] = (NOW + timedelta(seconds=draw(st.integers(601, 10**11)))).isoformat()


def _before_the_keys_kept(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    behind = timedelta(days=draw(st.integers(HORIZON_DAYS + 1, 700_000)))
    doc["time"] = (NOW - behind).isoformat()


def _value_not_a_decimal(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    not_int = _not_strings.filter(lambda v: isinstance(v, bool) or not isinstance(v, int))
    doc["data"]["value"] = draw(st.one_of(not_int, st.sampled_from(_NOT_PLAIN_DECIMALS)))


def _huge_value(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    huge = st.one_of(st.integers(10**15, 2**64 - 1), st.integers(10**15, 10**60).map(str))
    doc["data"]["value"] = draw(huge)
    doc["type"] = draw(st.sampled_from(["tokens", "api_calls", "seats"]))


def _too_many_fraction_digits(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    doc["data"]["value"] = "0." + "0" * draw(st.integers(12, 40)) + "1"


def _negative(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    doc["data"]["value"] = "-" + str(draw(st.integers(1, 10**6)))
    doc["type"] = draw(st.sampled_from(["tokens", "api_calls", "seats", "peak_connections"]))


def _unknown_meter(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    doc["type"] = "x-" + draw(st.text(_TEXT, max_size=60))


def _unique_property_wrong(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    doc["type"] = "active_users"
    too_long = st.text(_TEXT, min_size=1025, max_size=1500).map(lambda v: {"user_id": v})
    doc["data"]["properties"] = draw(st.one_of(st.just({}), too_long))


def _properties_of_another_shape(draw: st.DrawFn, doc: dict[str, Any]) -> None:
    keys = st.text(_TEXT, min_size=1, max_size=5)
    doc["data"]["properties"] = draw(
        st.one_of(
            st.lists(_json_scalars, min_size=1, max_size=3),
            st.dictionaries(keys, _not_strings, min_size=1, max_size=3),
        )
    )


_BREAKERS = [
    _drop_field,
    _wrong_type,
    _too_long,
    _control_character,
    _edge_time,
    _beyond_tolerance,
    _before_the_keys_kept,
    _value_not_a_decimal,
    _huge_value,
    _too_many_fraction_digits,
    _negative,
    _unknown_meter,
    _unique_property_wrong,
    _properties_of_another_shape,
]


@st.composite
def _broken_document(draw: st.DrawFn) -> dict[str, Any]:
    """A CloudEvent that breaks one rule for certain."""
    doc = _document(draw(good_events()))
    draw(st.sampled_from(_BREAKERS))(draw, doc)
    return doc


hostile_values = st.one_of(
    st.none(),
    st.binary(max_size=300),
    _json.map(orjson.dumps),
    _broken_document().map(orjson.dumps),
)

Headers = tuple[tuple[str, bytes | None], ...]
BinaryMessage = tuple[bytes, Headers]
_ATTRIBUTES = ("specversion", "id", "source", "type", "subject", "time")


def binary_message(doc: dict[str, Any]) -> BinaryMessage:
    """``doc`` in binary content mode, as the CloudEvents Kafka binding writes it: each
    attribute a ``ce_`` header, ``content-type`` the data's type, the value the data."""
    headers: list[tuple[str, bytes | None]] = [("content-type", b"application/json")]
    for name in _ATTRIBUTES:
        if name in doc:
            text = doc[name] if isinstance(doc[name], str) else orjson.dumps(doc[name]).decode()
            headers.append((f"ce_{name}", text.encode()))
    return (orjson.dumps(doc["data"]) if "data" in doc else b""), tuple(headers)


def binary_event(event: UsageEvent) -> BinaryMessage:
    return binary_message(_document(event))


# The breakers whose fault survives the trip into headers (a header is always a string, so a
# wrong JSON type in an attribute is no fault there).
_BINARY_BREAKERS = [b for b in _BREAKERS if b is not _wrong_type]


@st.composite
def _broken_binary(draw: st.DrawFn) -> BinaryMessage:
    """A binary-mode message that breaks one event rule, for certain."""
    doc = _document(draw(good_events()))
    draw(st.sampled_from(_BINARY_BREAKERS))(draw, doc)
    return binary_message(doc)


def _shuffled(draw: st.DrawFn, headers: list[tuple[str, bytes | None]]) -> Headers:
    return tuple(draw(st.permutations(headers)))


@st.composite
def _bad_headers(draw: st.DrawFn) -> BinaryMessage:
    """A good event whose headers break the binding: mixed modes, a header twice (in any
    case), a header without a value or not UTF-8, data that is not JSON by its type."""
    event = draw(good_events())
    value, headers = binary_event(event)
    listed = list(headers)
    fault = draw(st.sampled_from(["mixed", "whole", "twice", "none", "utf8", "type", "dct"]))
    if fault == "mixed":  # a structured content type beside ce_ headers
        listed[0] = ("content-type", b"application/cloudevents+json")
        value = encode_event(event)
    elif fault == "whole":  # ce_ headers, and the whole event as the value
        value = encode_event(event)
    elif fault == "twice":
        name, raw = draw(st.sampled_from(listed))
        listed.append((draw(st.sampled_from([name, name.upper(), name.title()])), raw))
    elif fault in ("none", "utf8"):
        at = draw(st.integers(0, len(listed) - 1))
        listed[at] = (
            listed[at][0],
            None if fault == "none" else b"\xff\xfe" + (listed[at][1] or b""),
        )
    elif fault == "type":
        listed[0] = ("content-type", draw(st.sampled_from([b"text/plain", b"application/xml"])))
    else:
        listed.append(("ce_datacontenttype", b"application/json"))
    return value, _shuffled(draw, listed)


# Any headers at all: names from the binding's and beyond, values any bytes or none.
_header_names = st.one_of(
    st.sampled_from([f"ce_{n}" for n in _ATTRIBUTES] + ["content-type", "ce_data", "traceparent"]),
    st.text(_TEXT, max_size=20),
)
_any_headers = st.lists(st.tuples(_header_names, st.one_of(st.none(), st.binary(max_size=60))))
hostile_binary = st.one_of(
    _broken_binary(),
    _bad_headers(),
    st.tuples(hostile_values.map(lambda v: v or b""), _any_headers.map(tuple)).filter(
        # Without a ce_ header or a content-type, a message is structured: hostile_values
        # covers it (and without them a good event could be drawn by chance).
        lambda m: any(n.lower().startswith("ce_") or n.lower() == "content-type" for n, _ in m[1])
    ),
)


@st.composite
def streams(draw: st.DrawFn) -> list[Generated]:
    """Good events (some re-sent as identical copies) mixed with hostile messages."""
    events: dict[tuple[str, str, str, str], UsageEvent] = {}
    for event in draw(st.lists(good_events(), max_size=12)):
        # One event per deduplication key: different events never share all four.
        events.setdefault((event.source, event.event_id, event.customer_id, event.meter), event)
    good = list(events.values())
    resent = draw(st.lists(st.sampled_from(good), max_size=4)) if good else []
    hostile = draw(st.lists(hostile_values, max_size=12))
    items = [_good(draw, e) for e in good + resent]
    items += [Generated(value, draw(kafka_timestamps), None) for value in hostile]
    for value, headers in draw(st.lists(st.one_of(_broken_binary(), _bad_headers()), max_size=6)):
        items.append(Generated(value, draw(kafka_timestamps), None, headers))
    return draw(st.permutations(items))


def _good(draw: st.DrawFn, event: UsageEvent) -> Generated:
    """``event`` in either content mode (a re-send may change mode: it is the same event)."""
    if draw(st.booleans()):
        value, headers = binary_event(event)
        return Generated(value, draw(kafka_timestamps), event, headers)
    return Generated(encode_event(event), draw(kafka_timestamps), event)
