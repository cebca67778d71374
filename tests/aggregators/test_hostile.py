"""No single message can stop a worker: hostile input is dead-lettered, good events counted.

Real PostgreSQL and SQLite, the real applying child process, the real worker on the embedded
broker.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer
from sqlalchemy import Engine, insert, select, text
from sqlalchemy.exc import DBAPIError

from aggregators.batch import BatchApplier, Message
from aggregators.dedup import DedupKeys, legacy_dedup_key
from aggregators.pipeline import ApplyPipeline, RawMessage
from aggregators.reference import reference_totals
from meterstream.db import build_engine, migrate
from meterstream.events import MAX_EVENT_BYTES, UsageEvent, encode_event
from meterstream.kafka import client_config
from meterstream.meters import load_catalogue
from meterstream.metrics import AggregatorMetrics
from meterstream.schema import rejected_events, seen_events
from meterstream.settings import Settings, load_settings
from tests.aggregators.test_batch import as_messages, stored_totals
from tests.aggregators.workers import events_applied, wait_until, worker
from tests.conftest import EXAMPLE_METERS, read_topic

SettingsFactory = Callable[..., Settings]


def _raw(offset: int, timestamp_s: float, now: datetime) -> RawMessage:
    event = UsageEvent(f"e{offset}", "s", "c1", "tokens", Decimal(1), now)
    return ("usage", 0, offset, encode_event(event), timestamp_s, ())


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


def _random_emoji(count: int) -> str:
    rng = random.Random(count)
    return "".join(chr(rng.randint(0x1F300, 0x1F64F)) for _ in range(count))


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
    # 1,024 random four-byte characters: 4 KB that do not compress, more than a PostgreSQL
    # btree key holds.
    long_value = _random_emoji(1024)
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


def test_a_message_beyond_the_sdks_size_limit_is_dead_lettered_whole_as_too_large(
    migrated_engine: Engine,
) -> None:
    # Valid in every other way: only its size (an extension attribute a foreign producer
    # added) is beyond what the SDK would ever send.
    big = _foreign(1, padding="x" * MAX_EVENT_BYTES)
    result = _applier(migrated_engine).apply([_foreign(0), big, _foreign(2)])
    assert result.applied == 2
    assert _rejected_reasons(migrated_engine) == [(1, "too_large")]
    with migrated_engine.connect() as connection:
        raw = connection.execute(select(rejected_events.c.raw)).scalar_one()
    assert raw == big.value  # the whole message is kept for a replay, however large


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
            # SQLite: the text SQLAlchemy writes for a datetime.
            {
                "start": start
                if engine.dialect.name == "postgresql"
                else "2026-11-01 00:00:00.000000"
            },
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


def _produce(settings: Settings, messages: list[tuple[bytes, int | None]]) -> None:
    producer = Producer(client_config(settings.kafka_bootstrap))
    for value, timestamp_ms in messages:
        extra = {} if timestamp_ms is None else {"timestamp": timestamp_ms}
        producer.produce(settings.topic, value, b"c", **extra)
    assert producer.flush(10) == 0


def _cloud_event(event_id: str, time: str, meter: str = "tokens", **data: object) -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": event_id,
            "source": "go-service",
            "type": meter,
            "subject": "c",
            "time": time,
            "data": {"value": "1", **data},
        }
    )


def test_a_hostile_stream_is_dead_lettered_and_the_worker_keeps_counting(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    postgres_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(topic=topic_factory(1), database_url=postgres_url)
    engine = build_engine(settings)
    migrate(engine)
    now = datetime.now(UTC)
    now_ms = int(now.timestamp() * 1000)
    at = (now - timedelta(minutes=1)).isoformat()
    long_user = _random_emoji(1024)  # 4 KB: more than a btree key holds
    good = [
        UsageEvent("g1", "go-service", "c", "tokens", Decimal(1), now - timedelta(minutes=1)),
        UsageEvent("g2", "go-service", "c", "tokens", Decimal(1), now - timedelta(minutes=1)),
        UsageEvent(
            "g3",
            "go-service",
            "c",
            "active_users",
            Decimal(1),
            now - timedelta(minutes=1),
            {"user_id": long_user},
        ),
    ]
    hostile = [
        (b"\x00not json at all", None),
        (_cloud_event("h1", "0001-01-01T00:00:00+14:00"), now_ms),
        (_cloud_event("h2", "9999-12-31T23:59:59-14:00"), 2**63 - 1),
        (_cloud_event("h3", at, value="10000000000000000"), now_ms),
        (_cloud_event("h4", at, value=1.5), -1),
        (_cloud_event("h5\x00", at), now_ms),
        (_cloud_event("h" * 300, at), now_ms * 1000),
        (_cloud_event("h7", at, meter="gpu_seconds"), now_ms),
    ]
    _produce(
        settings,
        [
            (encode_event(good[0]), now_ms),
            # Microseconds where milliseconds belong: the timestamp is ignored, the event counts.
            (encode_event(good[1]), now_ms * 1000),
            *hostile,
            (encode_event(good[2]), now_ms),
        ],
    )
    with worker(settings, tmp_path / "worker.log") as process:
        wait_until(lambda: events_applied(engine) >= 3, what="the good events")
        dead = read_topic(settings.kafka_bootstrap, f"{settings.topic}.dlq", len(hostile))
        # Still counting after the hostile stream.
        later = UsageEvent("g4", "go-service", "c", "tokens", Decimal(1), now)
        _produce(settings, [(encode_event(later), None)])
        wait_until(lambda: events_applied(engine) >= 4, what="an event after the hostile ones")
        assert process.poll() is None
    catalogue = load_catalogue(EXAMPLE_METERS)
    assert stored_totals(engine) == reference_totals([*good, later], catalogue)
    reasons = sorted(
        (int(dict(m.headers())["meterstream.offset"]), dict(m.headers())["meterstream.reason"])
        for m in dead
    )
    expected = [
        (2, b"unparseable"),
        (3, b"unparseable"),
        (4, b"unparseable"),
        (5, b"beyond_stripe_digits"),
        (6, b"unparseable"),
        (7, b"unparseable"),
        (8, b"unparseable"),
        (9, b"unknown_meter"),
    ]
    assert reasons == expected
    assert [(o, r.encode()) for o, r in _rejected_reasons(engine)] == expected
    engine.dispose()


def test_an_event_applied_before_the_key_upgrade_and_resent_after_it_counts_once(
    database_url: str,
) -> None:
    engine = build_engine(load_settings(database_url=database_url))
    migrate(engine, "0002")
    t = datetime.now(UTC) - timedelta(hours=1)
    before = UsageEvent("req-1", "api", "c1", "tokens", Decimal(5), t)
    # What a worker before 0003 stored for it: the key of (source, id) on its event day.
    DedupKeys(engine, 35).prepare([t.date()])
    with engine.begin() as connection:
        connection.execute(
            insert(seen_events), [{"event_day": t.date(), "key": legacy_dedup_key("api", "req-1")}]
        )
    migrate(engine)
    target = BatchApplier(
        engine, load_catalogue(EXAMPLE_METERS), AggregatorMetrics(), horizon_days=35
    )
    resent = target.apply(as_messages([before]))
    assert (resent.applied, resent.duplicates) == (0, 1)
    # Around the upgrade, the old key stands for every event of that source and id (as it did
    # before); events of later days are told apart by customer and meter.
    same_day = UsageEvent("req-1", "api", "c1", "api_calls", Decimal(1), t)
    assert target.apply(as_messages([same_day], 1)).applied == 0
    later = t + timedelta(days=3)
    in_three_days = BatchApplier(
        engine,
        load_catalogue(EXAMPLE_METERS),
        AggregatorMetrics(),
        horizon_days=35,
        clock=lambda: later,
    )
    others = [
        UsageEvent("req-1", "api", "c1", "api_calls", Decimal(1), later),
        UsageEvent("req-1", "api", "c2", "tokens", Decimal(1), later),
    ]
    assert in_three_days.apply(as_messages(others, 2)).applied == 2
    engine.dispose()
