"""A message far beyond the SDK's size limit (a foreign producer's) is parked as ``too_large``
and never stops the worker; the dead-letter topic gets a bounded copy, the table the whole."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError
from confluent_kafka import Producer
from faust.exceptions import ProducerSendError
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from aggregators.app import split_by_bytes
from aggregators.batch import BatchResult, Message, Rejected
from aggregators.dead_letter_topic import DEAD_LETTER_VALUE_BYTES, DeadLetterSender
from aggregators.intake import Rejection
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
    events = [
        SimpleNamespace(value=b"x" * size, message=SimpleNamespace(headers=None))
        for size in (40, 40, 30, 100, 10, 0)
    ]
    parts = split_by_bytes(events, 100)
    assert [[len(e.value) for e in part] for part in parts] == [[40, 40], [30], [100], [10, 0]]
    assert [e for part in parts for e in part] == events  # nothing lost, order kept


class _RefusingTopic:
    """A dead-letter topic whose broker refuses what ``refuse`` says, as faust reports it
    (ProducerSendError raised from aiokafka's error)."""

    def __init__(self, refuse: Callable[[bytes], KafkaError | None]) -> None:
        self._refuse = refuse
        self.sent: list[bytes] = []

    async def send(
        self, *, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        error = self._refuse(value)
        if error is None:
            self.sent.append(value)
            future.set_result(None)
        else:
            try:
                raise ProducerSendError(f"Error while sending: {error!r}") from error
            except ProducerSendError as wrapped:
                future.set_exception(wrapped)
        return future


_UNSENT = "meterstream_aggregator_dead_letters_unsent_total"


def _result(*values: bytes) -> BatchResult:
    rejected = [
        Rejected(Message("usage", 0, offset, value), Rejection("unparseable", "x"))
        for offset, value in enumerate(values)
    ]
    return BatchResult(rejected=rejected)


def test_a_dead_letter_refused_for_good_is_counted_and_the_others_sent() -> None:
    topic = _RefusingTopic(lambda v: MessageSizeTooLargeError() if v == b"big" else None)
    registry = CollectorRegistry()
    sender = DeadLetterSender(topic, registry)
    asyncio.run(sender.send_once(_result(b"a", b"big", b"b")))  # does not raise
    assert topic.sent == [b"a", b"b"]
    assert registry.get_sample_value(_UNSENT, {"reason": "unparseable"}) == 1


def test_a_dead_letter_refused_for_now_is_raised_to_be_sent_again() -> None:
    topic = _RefusingTopic(lambda v: KafkaTimeoutError() if v == b"late" else None)
    registry = CollectorRegistry()
    sender = DeadLetterSender(topic, registry)
    with pytest.raises(ProducerSendError):
        asyncio.run(sender.send_once(_result(b"a", b"late")))
    assert registry.get_sample_value(_UNSENT, {"reason": "unparseable"}) is None
