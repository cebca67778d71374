"""No single message can stop a worker: hostile input is dead-lettered, good events counted.

Real PostgreSQL and SQLite, the real applying child process, the real worker on the embedded
broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError

from aggregators.batch import BatchApplier, Message
from aggregators.pipeline import ApplyPipeline, RawMessage
from aggregators.reference import reference_totals
from meterstream.db import build_engine, migrate
from meterstream.events import UsageEvent, encode_event
from meterstream.meters import load_catalogue
from meterstream.metrics import AggregatorMetrics
from meterstream.schema import rejected_events
from meterstream.settings import Settings, load_settings
from tests.aggregators.test_batch import as_messages, stored_totals
from tests.aggregators.workers import events_applied
from tests.conftest import EXAMPLE_METERS

SettingsFactory = Callable[..., Settings]


def _raw(offset: int, timestamp_s: float, now: datetime) -> RawMessage:
    event = UsageEvent(f"e{offset}", "s", "c1", "tokens", Decimal(1), now)
    return ("usage", 0, offset, encode_event(event), timestamp_s)


def test_a_kafka_timestamp_in_the_far_future_does_not_stop_the_batch(
    settings_factory: SettingsFactory, database_url: str
) -> None:
    settings = settings_factory(database_url=database_url)
    engine = build_engine(settings)
    migrate(engine)
    now = datetime.now(UTC)
    batch = [_raw(offset, now.timestamp(), now) for offset in range(10)]
    # A producer writing microseconds where milliseconds belong: faust's timestamp (ms / 1000)
    # is a thousand times too large, some 55,000 years ahead.
    batch[4] = _raw(4, now.timestamp() * 1000, now)

    async def scenario() -> None:
        pipeline = ApplyPipeline(settings)
        try:
            applied = await pipeline.submit(1, batch)
        finally:
            pipeline.close()
        assert (applied.result.applied, applied.result.rejected) == (10, [])

    asyncio.run(scenario())
    assert events_applied(engine) == 10
    engine.dispose()


NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def _applier(engine: Engine) -> BatchApplier:
    catalogue = load_catalogue(EXAMPLE_METERS)
    return BatchApplier(engine, catalogue, AggregatorMetrics(), horizon_days=35, clock=lambda: NOW)


def _foreign(offset: int, **fields: object) -> Message:
    doc: dict[str, object] = {
        "specversion": "1.0",
        "id": f"x{offset}",
        "source": "go-service",
        "type": "tokens",
        "subject": "c",
        "time": (NOW - timedelta(minutes=1)).isoformat(),
        "data": {"value": "1"},
    }
    doc.update(fields)
    return Message("usage", 0, offset, orjson.dumps(doc))


def _rejected_reasons(engine: Engine) -> list[tuple[int, str]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(rejected_events.c.offset, rejected_events.c.reason).order_by(
                rejected_events.c.offset
            )
        )
        return [(row.offset, row.reason) for row in rows]


def test_event_times_at_the_edge_of_datetime_are_dead_lettered(migrated_engine: Engine) -> None:
    messages = [
        _foreign(0, time="0001-01-01T00:00:00+14:00"),
        _foreign(1),
        _foreign(2, time="9999-12-31T23:59:59-14:00"),
        _foreign(3, time="9999-12-31T23:59:59Z"),
    ]
    result = _applier(migrated_engine).apply(messages)
    assert result.applied == 1
    assert _rejected_reasons(migrated_engine) == [
        (0, "unparseable"),
        (2, "unparseable"),
        (3, "in_future"),
    ]


def test_a_long_multibyte_unique_value_is_counted(migrated_engine: Engine) -> None:
    # 1,024 four-byte characters: 4 KB, more than a PostgreSQL btree key holds.
    long_value = "\U0001f600" * 1024
    messages = [
        _foreign(0, type="active_users", data={"value": "1", "properties": {"user_id": v}})
        for v in (long_value,)
    ] + [
        _foreign(i, type="active_users", data={"value": "1", "properties": {"user_id": v}})
        for i, v in ((1, long_value[:-1] + "x"), (2, long_value))
    ]
    result = _applier(migrated_engine).apply(messages)
    assert (result.applied, result.rejected) == (3, [])
    [(value, events)] = stored_totals(migrated_engine).values()
    assert (value, events) == (Decimal(2), 3)


def test_a_value_beyond_stripes_fifteen_digits_is_dead_lettered_with_its_reason(
    migrated_engine: Engine,
) -> None:
    messages = [
        _foreign(0, data={"value": "999999999999999"}),
        _foreign(1, data={"value": "1000000000000000"}),
        # storage_gb_hours: unit_scale 1000, so 1e12 GB-hours are 1e15 Stripe units.
        _foreign(2, type="storage_gb_hours", data={"value": "1000000000000"}),
    ]
    result = _applier(migrated_engine).apply(messages)
    assert result.applied == 1
    assert _rejected_reasons(migrated_engine) == [
        (1, "beyond_stripe_digits"),
        (2, "beyond_stripe_digits"),
    ]


def test_one_request_id_for_two_meters_counts_twice_and_a_resend_once(
    migrated_engine: Engine,
) -> None:
    t = NOW - timedelta(minutes=1)
    events = [
        UsageEvent("req-8812", "api", "c1", "tokens", Decimal(5), t),
        UsageEvent("req-8812", "api", "c1", "api_calls", Decimal(1), t),
        # Per-tenant order numbers repeat across customers.
        UsageEvent("order-1", "shop", "c1", "tokens", Decimal(2), t),
        UsageEvent("order-1", "shop", "c2", "tokens", Decimal(3), t),
    ]
    target = _applier(migrated_engine)
    first = target.apply(as_messages(events))
    resend = target.apply(as_messages(events, 4))
    assert (first.applied, first.duplicates) == (4, 0)
    assert (resend.applied, resend.duplicates) == (0, 4)
    catalogue = load_catalogue(EXAMPLE_METERS)
    assert stored_totals(migrated_engine) == reference_totals(events, catalogue)
    assert sum(events for _value, events in stored_totals(migrated_engine).values()) == 4


def test_a_producer_clock_ten_minutes_ahead_loses_nothing(migrated_engine: Engine) -> None:
    ahead = NOW + timedelta(minutes=10)
    events = [UsageEvent(f"a{i}", "s", "c", "tokens", Decimal(1), ahead) for i in range(3)]
    # The SDK on that host stamps both the event time and the Kafka timestamp with its clock.
    messages = [Message("usage", 0, i, encode_event(e), ahead) for i, e in enumerate(events)]
    result = _applier(migrated_engine).apply(messages)
    assert (result.applied, result.rejected) == (3, [])


def test_a_broken_database_is_retried_not_blamed_on_the_messages(migrated_engine: Engine) -> None:
    with migrated_engine.begin() as connection:
        connection.execute(text("DROP TABLE window_totals"))
    target = _applier(migrated_engine)
    with pytest.raises(DBAPIError):
        target.apply([_foreign(0), _foreign(1)])
    assert _rejected_reasons(migrated_engine) == []


def test_unique_values_stored_before_the_upgrade_keep_counting_once(database_url: str) -> None:
    engine = build_engine(load_settings(database_url=database_url))
    migrate(engine, "0002")
    start = datetime(2026, 11, 1, tzinfo=UTC)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO unique_values (customer_id, meter, window_start, value) "
                "VALUES ('c', 'active_users', :start, 'u1'), ('c', 'active_users', :start, 'u2')"
            ),
            {"start": start if engine.dialect.name == "postgresql" else "2026-11-01 00:00:00"},
        )
    migrate(engine)
    messages = [
        _foreign(i, type="active_users", data={"value": "1", "properties": {"user_id": u}})
        for i, u in enumerate(["u1", "u2", "u3"])
    ]
    _applier(engine).apply(messages)
    [(value, _events)] = stored_totals(engine).values()
    assert value == Decimal(1)  # u1 and u2 were already counted in this window
    engine.dispose()
