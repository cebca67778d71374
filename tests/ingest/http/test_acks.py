"""The HTTP server's producer (ingest/http/acks.py) with real librdkafka: a request the queue
has no room for is refused whole, while another request's events wait for Kafka."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest

from ingest.http.acks import RequestProducer
from meterstream.errors import KafkaNotAcknowledgedError
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
        await asyncio.sleep(0)  # the first request queues its events
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
