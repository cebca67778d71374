"""The HTTP server's Kafka producer: one request's events, acknowledged all together.

Unlike the SDK's producer, which hands failures back later, a request is answered only once
Kafka has reported on every one of its events (idempotent producer, acks=all). librdkafka gives
an event up after ``METERSTREAM_HTTP_PRODUCE_TIMEOUT_S``, so the reports of a request always come
in; one callback per event counts them down and wakes the request once.

The reports are served by a task on the server's event loop, not by a thread: a thread would
take the GIL from the event loop for every report (measured: bench/http.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from meterstream.errors import KafkaNotAcknowledgedError
from meterstream.kafka import client_config
from meterstream.metrics import HttpMetrics
from meterstream.settings import Settings

_log = logging.getLogger(__name__)
# While reports are owed, librdkafka is asked for them every millisecond; when idle, every 50 ms
# (for its error callbacks) or as soon as a request produces.
_BUSY_POLL_S = 0.001
_IDLE_POLL_S = 0.05
# Beyond librdkafka's own timeout, how long a request waits for the reports it is owed.
_REPORT_MARGIN_S = 5.0


class _RequestAcks:
    """Counts down one request's delivery reports (served on the event loop)."""

    __slots__ = ("failure", "future", "remaining")

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop) -> None:
        self.remaining = count
        self.failure: str | None = None
        self.future: asyncio.Future[None] = loop.create_future()

    def on_delivery(self, error: KafkaError | None, _message: Any) -> None:
        if error is not None and self.failure is None:
            self.failure = error.str()
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(None)


class RequestProducer:
    """Produces the events of one request and waits until Kafka acknowledged each of them."""

    def __init__(self, settings: Settings, metrics: HttpMetrics) -> None:
        self._topic = settings.topic
        self._metrics = metrics
        self._timeout_s = settings.http_produce_timeout_s
        self._capacity = settings.producer_queue_max_events
        self._settings = settings
        self._fatal: str | None = None
        self._producer = self._new_producer()
        self._generation = 0
        # What the delivery thread polls: the current producer, then retired ones until the
        # reports they owe have come in. Replaced whole (a tuple), never changed in place.
        self._polled: tuple[Any, ...] = (self._producer,)
        self._reports: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def _new_producer(self) -> Any:
        settings = self._settings
        return Producer(
            {
                **client_config(settings.kafka_bootstrap),
                # Idempotence: librdkafka's retries never write an event twice or out of order.
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": settings.producer_linger_ms,
                "queue.buffering.max.messages": settings.producer_queue_max_events,
                "message.timeout.ms": int(settings.http_produce_timeout_s * 1000),
                "compression.type": "lz4",
                "error_cb": self._on_error,
            }
        )

    def _replace_producer(self, generation: int) -> None:
        """After a request Kafka failed: a fresh producer (a new producer id) for what follows.

        An idempotent producer whose in-flight events timed out may stay fenced or stuck in a
        sequence gap after Kafka comes back; a new one starts clean. Once per generation, so a
        burst of failed requests replaces it once.
        """
        if generation != self._generation:
            return
        self._generation += 1
        self._fatal = None
        retired = self._producer
        self._producer = self._new_producer()
        # Retired producers that owe no report any more are let go here.
        owing = tuple(p for p in self._polled[1:] if len(p))
        self._polled = (self._producer, *owing, retired)
        _log.warning("Kafka failed a request: the HTTP server's producer was replaced by a new one")

    async def produce_all(self, messages: Sequence[tuple[bytes, bytes]]) -> None:
        """Produce ``(key, value)`` pairs; return once Kafka acknowledged all of them.

        Raises KafkaNotAcknowledgedError when the queue has no room for all of them (then none
        was produced), or when any was not acknowledged in time (others may have been: the
        workers count a retried request once).
        """
        if self._fatal is not None:
            self._replace_producer(self._generation)
        producer, generation = self._producer, self._generation
        # The check and the produce() calls below run without an await between them, so no
        # other request of this event loop can take the room in between.
        if len(producer) + len(messages) > self._capacity:
            raise KafkaNotAcknowledgedError(
                f"{len(producer)} events are waiting for Kafka already "
                "(METERSTREAM_PRODUCER_QUEUE_MAX_EVENTS); none of this request was produced"
            )
        if self._reports is None:
            self._reports = asyncio.get_running_loop().create_task(self._serve_reports())
        acks = _RequestAcks(len(messages), asyncio.get_running_loop())
        produce, topic, on_delivery = producer.produce, self._topic, acks.on_delivery
        started = time.perf_counter()
        try:
            for key, value in messages:
                produce(topic, value, key, on_delivery=on_delivery)
        except BufferError as exc:
            raise KafkaNotAcknowledgedError(f"the Kafka producer's queue is full: {exc}") from exc
        except KafkaException as exc:
            # librdkafka refused at once (a producer failed for good before its error callback
            # was served, say): a 503 the client retries, never a 500 it may not. Events queued
            # before the refusal may still arrive; the workers count a retried request once.
            self._replace_producer(generation)
            raise KafkaNotAcknowledgedError(f"Kafka refused the events: {exc}") from None
        finally:
            self._wake.set()  # serve the reports now, not at the idle poll's next turn
        try:
            await asyncio.wait_for(asyncio.shield(acks.future), self._timeout_s + _REPORT_MARGIN_S)
        except TimeoutError:
            self._replace_producer(generation)
            raise KafkaNotAcknowledgedError(
                f"Kafka did not report on {acks.remaining} of {len(messages)} events in "
                f"{self._timeout_s + _REPORT_MARGIN_S:g} s"
            ) from None
        if acks.failure is not None:
            self._replace_producer(generation)
            raise KafkaNotAcknowledgedError(f"Kafka did not acknowledge: {acks.failure}")
        self._metrics.produce_latency.observe(time.perf_counter() - started)

    def check_broker(self, timeout_s: float) -> str | None:
        """None when a broker answers a metadata request for the topic, else why not
        (blocking: call it from a worker thread)."""
        if self._fatal is not None:
            return f"the Kafka producer failed for good: {self._fatal}"
        try:
            topics = self._producer.list_topics(self._topic, timeout=timeout_s).topics
        except Exception as exc:
            return f"Kafka did not answer in {timeout_s:g} s: {exc}"
        found = topics.get(self._topic)
        if found is None or found.error is not None:
            return f"topic {self._topic!r} is not available: {found.error if found else None}"
        return None

    async def close(self, timeout_s: float) -> int:
        """Serve the reports still owed for up to ``timeout_s``, then stop; the number of events
        still unacknowledged (their requests were answered 503)."""
        deadline = time.monotonic() + timeout_s
        while self._owed() and time.monotonic() < deadline:
            await asyncio.sleep(_IDLE_POLL_S)
        if self._reports is not None:
            self._reports.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reports
        return self._owed()

    def _owed(self) -> int:
        return sum(len(producer) for producer in self._polled)

    async def _serve_reports(self) -> None:
        """Serve delivery reports on the event loop: each callback only counts down."""
        while True:
            try:
                polled = self._polled
                served = sum(producer.poll(0) for producer in polled)
                self._metrics.kafka_queue.set(self._owed())
            except Exception:
                # This task must outlive any error: it alone serves the delivery reports.
                _log.exception("serving the HTTP producer's reports failed; carrying on")
                served = 0
            if served:
                await asyncio.sleep(0)  # more may be waiting; let the requests run first
            elif self._owed():
                await asyncio.sleep(_BUSY_POLL_S)
            else:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), _IDLE_POLL_S)

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal = error.str()
            _log.error("the HTTP server's Kafka producer failed for good: %s", error.str())
