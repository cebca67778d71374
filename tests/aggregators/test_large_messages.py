"""A message far beyond the SDK's size limit (a foreign producer's) is parked as ``too_large``
and never stops the worker; the dead-letter topic gets a bounded copy, the table the whole."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

from confluent_kafka import Producer
from sqlalchemy import select

from aggregators.app import split_by_bytes
from aggregators.dead_letter_topic import DEAD_LETTER_VALUE_BYTES
from meterstream.events import UsageEvent, encode_event
from meterstream.kafka import client_config
from meterstream.lag import consumer_lag
from meterstream.schema import rejected_events
from meterstream.settings import Settings
from tests.aggregators.test_worker import migrated
from tests.aggregators.workers import events_applied, wait_until, worker
from tests.conftest import read_topic

ONE_MEGABYTE = 1_000_000  # what a broker takes by default, and faust's producer does not


def _event(event_id: str) -> bytes:
    now = datetime.now(UTC) - timedelta(minutes=1)
    return encode_event(UsageEvent(event_id, "s", "c", "tokens", Decimal(1), now))


def _nothing_behind(settings: Settings) -> bool:
    lag = consumer_lag(settings.kafka_bootstrap, settings.consumer_group, settings.topic)
    return bool(lag) and not any(lag.values())


def test_a_one_megabyte_message_is_parked_and_the_worker_goes_on(
    settings_factory: Callable[..., Settings],
    topic_factory: Callable[..., str],
    postgres_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(topic=topic_factory(1), database_url=postgres_url)
    engine = migrated(settings)
    producer = Producer({**client_config(settings.kafka_bootstrap), "message.max.bytes": 1_100_000})
    huge = b"x" * ONE_MEGABYTE
    producer.produce(settings.topic, _event("before"), b"c")
    producer.produce(settings.topic, huge, b"c")
    assert producer.flush(10) == 0
    with worker(settings, tmp_path / "worker.log"):
        wait_until(lambda: events_applied(engine) >= 1, 60, "the event before the large one")
        producer.produce(settings.topic, _event("after"), b"c")
        assert producer.flush(10) == 0
        wait_until(lambda: events_applied(engine) >= 2, 60, "the event after the large one")
        # A batch is acknowledged only after its dead letters are confirmed (the next one may
        # be applied meanwhile): the group's offset at the end means the worker went past.
        wait_until(lambda: _nothing_behind(settings), 60, "the group's offsets at the end")
        [letter] = read_topic(settings.kafka_bootstrap, f"{settings.topic}.dlq", 1)
    headers = dict(letter.headers())
    assert headers["meterstream.reason"] == b"too_large"
    assert (headers["meterstream.size"], headers["meterstream.truncated"]) == (b"1000000", b"1")
    assert letter.value() == huge[:DEAD_LETTER_VALUE_BYTES]
    with engine.connect() as connection:
        [row] = connection.execute(select(rejected_events.c.reason, rejected_events.c.raw)).all()
    assert row.reason == "too_large"
    assert row.raw == huge  # the replay reads the whole message from here
    engine.dispose()


def test_a_batch_is_split_by_the_bytes_of_its_values() -> None:
    events = [SimpleNamespace(value=b"x" * size) for size in (40, 40, 30, 100, 10, 0)]
    parts = split_by_bytes(events, 100)
    assert [[len(e.value) for e in part] for part in parts] == [[40, 40], [30], [100], [10, 0]]
    assert [e for part in parts for e in part] == events  # nothing lost, order kept
