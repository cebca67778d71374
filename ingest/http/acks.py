"""The HTTP server's Kafka producer: one request's events, acknowledged all together.

Unlike the SDK's producer, which hands failures back later, a request is answered only once
Kafka has reported on every one of its events (idempotent producer, acks=all). librdkafka gives
an event up after ``METERSTREAM_HTTP_PRODUCE_TIMEOUT_S``, so the reports always come in.

Requests take turns on two producers (a group commit). The open turn takes the events of every
request that arrives; once the turn before it is over, it is closed to new events, and when its
producer has nothing left in flight (``len(producer) == 0``: every event reported on) all its
requests are answered together. Only failed deliveries reach Python
(``delivery.report.only.error``): a failure during a turn answers every request of the turn 503
(a client sends it again; the workers count a re-sent event once), and that producer is not used
again. A Python callback per acknowledged event cost the event loop about 1.2 us per event
(measured with bench/http.py and with the producer alone).

The reports are served by a task on the server's event loop, not by a thread: librdkafka takes
the GIL for every event's report (even when only failures reach Python), so a thread would take
it from the event loop once per event.
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
# While a turn is out, librdkafka is asked for its reports every millisecond; when idle, every
# 50 ms (for its error callbacks) or as soon as a request produces.
_BUSY_POLL_S = 0.001
_IDLE_POLL_S = 0.05
# Beyond librdkafka's own timeout, how long a request waits for the reports it is owed.
_REPORT_MARGIN_S = 5.0


class _Kafka:
    """One librdkafka producer and the first failure it reported since it was made."""

    __slots__ = ("failure", "fatal", "producer")

    def __init__(self, config: dict[str, Any]) -> None:
        self.failure: str | None = None
        self.fatal: str | None = None  # librdkafka's word that this producer is done for
        self.producer = Producer(
            {
                **config,
                # Only failures reach _on_failed: success is read from the producer's count.
                "delivery.report.only.error": True,
                "on_delivery": self._on_failed,
                "error_cb": self._on_error,
            }
        )

    def owed(self) -> int:
        """Events (and reports) librdkafka still holds: 0 once every event was reported on."""
        return len(self.producer)

    def _on_failed(self, error: KafkaError, _message: Any) -> None:
        if self.failure is None:
            self.failure = error.str()

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self.fatal = error.str()
            self.failure = self.failure or f"the producer failed for good: {error.str()}"
            _log.error("the HTTP server's Kafka producer failed for good: %s", error.str())


class _Turn:
    """The requests whose events went to one producer since it was last drained."""

    __slots__ = ("kafka", "started", "waiters")

    def __init__(self, kafka: _Kafka) -> None:
        self.kafka = kafka
        self.started = 0.0  # monotonic time of the first produce, 0 while it has none
        self.waiters: list[asyncio.Future[str | None]] = []

    def answer(self, failure: str | None) -> None:
        """Wake each request of the turn with the turn's failure (None: all acknowledged)."""
        for waiter in self.waiters:
            if not waiter.done():  # a request cancelled (client gone) stopped waiting
                waiter.set_result(failure)
        self.waiters = []


class RequestProducer:
    """Produces the events of one request and waits until Kafka acknowledged each of them."""

    def __init__(self, settings: Settings, metrics: HttpMetrics) -> None:
        self._topic = settings.topic
        self._metrics = metrics
        self._timeout_s = settings.http_produce_timeout_s
        self._capacity = settings.producer_queue_max_events
        self._config = {
            **client_config(settings.kafka_bootstrap),
            # Idempotence: librdkafka's retries never write an event twice or out of order.
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": settings.http_linger_ms,
            "queue.buffering.max.messages": settings.producer_queue_max_events,
            "message.timeout.ms": int(settings.http_produce_timeout_s * 1000),
            "compression.type": "lz4",
        }
        self._open = _Turn(_Kafka(self._config))
        self._closing: _Turn | None = None  # closed to new events, waiting to drain
        self._spare: list[_Kafka] = []  # drained without a failure: the next turn's
        # Producers of failed turns, polled until the reports they owe have come in.
        self._retired: list[_Kafka] = []
        self._reports: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def produce_all(self, messages: Sequence[tuple[bytes, bytes]]) -> None:
        """Produce ``(key, value)`` pairs; return once Kafka acknowledged all of them.

        Raises KafkaNotAcknowledgedError when the queue has no room for all of them (then none
        was produced), or when any event of the request's turn was not acknowledged in time
        (others may have been: the workers count a retried request once).
        """
        if self._open.kafka.failure is not None:
            self._close_turn()  # no more events for a producer that failed
        owed = self._owed()
        # The check and the produce() calls below run without an await between them, so no
        # other request of this event loop can take the room in between.
        if owed + len(messages) > self._capacity:
            raise KafkaNotAcknowledgedError(
                f"{owed} events are waiting for Kafka already "
                "(METERSTREAM_PRODUCER_QUEUE_MAX_EVENTS); none of this request was produced"
            )
        loop = asyncio.get_running_loop()
        if self._reports is None:
            self._reports = loop.create_task(self._serve_reports())
        turn = self._open
        produce, topic = turn.kafka.producer.produce, self._topic
        started = time.perf_counter()
        turn.started = turn.started or time.monotonic()
        try:
            for key, value in messages:
                produce(topic, value, key)
        except BufferError as exc:
            raise KafkaNotAcknowledgedError(f"the Kafka producer's queue is full: {exc}") from exc
        except KafkaException as exc:
            # librdkafka refused at once (a producer failed for good before its error callback
            # was served, say): a 503 the client retries, never a 500 it may not. The turn
            # fails with it; events queued before the refusal may still arrive (counted once).
            turn.kafka.failure = turn.kafka.failure or f"Kafka refused the events: {exc}"
            raise KafkaNotAcknowledgedError(f"Kafka refused the events: {exc}") from None
        finally:
            self._wake.set()  # close the turn now if it may be, not at the idle poll's next turn
        waiter: asyncio.Future[str | None] = loop.create_future()
        turn.waiters.append(waiter)
        # No timer per request: the reports task answers a turn that outlives its deadline.
        failure = await waiter
        if failure is not None:
            raise KafkaNotAcknowledgedError(f"Kafka did not acknowledge: {failure}")
        self._metrics.produce_latency.observe(time.perf_counter() - started)

    def check_broker(self, timeout_s: float) -> str | None:
        """None when a broker answers a metadata request for the topic, else why not
        (blocking: call it from a worker thread)."""
        kafka = self._open.kafka
        if kafka.fatal is not None:
            return f"the Kafka producer failed for good: {kafka.fatal}"
        try:
            topics = kafka.producer.list_topics(self._topic, timeout=timeout_s).topics
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
        for turn in (self._open, self._closing):
            if turn is not None:
                turn.answer("the server is stopping")
        return self._owed()

    def _owed(self) -> int:
        return sum(kafka.owed() for kafka in self._producers())

    def _producers(self) -> list[_Kafka]:
        closing = [self._closing.kafka] if self._closing is not None else []
        return [self._open.kafka, *closing, *self._retired]

    def _close_turn(self) -> None:
        """The open turn takes no more events; the next requests go to another producer."""
        if self._closing is not None:
            # Only a failed turn is closed while another drains: it is answered now.
            self._retire(self._open, self._open.kafka.failure or "closed")
        else:
            self._closing = self._open
        self._open = _Turn(self._spare.pop() if self._spare else _Kafka(self._config))

    def _retire(self, turn: _Turn, failure: str) -> None:
        turn.answer(failure)
        if turn.kafka.owed():
            self._retired.append(turn.kafka)
        _say_replaced(failure)

    def _serve_step(self) -> None:
        """Serve every producer's reports; answer the closing turn once it drained (or failed
        to in time); close the open turn when it holds requests and none is closing."""
        for kafka in self._producers():
            kafka.producer.poll(0)
        self._retired = [kafka for kafka in self._retired if kafka.owed()]
        now = time.monotonic()
        closing = self._closing
        if closing is not None:
            if not closing.kafka.owed():
                self._closing = None
                closing.answer(closing.kafka.failure)
                if closing.kafka.failure is None:
                    self._spare.append(closing.kafka)
                else:
                    _say_replaced(closing.kafka.failure)
            elif self._overdue(closing, now):
                self._closing = None
                self._retire(closing, closing.kafka.failure or "overdue")
        if self._open.waiters and self._overdue(self._open, now):
            self._close_turn()  # waiting behind a closing turn that does not drain
        if self._open.waiters and (self._closing is None or self._open.kafka.failure):
            self._close_turn()
        self._metrics.kafka_queue.set(self._owed())

    def _overdue(self, turn: _Turn, now: float) -> bool:
        """Whether ``turn`` outlived librdkafka's own timeout and the margin; then it fails."""
        limit_s = self._timeout_s + _REPORT_MARGIN_S
        if now <= turn.started + limit_s:
            return False
        turn.kafka.failure = turn.kafka.failure or (
            f"Kafka did not report on {turn.kafka.owed()} events in {limit_s:g} s"
        )
        return True

    async def _serve_reports(self) -> None:
        """Serve delivery reports on the event loop; answer each turn once it drained."""
        while True:
            try:
                self._serve_step()
            except Exception:
                # This task must outlive any error: it alone answers the requests.
                _log.exception("serving the HTTP producer's reports failed; carrying on")
            if self._closing is not None or self._retired or self._open.waiters:
                await asyncio.sleep(_BUSY_POLL_S)
            else:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), _IDLE_POLL_S)


def _say_replaced(failure: str) -> None:
    _log.warning("Kafka failed a request: %s; its producer is replaced by a new one", failure)
