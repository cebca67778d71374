"""UsageClient: validate usage events and hand them to Kafka without blocking the caller."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from types import TracebackType
from typing import Self

from ingest.exit_flush import ExitFlush
from ingest.producer import DeliveryFailedCallback, EventProducer
from meterstream.dimensions import read_combination
from meterstream.errors import (
    ClientClosedError,
    DeliveryError,
    InvalidEventError,
    UndeliveredEvent,
)
from meterstream.events import (
    check_customer,
    check_event_id,
    check_event_size,
    check_event_time,
    check_meter,
    check_properties,
    check_stripe_digits,
    check_value,
    encode_fields,
)
from meterstream.meters import Catalogue, load_catalogue
from meterstream.metrics import IngestMetrics
from meterstream.settings import Settings, load_settings

_log = logging.getLogger(__name__)
_EMPTY: Mapping[str, str] = {}


class UsageClient:
    """Records usage events to Kafka: thread-safe, non-blocking, never dropping what it accepted.

    ``record()`` validates the event and queues it; an invalid event raises InvalidEventError
    (``ingest.InvalidUsageEvent``) and nothing is sent. Delivery happens in the background with an
    idempotent producer (acks=all); an event Kafka refuses for good is reported by ``flush()``
    (DeliveryError with the ids), by callbacks from :meth:`on_delivery_failed`, and by the metric
    ``meterstream_ingest_events_failed_total``.

    A client never closed is flushed when the interpreter exits (up to
    ``METERSTREAM_EXIT_FLUSH_TIMEOUT_S``; what is left is logged at ERROR by id). A client made
    before ``os.fork()`` (gunicorn ``--preload``, multiprocessing) makes its own producer in the
    child on first use: librdkafka's threads do not survive a fork.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        catalogue: Catalogue | None = None,
        metrics: IngestMetrics | None = None,
    ) -> None:
        self._settings = settings if settings is not None else load_settings()
        self._catalogue = catalogue or load_catalogue(self._settings.meters_file)
        self.metrics = metrics or IngestMetrics()
        self._source = self._settings.source
        self._horizon_days = self._settings.horizon_days
        self._producer = EventProducer(self._settings, self.metrics)
        self._exit_flush = ExitFlush(self._producer, self._settings.exit_flush_timeout_s)
        self._closed = False
        # True in a forked child until it makes its own producer (see _producer_after_fork).
        self._forked = False
        self._fork_lock = threading.Lock()
        # Generated ids: a random prefix per client and a counter (a getrandom() call per event
        # was a tenth of record()). A forked child takes a new prefix so it never repeats an id
        # of its parent's, which the aggregators would drop as a duplicate.
        self._renew_id_prefix()
        client = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _after_fork_in_child(client()))
        if self._source == Settings.model_fields["source"].default:
            # Events of two services that both keep the default source and reuse ids (order
            # numbers, request ids) would be taken for duplicates of each other.
            _log.warning(
                "METERSTREAM_SOURCE is not set: events carry the default source %r; give each "
                "producing service its own stable name",
                self._source,
            )

    def record(
        self,
        customer: str,
        meter: str,
        value: Decimal | int | str = 1,
        *,
        timestamp: datetime | None = None,
        event_id: str | None = None,
        properties: Mapping[str, str] | None = None,
    ) -> str:
        """Validate one usage event and queue it for Kafka; return its event id.

        ``timestamp`` is the event time (timezone-aware; now when omitted). ``event_id`` is the
        deduplication key: give your own to make retries of your own safe, or let one be made.
        Raises InvalidEventError naming the field, or BackpressureError when Kafka does not keep
        up for ``producer_block_timeout_s`` (then the event was not accepted).
        """
        event_id, key, payload = self.prepare(
            customer, meter, value, timestamp=timestamp, event_id=event_id, properties=properties
        )
        producer = self._producer if not self._forked else self._producer_after_fork()
        if not producer.produce_nowait(key, payload):
            producer.produce(key, payload)  # the queue is full: wait for room
        return event_id

    def prepare(
        self,
        customer: str,
        meter: str,
        value: Decimal | int | str = 1,
        *,
        timestamp: datetime | None = None,
        event_id: str | None = None,
        properties: Mapping[str, str] | None = None,
    ) -> tuple[str, bytes, bytes]:
        """Validate and encode one event without queuing it: (event id, Kafka key, value).

        Raises InvalidEventError naming the field. Used by :meth:`record` and the async client.
        """
        if self._closed:
            raise ClientClosedError(
                "this UsageClient is closed; nothing was queued: create a new UsageClient"
            )
        try:
            found = check_meter(meter, self._catalogue)
            customer = check_customer(customer)
            exact = check_value(value, found)
            check_stripe_digits(exact, found)
            now = datetime.now(UTC)
            event_time = (
                now
                if timestamp is None
                else check_event_time(
                    timestamp,
                    now=now,
                    horizon_days=self._horizon_days,
                    future_tolerance_s=self._settings.future_tolerance_s,
                )
            )
            props = (
                check_properties(properties, found)
                if properties or found.unique_property or found.dimensions
                else _EMPTY
            )
            if found.dimensions:
                # The workers' rule: a dimension missing here would be dead-lettered there.
                read_combination(found, props, _EMPTY)
            event_id = (
                f"{self._id_prefix}{next(self._id_counter):012x}"
                if event_id is None
                else check_event_id(event_id)
            )
            payload = encode_fields(
                event_id, self._source, customer, meter, exact, event_time, props, found.value_key
            )
            check_event_size(payload)
        except InvalidEventError as exc:
            self.metrics.rejected.labels(exc.field.split(".")[0]).inc()
            raise
        # key = customer id so one customer's events stay ordered in one partition.
        return event_id, customer.encode(), payload

    def try_queue(self, key: bytes, payload: bytes) -> bool:
        """Queue a prepared event without waiting; False when the producer's queue is full."""
        producer = self._producer if not self._forked else self._producer_after_fork()
        return producer.produce_nowait(key, payload)

    def queue(self, key: bytes, payload: bytes) -> None:
        """Queue a prepared event, waiting for room as :meth:`record` does."""
        producer = self._producer if not self._forked else self._producer_after_fork()
        producer.produce(key, payload)

    def on_delivery_failed(self, callback: DeliveryFailedCallback) -> None:
        """Call ``callback(event_id, reason)`` (from the delivery thread) for each event Kafka
        refuses for good. It must not block."""
        self._producer.add_failure_callback(callback)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait up to ``timeout`` seconds for queued events to be acknowledged.

        Returns how many are still in flight (0 when all are delivered). Raises DeliveryError
        with the ids of every event Kafka refused for good since the last flush.
        """
        if self._forked:
            return 0  # a forked child that queued nothing yet: its parent flushes its own
        remaining = self._producer.flush(timeout)
        self._raise_failures()
        return remaining

    def close(self, timeout: float = 30.0) -> None:
        """Flush for up to ``timeout`` seconds and stop the delivery thread.

        Events still unacknowledged then are given up and reported: DeliveryError lists every
        event id that Kafka did not acknowledge, so the caller can record them again.
        """
        if self._closed:
            return
        self._closed = True
        self._exit_flush.cancel()
        if self._forked:
            return  # nothing was queued in this (forked) process
        try:
            self._producer.flush(timeout)
        finally:
            # Whatever is still queued is given up and reported as failed, by id (close()).
            self._producer.close()
        self._raise_failures()

    def resend(self, events: Iterable[UndeliveredEvent]) -> None:
        """Queue undelivered events again, byte for byte (see DeliveryError.events), so each
        keeps its id and event time and is counted once however often it reached Kafka."""
        for event in events:
            self.queue(event.key, event.payload)

    def _producer_after_fork(self) -> EventProducer:
        """This process's producer: the first call in a forked child makes it (the parent's
        has no librdkafka threads here, so what it queued would never leave)."""
        with self._fork_lock:
            if self._forked:
                producer = EventProducer(self._settings, self.metrics)
                for callback in self._producer.failure_callbacks:
                    producer.add_failure_callback(callback)
                self._exit_flush = ExitFlush(producer, self._settings.exit_flush_timeout_s)
                self._producer = producer
                self._forked = False
        return self._producer

    def _after_fork_in_child(self) -> None:
        # Runs in the child right after fork(), where no other thread exists yet.
        self._renew_id_prefix()
        self._fork_lock = threading.Lock()  # the parent's may have been held at the fork
        if not self._closed:
            self._producer.abandon_after_fork()
            self._forked = True

    def _renew_id_prefix(self) -> None:
        self._id_prefix = os.urandom(10).hex()  # 80 random bits: 32 hex characters in all
        self._id_counter = itertools.count()

    def _raise_failures(self) -> None:
        failed = self._producer.take_failures()
        if failed:
            reasons = "; ".join(sorted({event.reason for event in failed}))
            raise DeliveryError([event.event_id for event in failed], reasons, failed)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _after_fork_in_child(client: UsageClient | None) -> None:
    if client is not None:
        client._after_fork_in_child()
