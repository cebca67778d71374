"""UsageClient against the real broker: round trip, validation, failures, threads, asyncio."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from aggregators.intake import Accepted, Clock, admit
from ingest import (
    AsyncUsageClient,
    BackpressureError,
    ClientClosedError,
    DeliveryError,
    InvalidUsageEvent,
    UsageClient,
)
from meterstream.embedded import embedded_broker, free_port
from meterstream.kafka import end_offsets
from meterstream.meters import parse_catalogue
from meterstream.settings import Settings
from tests.conftest import read_topic

SettingsFactory = Callable[..., Settings]


def test_thousands_of_events_round_trip_field_by_field(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str]
) -> None:
    settings = settings_factory(topic=topic_factory(8), source="billing-api")
    now = datetime.now(UTC)
    sent: dict[str, dict[str, Any]] = {}
    with UsageClient(settings) as client:
        for i in range(5_000):
            customer = f"customer-{i % 97}"
            value = Decimal(i) / 100
            event_time = now - timedelta(seconds=i)
            properties = {"region": "eu" if i % 2 else "us", "user_id": f"u{i % 13}"}
            event_id = client.record(
                customer, "tokens", value, timestamp=event_time, properties=properties
            )
            sent[event_id] = {
                "customer": customer,
                "value": value,
                "time": event_time,
                "props": properties,
            }
        assert client.flush(30) == 0

    messages = read_topic(settings.kafka_bootstrap, settings.topic, len(sent))
    assert sum(end_offsets(settings.kafka_bootstrap, settings.topic).values()) == len(sent)
    seen = set()
    for message in messages:
        doc = orjson.loads(message.value())
        want = sent[doc["id"]]
        seen.add(doc["id"])
        assert message.key() == want["customer"].encode()
        assert doc["specversion"] == "1.0"
        assert doc["source"] == "billing-api"
        assert doc["type"] == "tokens"
        assert doc["subject"] == want["customer"]
        assert datetime.fromisoformat(doc["time"]) == want["time"]
        assert doc["time"].endswith("Z")
        assert isinstance(doc["data"]["value"], str)
        assert Decimal(doc["data"]["value"]) == want["value"]
        assert doc["data"]["properties"] == want["props"]
    assert seen == set(sent)


def test_one_customer_stays_on_one_partition(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str]
) -> None:
    settings = settings_factory(topic=topic_factory(8))
    with UsageClient(settings) as client:
        for _ in range(200):
            client.record("customer-a", "api_calls")
            client.record("customer-b", "api_calls")
    partitions: dict[bytes, set[int]] = {}
    for message in read_topic(settings.kafka_bootstrap, settings.topic, 400):
        partitions.setdefault(message.key(), set()).add(message.partition())
    assert {key: len(found) for key, found in partitions.items()} == {
        b"customer-a": 1,
        b"customer-b": 1,
    }


def test_kafka_timestamp_is_the_time_of_producing_not_the_event_time(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str]
) -> None:
    settings = settings_factory(topic=topic_factory(1))
    before = datetime.now(UTC)
    with UsageClient(settings) as client:
        client.record("c", "api_calls", timestamp=before - timedelta(days=30))
    [message] = read_topic(settings.kafka_bootstrap, settings.topic, 1)
    _kind, millis = message.timestamp()
    produced = datetime.fromtimestamp(millis / 1000, UTC)
    assert produced >= before - timedelta(seconds=1)


def test_given_event_id_is_kept_and_returned(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str]
) -> None:
    settings = settings_factory(topic=topic_factory(1))
    with UsageClient(settings) as client:
        assert client.record("c", "api_calls", event_id="order-17/line-3") == "order-17/line-3"
    [message] = read_topic(settings.kafka_bootstrap, settings.topic, 1)
    assert orjson.loads(message.value())["id"] == "order-17/line-3"


@pytest.mark.parametrize(
    ("kwargs", "field", "reason"),
    [
        ({"meter": "no_such_meter"}, "meter", "unknown meter 'no_such_meter'"),
        ({"customer": ""}, "customer", "must be a non-empty string"),
        ({"customer": "x" * 201}, "customer", "at most 200 characters"),
        ({"value": Decimal("NaN")}, "value", "must be a finite number"),
        ({"value": Decimal("Infinity")}, "value", "must be a finite number"),
        ({"value": 1.5}, "value", "must be a Decimal, an int or a decimal string"),
        ({"value": True}, "value", "must be a Decimal, an int or a decimal string"),
        ({"value": "twelve"}, "value", "not a plain decimal number"),
        ({"value": "1_000"}, "value", "not a plain decimal number"),
        ({"customer": "cus\x00tomer"}, "customer", "must not contain control characters"),
        ({"properties": {"k": "v\x00"}}, "properties.k", "must not contain control characters"),
        (
            {"value": Decimal("1234567890123456.1234567890123")},
            "value",
            "at most 12 digits after the point",
        ),
        ({"value": -1}, "value", "must be >= 0 for meter 'tokens'"),
        ({"value": Decimal("1e-13")}, "value", "at most 12 digits after the point"),
        ({"value": 10**18}, "value", "must be below 1e18"),
        ({"value": 10**15}, "value", "Stripe takes at most 15 digits"),
        (
            # METERSTREAM_FUTURE_TOLERANCE_S: 600 s by default, as at the workers.
            {"timestamp": lambda: datetime.now(UTC) + timedelta(minutes=11)},
            "timestamp",
            "more than 600 s ahead",
        ),
        (
            {"timestamp": lambda: datetime.now(UTC) - timedelta(days=36)},
            "timestamp",
            "older than 35 days",
        ),
        ({"timestamp": datetime(2026, 11, 1)}, "timestamp", "must be timezone-aware"),
        ({"properties": {"k": 1}}, "properties.k", "must be a string"),
        ({"properties": {"k": "v" * 1025}}, "properties.k", "at most 1024 characters"),
        ({"properties": {"": "v"}}, "properties", "keys must be strings of 1 to 64"),
        ({"properties": {f"k{i}": "v" for i in range(101)}}, "properties", "at most 100 entries"),
        ({"event_id": ""}, "event_id", "must be a string of 1 to 200 characters"),
        ({"meter": "active_users", "properties": {}}, "properties.user_id", "it is missing"),
    ],
)
def test_invalid_event_names_the_field_and_reason_and_sends_nothing(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    kwargs: dict[str, Any],
    field: str,
    reason: str,
) -> None:
    settings = settings_factory(topic=topic_factory(1))
    # Times relative to now are computed now, not when the module was imported.
    given = {key: value() if callable(value) else value for key, value in kwargs.items()}
    call: dict[str, Any] = {"customer": "c", "meter": "tokens", "value": 1, **given}
    with UsageClient(settings) as client:
        with pytest.raises(InvalidUsageEvent) as caught:
            client.record(call.pop("customer"), call.pop("meter"), **call)
        assert caught.value.field == field
        assert reason in caught.value.reason
        assert str(caught.value).startswith(f"{field}: ")
        metric = client.metrics.rejected.labels(field.split(".")[0])._value.get()
        assert metric == 1
        client.record("c", "api_calls")  # the client still works after a rejection
    assert sum(end_offsets(settings.kafka_bootstrap, settings.topic).values()) == 1


def test_event_over_64_kib_is_refused(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str]
) -> None:
    settings = settings_factory(topic=topic_factory(1))
    with UsageClient(settings) as client:
        client.record("c", "tokens", 1, properties={f"k{i:02d}": "v" * 1000 for i in range(60)})
        with pytest.raises(InvalidUsageEvent) as caught:
            client.record("c", "tokens", 1, properties={f"k{i:02d}": "v" * 1000 for i in range(70)})
    assert caught.value.field == "event"
    assert "at most 65536 allowed" in caught.value.reason
    assert sum(end_offsets(settings.kafka_bootstrap, settings.topic).values()) == 1


def test_many_threads_recording_at_once_lose_and_duplicate_nothing(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str]
) -> None:
    settings = settings_factory(topic=topic_factory(8))
    ids: list[list[str]] = [[] for _ in range(8)]
    with UsageClient(settings) as client:

        def work(slot: int) -> None:
            for i in range(2_000):
                ids[slot].append(client.record(f"customer-{slot}-{i % 10}", "api_calls"))

        threads = [threading.Thread(target=work, args=(slot,)) for slot in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert client.flush(30) == 0
    # The delivery thread publishes the counts; after close() they are final.
    assert client.metrics.recorded._value.get() == 16_000
    assert client.metrics.delivered._value.get() == 16_000
    recorded = [event_id for slot in ids for event_id in slot]
    messages = read_topic(settings.kafka_bootstrap, settings.topic, len(recorded))
    assert sorted(orjson.loads(m.value())["id"] for m in messages) == sorted(recorded)
    assert sum(end_offsets(settings.kafka_bootstrap, settings.topic).values()) == 16_000


def test_async_client_records_without_blocking_the_loop(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str]
) -> None:
    settings = settings_factory(topic=topic_factory(4))

    async def run() -> list[str]:
        async with AsyncUsageClient(settings) as client:
            return [await client.record(f"c{i % 5}", "tokens", i) for i in range(500)]

    recorded = asyncio.run(run())
    messages = read_topic(settings.kafka_bootstrap, settings.topic, len(recorded))
    assert sorted(orjson.loads(m.value())["id"] for m in messages) == sorted(recorded)


def test_broker_stopped_mid_stream_reports_every_undelivered_id(
    settings_factory: SettingsFactory,
) -> None:
    with embedded_broker(topics={"usage": 4}) as broker:
        settings = settings_factory(
            kafka_bootstrap=broker.bootstrap, topic="usage", producer_delivery_timeout_s=3
        )
        client = UsageClient(settings)
        failures: list[str] = []
        client.on_delivery_failed(lambda event_id, _reason: failures.append(event_id))
        delivered = [client.record(f"c{i % 7}", "api_calls") for i in range(1_000)]
        assert client.flush(30) == 0
        messages = read_topic(broker.bootstrap, "usage", len(delivered))
        assert sorted(orjson.loads(m.value())["id"] for m in messages) == sorted(delivered)
    # The broker is gone (and with it everything it held); the client keeps accepting.
    stranded = [client.record(f"c{i % 7}", "api_calls") for i in range(500)]
    with pytest.raises(DeliveryError) as caught:
        client.flush(30)
    assert sorted(caught.value.event_ids) == sorted(stranded)
    assert sorted(failures) == sorted(stranded)
    client.close(timeout=1)
    assert client.metrics.failed._value.get() == 500
    assert client.metrics.delivered._value.get() == 1_000
    assert client.metrics.recorded._value.get() == 1_500


def test_full_queue_blocks_then_raises_and_never_drops_what_it_accepted(
    settings_factory: SettingsFactory,
) -> None:
    # Nothing listens on this port: every accepted event stays queued.
    settings = settings_factory(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        producer_queue_max_events=10,
        producer_block_timeout_s=0.2,
    )
    client = UsageClient(settings)
    accepted = [client.record("c", "api_calls") for _ in range(10)]
    with pytest.raises(BackpressureError, match=r"stayed full for 0\.2 s"):
        client.record("c", "api_calls")
    with pytest.raises(DeliveryError) as caught:
        client.close(timeout=0.5)
    assert sorted(caught.value.event_ids) == sorted(accepted)
    assert client.metrics.recorded._value.get() == 10
    assert client.metrics.failed._value.get() == 10
    assert client.metrics.delivered._value.get() == 0


def test_record_after_close_is_a_named_error_and_queues_nothing(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str]
) -> None:
    settings = settings_factory(topic=topic_factory())
    client = UsageClient(settings)
    client.close()
    with pytest.raises(ClientClosedError, match="create a new UsageClient"):
        client.record("customer-1", "api_calls")
    assert sum(end_offsets(settings.kafka_bootstrap, settings.topic).values()) == 0


def test_a_missing_dimension_is_refused_naming_it_and_the_value_goes_where_the_meter_reads_it(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str]
) -> None:
    settings = settings_factory(topic=topic_factory(1))
    catalogue = parse_catalogue(
        {
            "meters": {
                "llm": {
                    "aggregation": "sum",
                    "window": "1h",
                    "value_property": "tokens",
                    "dimensions": ["model", "region"],
                    "dimension_defaults": {"region": "global"},
                }
            }
        }
    )
    with UsageClient(settings, catalogue=catalogue) as client:
        with pytest.raises(InvalidUsageEvent) as caught:
            client.record("c", "llm", 5, properties={"region": "eu"})
        assert caught.value.field == "properties.model"
        with pytest.raises(InvalidUsageEvent) as caught:
            client.record("c", "llm", 5, properties={"model": "x" * 201})
        assert caught.value.field == "properties.model"
        assert client.metrics.rejected.labels("properties")._value.get() == 2
        client.record("c", "llm", 5, properties={"model": "m1"})
        assert client.flush(30) == 0
    (message,) = read_topic(settings.kafka_bootstrap, settings.topic, 1)
    clock = Clock(datetime.now(UTC), 600.0, 35)
    outcome = admit(message.value(), catalogue, clock=clock, produced=None)
    assert isinstance(outcome, Accepted)
    assert outcome.event.value == 5
    assert outcome.combination == '{"model":"m1","region":"global"}'
