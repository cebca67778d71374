"""The Kafka side of the SDK: an idempotent producer, back-pressure and delivery tracking.

One background thread serves the delivery reports, so ``record()`` never waits on the network.
Only failures reach Python (``delivery.report.only.error``, which confluent-kafka applies in its
C layer): a Python callback per acknowledged message would cost every caller about a
microsecond through the GIL. What was delivered is counted instead as produced - failed - still
in flight, and the produce latency is read from librdkafka's statistics. Failed deliveries are
kept (by event id) until the caller collects them with ``flush()``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer

from meterstream.errors import (
    BackpressureError,
    BrokerUnavailableError,
    ClientClosedError,
    UndeliveredEvent,
)
from meterstream.kafka import client_config
from meterstream.metrics import IngestMetrics
from meterstream.settings import Settings

_log = logging.getLogger(__name__)

DeliveryFailedCallback = Callable[[str, str], None]
"""Called with (event_id, reason) for each accepted event that Kafka refused for good."""

_POLL_S = 0.05
# librdkafka's latency windows (microseconds) that add up to the time from produce() to the ack:
# waiting in the partition queue, waiting in the broker's output buffer, the round trip.
_LATENCY_WINDOWS = ("int_latency", "outbuf_latency", "rtt")
_QUANTILES = {"0.5": "p50", "0.99": "p99"}


class _Owner:
    """Lives only in one thread's thread-local storage: once it is gone, so is the thread."""

    __slots__ = ("__weakref__",)


class ThreadTally:
    """A count that many threads add to without a lock: each thread owns the cell it adds to,
    and only the reader sums the cells (a plain ``+= 1`` shared by threads can lose updates)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._cells: list[tuple[weakref.ref[_Owner], list[int]]] = []
        self._retired = 0

    def cell(self) -> list[int]:
        """The calling thread's cell: add to ``cell()[0]``."""
        try:
            cell: list[int] = self._local.cell
        except AttributeError:
            owner, cell = _Owner(), [0]
            with self._lock:
                self._cells.append((weakref.ref(owner), cell))
            self._local.owner, self._local.cell = owner, cell
        return cell

    def total(self) -> int:
        with self._lock:
            live = []
            for owner, cell in self._cells:
                if owner() is not None:
                    live.append((owner, cell))
                else:  # the thread ended (its locals are gone): fold its cell in, let it go
                    self._retired += cell[0]
            self._cells = live
            return self._retired + sum(cell[0] for _, cell in live)


class EventProducer:
    """Produces encoded events keyed by customer, tracks what Kafka refused for good."""

    def __init__(self, settings: Settings, metrics: IngestMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._topic = settings.topic
        self._block_timeout_s = settings.producer_block_timeout_s
        self._lock = threading.Lock()
        self._failed: list[UndeliveredEvent] = []
        self._fatal: str | None = None
        self._callbacks: list[DeliveryFailedCallback] = []
        self._produced = ThreadTally()
        self._latency_labels: set[str] = set()
        # Written only by the delivery thread; pushed to the metrics after each poll.
        self._failed_count = 0
        self._produced_reported = 0
        self._delivered_reported = 0
        self._producer = Producer(
            {
                **client_config(settings.kafka_bootstrap),
                # Idempotence: librdkafka's retries never write a message twice or out of order.
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": settings.producer_linger_ms,
                "queue.buffering.max.messages": settings.producer_queue_max_events,
                "message.timeout.ms": int(settings.producer_delivery_timeout_s * 1000),
                "compression.type": "lz4",
                "delivery.report.only.error": True,
                "on_delivery": self._on_delivery,
                "error_cb": self._on_error,
                "statistics.interval.ms": int(settings.producer_statistics_interval_s * 1000),
                "stats_cb": self._on_statistics,
            }
        )
        self._running = True
        self.closed = False
        self._abandoned = False
        # Per producer, not per client: a producer whose client was collected lives on (its
        # thread holds it), and freeing it in a child would hang there too.
        producer = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _abandon_after_fork(producer()))
        self._poller = threading.Thread(
            target=self._poll_loop, name="meterstream-delivery", daemon=True
        )
        self._poller.start()

    def add_failure_callback(self, callback: DeliveryFailedCallback) -> None:
        self._callbacks.append(callback)

    @property
    def failure_callbacks(self) -> tuple[DeliveryFailedCallback, ...]:
        return tuple(self._callbacks)

    def produce(self, key: bytes, value: bytes) -> None:
        """Queue one message; blocks up to ``producer_block_timeout_s`` while the queue is full.

        Raises BackpressureError when the queue stays full (the event was not accepted), or
        BrokerUnavailableError after a fatal producer error.
        """
        if self.produce_nowait(key, value):
            return
        deadline = time.monotonic() + self._block_timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.005)  # the delivery thread frees room as acknowledgements arrive
            if self.produce_nowait(key, value):
                return
        raise BackpressureError(
            f"the producer queue ({self._settings.producer_queue_max_events} events) stayed full "
            f"for {self._block_timeout_s:g} s; Kafka at {self._settings.kafka_bootstrap} is not "
            "keeping up. The event was not accepted: retry it, or raise "
            "METERSTREAM_PRODUCER_BLOCK_TIMEOUT_S"
        )

    def produce_nowait(self, key: bytes, value: bytes) -> bool:
        """Queue one message if there is room; False when the queue is full."""
        if self._fatal is not None:
            if self.closed:
                raise ClientClosedError(
                    f"this UsageClient's producer was closed ({self._fatal}); nothing was "
                    "queued: create a new UsageClient"
                )
            raise BrokerUnavailableError(f"the Kafka producer failed for good: {self._fatal}")
        try:
            # No timestamp: Kafka stamps the time of producing, so topic retention counts from
            # now and never deletes a back-dated event before it is aggregated.
            self._producer.produce(self._topic, value, key)
        except BufferError:
            return False
        except KafkaException as exc:
            raise BrokerUnavailableError(f"the Kafka producer refused the event: {exc}") from exc
        self._produced.cell()[0] += 1
        return True

    def in_flight(self) -> int:
        """Messages queued, or acknowledged but with their report not yet served."""
        return len(self._producer) if self._running else 0

    def flush(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` until every queued message is reported; return how many are
        still in flight. The delivery thread serves the reports; this only waits."""
        deadline = time.monotonic() + timeout_s
        while (remaining := self.in_flight()) and time.monotonic() < deadline:
            time.sleep(0.005)
        return remaining

    def take_failures(self) -> list[UndeliveredEvent]:
        """The events that failed since the last call."""
        with self._lock:
            failed, self._failed = self._failed, []
        return failed

    def close(self) -> None:
        """Stop the delivery thread, then give up whatever is still queued: each such message
        is reported as failed, with its id, served here (a purged message may still have
        reached Kafka; sending it again with the same id is safe, the aggregators
        deduplicate). Then release librdkafka, whose statistics would otherwise pile up.
        Safe to call again (a client closed after its exit flush ran)."""
        if self.closed:
            return
        self.closed = True
        self._fatal = self._fatal or "closed"
        self._running = False
        self._poller.join()
        self._producer.purge(in_queue=True, in_flight=True)
        self._producer.close()  # nothing is outstanding now: serves the last reports here
        self._publish_counts(in_flight=0)

    def abandon_after_fork(self) -> None:
        """Runs in a forked child (from a hook registered at creation): this producer's
        librdkafka threads stayed in the parent, which still delivers what it queued.
        Destroying the handle here would wait for those threads forever (a child holding one
        hung at exit), so the child keeps an extra reference to it and never releases it; a
        client makes a new producer for the child. Safe to call again."""
        if self._abandoned:
            return
        self._abandoned = True
        if not self.closed:  # close() already released the handle: nothing to keep
            # Py_IncRef: nothing in the child, interpreter shutdown included, may free it.
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(self._producer))
        self.closed = True
        self._fatal = "made in the parent process before a fork"
        self._running = False

    def _poll_loop(self) -> None:
        while True:
            try:
                self._producer.poll(_POLL_S)
                self._publish_counts()
            except Exception:
                # This thread must outlive any error: it alone serves the failure reports.
                _log.exception("serving the producer's reports failed; carrying on")
            if not self._running:
                return

    def _publish_counts(self, in_flight: int | None = None) -> None:
        """Runs where failures are served (the delivery thread, then close()), so the failed
        count cannot move underneath. Read produced before in flight: a message produced in
        between then makes ``delivered`` smaller for one round, never larger."""
        produced = self._produced.total()
        if in_flight is None:
            in_flight = len(self._producer)
        if produced != self._produced_reported:
            self._metrics.recorded.inc(produced - self._produced_reported)
            self._produced_reported = produced
        delivered = produced - self._failed_count - in_flight
        if delivered > self._delivered_reported:
            self._metrics.delivered.inc(delivered - self._delivered_reported)
            self._delivered_reported = delivered
        self._metrics.queue_depth.set(in_flight)

    def _on_statistics(self, statistics: str) -> None:
        """Produce latency p50/p99 over the last statistics interval, from librdkafka's own
        windows: the slowest broker's queue wait + output-buffer wait + round trip (a sum of
        per-stage quantiles, so an upper estimate of the end-to-end one).

        Runs inside poll(): nothing may escape it, or it would end the delivery thread.
        """
        try:
            brokers = orjson.loads(statistics).get("brokers", {}).values()
            found: dict[str, float] = {}
            for broker in brokers:
                windows = [broker.get(name, {}) for name in _LATENCY_WINDOWS]
                if broker.get("nodeid", -1) < 0 or not windows[0].get("cnt"):
                    continue  # a bootstrap entry, or a broker that took no message lately
                for label, key in _QUANTILES.items():
                    seconds = sum(window.get(key, 0) for window in windows) / 1_000_000
                    found[label] = max(found.get(label, 0.0), seconds)
            latency = self._metrics.produce_latency
            for label in _QUANTILES:
                if label in found:
                    latency.labels(label).set(found[label])
                    self._latency_labels.add(label)
                elif label in self._latency_labels:
                    # Nothing produced in the interval: no figure rather than an old one.
                    latency.remove(label)
                    self._latency_labels.discard(label)
        except Exception:
            _log.warning(
                "could not read the produce latency from librdkafka's statistics", exc_info=True
            )

    def _on_delivery(self, error: KafkaError | None, message: Any) -> None:
        # Only failures reach here (delivery.report.only.error).
        if error is None:
            return
        self._failed_count += 1
        payload: bytes = message.value() or b""
        event_id = _event_id_of(payload)
        reason = error.str()
        self._metrics.failed.inc()
        with self._lock:
            self._failed.append(UndeliveredEvent(event_id, reason, message.key() or b"", payload))
        for callback in self._callbacks:
            try:
                callback(event_id, reason)
            except Exception:
                # A caller's callback must not stop delivery reports; the failure stays
                # recorded for flush() and in the metric.
                _log.exception(
                    "delivery-failure callback raised for event %s",
                    event_id,
                    extra={"event_id": event_id},
                )

    def _on_error(self, error: KafkaError) -> None:
        # Fatal errors (e.g. the idempotent producer lost its sequence) end this producer; the
        # queued messages then fail through _on_delivery, so none is lost in silence.
        if error.fatal():
            self._fatal = error.str()


def _abandon_after_fork(producer: EventProducer | None) -> None:
    if producer is not None:
        producer.abandon_after_fork()


def _event_id_of(value: bytes | None) -> str:
    try:
        doc = orjson.loads(value or b"{}")
        return str(doc.get("id", "?"))
    except Exception:  # the failure is recorded all the same, with its bytes
        return "?"
