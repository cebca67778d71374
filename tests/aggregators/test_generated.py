"""Generated input (hypothesis): good events mixed with anything a hostile producer might write.

Through the real batch apply on PostgreSQL and SQLite: every good event counts exactly once
(against aggregators.reference), every other message is dead-lettered, and nothing raises.
And a fuzz run of decode + admit alone: no exception but the named InvalidEventError.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, select

from aggregators.batch import BatchApplier, Message
from aggregators.intake import Accepted, Clock, Rejection, admit, produced_at
from aggregators.reference import reference_totals
from meterstream.content_modes import decode_message
from meterstream.errors import HeaderError, InvalidEventError
from meterstream.events import UsageEvent, decode_event, encode_event
from meterstream.meters import load_catalogue
from meterstream.metrics import AggregatorMetrics
from meterstream.schema import rejected_events, seen_events, unique_values, window_totals
from tests.aggregators.generated import (
    HORIZON_DAYS,
    NOW,
    BinaryMessage,
    Generated,
    binary_event,
    good_events,
    hostile_binary,
    hostile_values,
    kafka_timestamps,
    streams,
)
from tests.aggregators.test_batch import stored_totals
from tests.conftest import EXAMPLE_METERS

CATALOGUE = load_catalogue(EXAMPLE_METERS)


def _empty(engine: Engine) -> None:
    with engine.begin() as connection:
        for table in (window_totals, seen_events, unique_values, rejected_events):
            connection.execute(delete(table))


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    # The engine is one fixture for all examples; each example starts from empty tables.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(stream=streams(), batch_size=st.integers(1, 16))
def test_good_events_count_exactly_once_and_everything_else_is_dead_lettered(
    migrated_engine: Engine, stream: list[Generated], batch_size: int
) -> None:
    _empty(migrated_engine)
    applier = BatchApplier(
        migrated_engine,
        CATALOGUE,
        AggregatorMetrics(),
        horizon_days=HORIZON_DAYS,
        clock=lambda: NOW,
    )
    messages = [
        Message("usage", 0, offset, item.value, produced_at(item.timestamp_s), item.headers)
        for offset, item in enumerate(stream)
    ]
    applied = 0
    for start in range(0, len(messages), batch_size):
        applied += applier.apply(messages[start : start + batch_size]).applied
    good = [item.event for item in stream if item.event is not None]
    expected = reference_totals(good, CATALOGUE)
    assert stored_totals(migrated_engine) == expected
    assert applied == sum(events for _value, events in expected.values())
    with migrated_engine.connect() as connection:
        dead = set(connection.execute(select(rejected_events.c.offset)).scalars())
    assert dead == {offset for offset, item in enumerate(stream) if item.event is None}


_CLOCK = Clock(NOW, 600.0, HORIZON_DAYS)
_ONE = UsageEvent("e1", "svc", "c1", "tokens", Decimal(5), NOW)


# About 8 s: long enough to find what a fuzzer finds in the decoder, bounded for CI.
@settings(max_examples=5_000, deadline=None, database=None)
@given(value=hostile_values, timestamp_s=kafka_timestamps)
def test_fuzzed_messages_raise_nothing_but_invalid_event_error(
    value: bytes | None, timestamp_s: float
) -> None:
    if value is not None:
        with contextlib.suppress(InvalidEventError):
            decode_event(value)
    outcome = admit(value, CATALOGUE, clock=_CLOCK, produced=produced_at(timestamp_s))
    # Built to break a rule, so never accepted; and the decoder's own errors are all named.
    assert isinstance(outcome, Rejection), outcome
    assert outcome.reason != "undecodable", outcome.detail


def test_kafka_timestamps_anywhere_in_int64_are_a_time_or_none() -> None:
    assert produced_at(1_700_000_000.0) == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    for timestamp_s in (0.0, -1.0, float("nan"), float("inf"), (2**63 - 1) / 1000, 1.7e12):
        assert produced_at(timestamp_s) is None


@pytest.mark.parametrize("value", [b"", b"\xff", b"[]", b"1", b'"x"', b"{}", b"null"])
def test_admit_of_small_garbage_is_unparseable(value: bytes) -> None:
    outcome = admit(value, CATALOGUE, clock=_CLOCK, produced=None)
    assert isinstance(outcome, Rejection) and outcome.reason == "unparseable"
    assert not isinstance(outcome, Accepted)


# About 10 s on a busy machine, as the structured fuzz run above but for binary mode's headers.
@settings(max_examples=2_000, deadline=None, database=None)
@given(message=hostile_binary, timestamp_s=kafka_timestamps)
def test_fuzzed_binary_mode_headers_raise_nothing_but_invalid_event_error(
    message: BinaryMessage, timestamp_s: float
) -> None:
    value, headers = message
    with contextlib.suppress(InvalidEventError):
        decode_message(value, headers)
    outcome = admit(
        value, CATALOGUE, clock=_CLOCK, produced=produced_at(timestamp_s), headers=headers
    )
    assert isinstance(outcome, Rejection), outcome
    assert outcome.reason != "undecodable", outcome.detail


@settings(max_examples=500, deadline=None, database=None)
@given(event=good_events())
def test_a_good_event_decodes_the_same_in_either_content_mode(event: UsageEvent) -> None:
    value, headers = binary_event(event)
    assert decode_message(value, headers) == decode_event(encode_event(event))
    outcome = admit(value, CATALOGUE, clock=_CLOCK, produced=None, headers=headers)
    assert isinstance(outcome, Accepted) and outcome.event == decode_event(encode_event(event))


def test_header_errors_are_invalid_event_errors_naming_the_header() -> None:
    value, headers = binary_event(_ONE)
    with pytest.raises(HeaderError, match="ce_id: appears more than once"):
        decode_message(value, (*headers, ("CE_ID", b"other")))
