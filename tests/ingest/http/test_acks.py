"""The HTTP server's producer (ingest/http/acks.py) with real librdkafka: a request the queue
has no room for is refused whole, while another request's events wait for Kafka; requests
taking turns are answered only once Kafka acknowledged their turn, and all fail with it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable

import pytest

from ingest.http.acks import RequestProducer
from meterstream.embedded import embedded_broker
from meterstream.errors import KafkaNotAcknowledgedError
from meterstream.kafka import end_offsets
from meterstream.metrics import HttpMetrics
from meterstream.settings import Settings


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_a_request_the_queue_has_no_room_for_is_refused_whole_while_another_waits(
    settings_factory: Callable[..., Settings],
) -> None:
    # No broker answers, so the first request's 60 events stay queued.
    settings = settings_factory(
        kafka_bootstrap=f"127.0.0.1:{_closed_port()}",
        producer_queue_max_events=100,
        http_max_batch_events=100,
        http_produce_timeout_s=30.0,
    )

    async def scenario() -> None:
        producer = RequestProducer(settings, HttpMetrics())
        waiting = asyncio.create_task(producer.produce_all([(b"c", b"{}")] * 60))
        await _until(lambda: producer._owed() >= 60)  # the first request queued its events
        with pytest.raises(KafkaNotAcknowledgedError, match="none of this request was produced"):
            await producer.produce_all([(b"c", b"{}")] * 60)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # The refused request added none: 60 queued, not 120 (librdkafka's count may add a
        # request or two of its own, such as the idempotent producer's id request).
        assert 60 <= await producer.close(0.0) < 120

    asyncio.run(scenario())


def test_an_event_librdkafka_refuses_at_once_is_a_503_not_a_server_error(
    settings_factory: Callable[..., Settings],
) -> None:
    # produce() raises KafkaException (here: a value over message.max.bytes; in production, a
    # producer failed for good before its error callback ran): that used to escape as a 500.
    settings = settings_factory(kafka_bootstrap=f"127.0.0.1:{_closed_port()}")

    async def scenario() -> None:
        producer = RequestProducer(settings, HttpMetrics())
        with pytest.raises(KafkaNotAcknowledgedError, match="Kafka refused the events"):
            await producer.produce_all([(b"c", b"x" * 2_000_000)])
        await producer.close(0.0)

    asyncio.run(scenario())


def test_a_failure_during_a_turn_answers_every_request_of_the_turn_503(
    settings_factory: Callable[..., Settings],
) -> None:
    # Requests take turns on two producers; success is read from a producer's count, so one
    # failed event must fail every request whose events share its turn.
    settings = settings_factory(
        kafka_bootstrap=f"127.0.0.1:{_closed_port()}", http_produce_timeout_s=30.0
    )

    async def scenario() -> None:
        producer = RequestProducer(settings, HttpMetrics())
        first = asyncio.create_task(producer.produce_all([(b"c", b"{}")]))
        # Its turn is closed; it waits for a broker that never answers.
        await _until(lambda: producer._closing is not None and bool(producer._closing.waiters))
        second = asyncio.create_task(producer.produce_all([(b"c", b"{}")] * 3))
        await _until(lambda: bool(producer._open.waiters))  # the next turn holds the second
        with pytest.raises(KafkaNotAcknowledgedError, match="Kafka refused the events"):
            await producer.produce_all([(b"c", b"x" * 2_000_000)])  # the same turn, refused
        with pytest.raises(KafkaNotAcknowledgedError, match="Kafka refused the events"):
            await asyncio.wait_for(second, 10)
        assert not first.done()  # another turn: still waiting
        first.cancel()
        await producer.close(0.0)

    asyncio.run(scenario())


def test_no_request_is_answered_while_kafka_is_frozen_and_all_are_once_it_is_back(
    settings_factory: Callable[..., Settings],
) -> None:
    # Turns alternate between two producers while requests keep coming: none may be answered
    # before Kafka acknowledged its events, whichever turn it fell in.
    with embedded_broker(topics={"acks-frozen": 4}) as broker:
        settings = settings_factory(
            kafka_bootstrap=broker.bootstrap, topic="acks-frozen", http_produce_timeout_s=60.0
        )

        async def scenario() -> None:
            producer = RequestProducer(settings, HttpMetrics())
            await producer.produce_all([(b"warm", b"{}")])  # connected, producer id granted
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                requests = []
                for number in range(30):
                    size = 1 + number * 7 % 50
                    batch = [(f"c{i}".encode(), b"{}") for i in range(size)]
                    requests.append(asyncio.create_task(producer.produce_all(batch)))
                    await asyncio.sleep(0.01)
                await asyncio.sleep(1.0)
                assert not any(request.done() for request in requests)
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            await asyncio.wait_for(asyncio.gather(*requests), 60)
            assert await producer.close(5.0) == 0
            expected = 1 + sum(1 + number * 7 % 50 for number in range(30))
            assert sum(end_offsets(broker.bootstrap, "acks-frozen").values()) == expected

        asyncio.run(scenario())


def test_the_http_producer_lingers_as_long_as_its_own_setting_says(
    settings_factory: Callable[..., Settings], topic_factory: Callable[..., str]
) -> None:
    # METERSTREAM_HTTP_LINGER_MS, not the SDK's METERSTREAM_PRODUCER_LINGER_MS, holds a
    # request's events back: with 10 s, nothing reaches Kafka (nor is answered) within a second.
    settings = settings_factory(
        topic=topic_factory(),
        http_linger_ms=10_000,
        http_produce_timeout_s=30.0,
        producer_linger_ms=0,
    )

    async def scenario() -> None:
        producer = RequestProducer(settings, HttpMetrics())
        request = asyncio.create_task(producer.produce_all([(b"c", b"{}")] * 5))
        await asyncio.sleep(1.0)
        assert not request.done()
        assert sum(end_offsets(settings.kafka_bootstrap, settings.topic).values()) == 0
        request.cancel()
        await producer.close(0.0)

    asyncio.run(scenario())


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Let the event loop run until ``condition`` holds (fails after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)
