"""ingest/rules.py: the cheap tests of the common case never change a verdict.

``encode_checked`` skips the full checks of ``meterstream.events`` when a cheap test says an
input is plainly valid. Here it is held, under hypothesis, against the full checks applied one
after another in the same order (what it did before the cheap tests): the same bytes for every
event taken, the same field and reason for every event refused. The same for the JSON readings
of the HTTP API (``parse_json_value``) against the workers' own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.http.body import admit
from ingest.rules import EventRules, encode_checked
from meterstream.dimensions import read_combination
from meterstream.errors import InvalidEventError
from meterstream.events import (
    check_customer,
    check_event_id,
    check_event_size,
    check_event_time,
    check_meter,
    check_properties,
    check_stripe_digits,
    check_value,
    decode_document,
    encode_fields,
    format_value,
    parse_json_value,
)
from meterstream.meters import parse_catalogue

CATALOGUE = parse_catalogue(
    {
        "meters": {
            "calls": {"aggregation": "count", "window": "1m", "stripe_event_name": "calls"},
            "storage": {
                "aggregation": "sum",
                "window": "1h",
                "stripe_event_name": "storage",
                "unit_scale": "1000",
                "allow_negative": True,
            },
            "milli": {
                "aggregation": "sum",
                "window": "1h",
                "stripe_event_name": "milli",
                "unit_scale": "0.001",
            },
            "users": {
                "aggregation": "unique_count",
                "window": "1mo",
                "stripe_event_name": "users",
                "unique_property": "user_id",
            },
            "llm": {
                "aggregation": "sum",
                "window": "1h",
                "stripe_event_name": "llm",
                "value_property": "tokens",
                "dimensions": ["model", "region"],
                "dimension_defaults": {"region": "global"},
            },
        }
    }
)
RULES = EventRules(CATALOGUE, horizon_days=35, future_tolerance_s=600.0)
NOW = datetime(2026, 12, 4, 12, 0, 0, 123456, tzinfo=UTC)
_EMPTY: Mapping[str, str] = {}


def _full_checks(
    *,
    source: str,
    event_id: Any,
    customer: Any,
    meter: Any,
    value: Any,
    event_time: Any,
    properties: Any,
    now: datetime,
) -> bytes:
    """Every rule of meterstream.events applied in full, in encode_checked's order."""
    found = check_meter(meter, CATALOGUE)
    customer = check_customer(customer)
    exact = check_value(value, found)
    check_stripe_digits(exact, found)
    checked_time = (
        now
        if event_time is None
        else check_event_time(event_time, now=now, horizon_days=35, future_tolerance_s=600.0)
    )
    props = (
        check_properties(properties, found)
        if properties or found.unique_property or found.dimensions
        else _EMPTY
    )
    if found.dimensions:
        read_combination(found, props, _EMPTY)
    event_id = check_event_id(event_id)
    payload = encode_fields(
        event_id, source, customer, meter, exact, checked_time, props, found.value_key
    )
    check_event_size(payload)
    return payload


def _verdict(call: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("taken", call())
    except InvalidEventError as refused:
        return ("refused", type(refused).__name__, refused.field, refused.reason)


_texts = st.one_of(
    st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True),
    st.text(max_size=6),
    st.sampled_from(["", " ", "\t", "a\x00b", "a\x7f", "\u00a0", "\u2028", "é"]),
    st.sampled_from(["x" * 200, "x" * 201]),
)
_values = st.one_of(
    st.integers(-(10**19), 10**19),
    st.sampled_from([0, 10**15 - 1, 10**15, 10**18 - 1, 10**18, -(10**15)]),
    st.from_regex(r"[+-]?[0-9]{1,20}(\.[0-9]{1,14})?", fullmatch=True),
    st.sampled_from(["-0", "007", "1e3", "1_000", " 1", "١٢", "²", "NaN", "1.0000000000000"]),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=False),
    st.booleans(),
)
_zones = st.sampled_from(
    [UTC, timezone(timedelta(hours=5)), timezone(-timedelta(hours=3)), timezone(timedelta(0), "Z")]
)
_times = st.one_of(
    st.none(),
    st.datetimes(
        min_value=datetime(2026, 10, 28), max_value=datetime(2026, 12, 5), timezones=_zones
    ),
    st.datetimes(min_value=datetime(2026, 11, 1), max_value=datetime(2026, 12, 5)),  # naive
    st.sampled_from(
        [
            NOW - timedelta(days=34),
            NOW - timedelta(days=34, microseconds=1),
            NOW + timedelta(seconds=600),
            NOW + timedelta(seconds=600, microseconds=1),
        ]
    ),
    st.text(max_size=3),
)
_properties = st.one_of(
    st.none(),
    st.sampled_from(
        [
            {},
            {"model": "m1"},
            {"user_id": "u1"},
            {"user_id": ""},
            {"model": ""},
            {"a" * 65: "v"},
            {"k": "v" * 1025},
            {f"k{i}": "v" for i in range(101)},
        ]
    ),
    st.dictionaries(_texts, st.one_of(_texts, st.integers(), st.none()), max_size=3),
    st.integers(),
)
_meters = st.one_of(st.sampled_from([*CATALOGUE.meters, "unknown", ""]), st.integers(), st.none())


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    event_id=st.one_of(_texts, st.integers()),
    customer=st.one_of(_texts, st.integers(), st.none()),
    meter=_meters,
    value=_values,
    event_time=_times,
    properties=_properties,
)
def test_encode_checked_gives_the_full_checks_verdict(
    event_id: Any, customer: Any, meter: Any, value: Any, event_time: Any, properties: Any
) -> None:
    given_fields = {
        "source": "src",
        "event_id": event_id,
        "customer": customer,
        "meter": meter,
        "value": value,
        "event_time": event_time,
        "properties": properties,
        "now": NOW,
    }
    assert _verdict(lambda: encode_checked(RULES, **given_fields)) == _verdict(
        lambda: _full_checks(**given_fields)
    )


@settings(max_examples=1000, deadline=None)
@given(
    raw=st.one_of(
        st.integers(-(2**63), 2**64 - 1),
        st.from_regex(r"[+-]?[0-9]{1,22}(\.[0-9]{1,14})?", fullmatch=True),
        st.text(max_size=6),
        st.floats(),
        st.booleans(),
        st.none(),
    )
)
def test_the_http_apis_value_reading_is_the_workers(raw: Any) -> None:
    # The workers read data.value in decode_document; the HTTP API reads it with
    # parse_json_value, which gives an int for plain integers.
    doc = {
        "specversion": "1.0",
        "id": "e",
        "source": "s",
        "type": "calls",
        "subject": "c",
        "time": NOW.isoformat(),
        "data": {"value": raw},
    }
    workers, api = (
        _verdict(lambda: decode_document(doc).value),
        _verdict(lambda: parse_json_value(raw)),
    )
    assert workers[0] == api[0]
    if workers[0] == "taken":
        assert api[1] == workers[1] and format_value(api[1]) == format_value(workers[1])
    else:
        assert api[1:] == workers[1:]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "specversion": st.just("1.0"),
                "id": st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),
                "source": st.just("src"),
                "type": st.sampled_from(["calls", "storage", "users", "llm"]),
                "subject": _texts,
                "time": st.datetimes(
                    min_value=datetime(2026, 10, 28),
                    max_value=datetime(2026, 12, 4, 12, 10),
                    timezones=_zones,
                ).map(lambda moment: moment.isoformat().replace("+00:00", "Z")),
                "data": st.fixed_dictionaries(
                    {
                        "value": st.one_of(
                            st.integers(0, 10**16), st.from_regex(r"[0-9]{1,19}", fullmatch=True)
                        ),
                        "tokens": st.integers(0, 10**6),
                        "properties": st.sampled_from([{}, {"model": "m1"}, {"user_id": "u"}]),
                    }
                ),
            }
        ),
        min_size=1,
        max_size=8,
    )
)
def test_each_event_the_api_takes_decodes_to_what_was_sent(docs: list[dict[str, Any]]) -> None:
    messages, problems = admit(orjson.loads(orjson.dumps(docs)), RULES, "src", NOW)
    taken = {p.index for p in problems} ^ set(range(len(docs)))
    assert len(messages) == len(taken)
    for index, (key, payload) in zip(sorted(taken), messages, strict=True):
        sent, event = docs[index], decode_document(orjson.loads(payload), CATALOGUE)
        assert key == sent["subject"].encode() == event.customer_id.encode()
        value_key = "tokens" if sent["type"] == "llm" else "value"
        assert event.value == Decimal(sent["data"][value_key])
        assert event.event_time == datetime.fromisoformat(sent["time"])
