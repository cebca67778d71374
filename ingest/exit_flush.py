"""Deliver what a UsageClient queued when the interpreter exits without ``close()``.

A client kept for the life of a process (a web app's global) is seldom closed. Its delivery
thread is a daemon, so without this hook the interpreter would end with events still queued in
librdkafka, lost without a word. At exit the hook waits up to ``METERSTREAM_EXIT_FLUSH_TIMEOUT_S``
for Kafka's acknowledgements, then gives up the rest and reports every undelivered event by id
(an ERROR log line, and ``meterstream_ingest_events_failed_total``).

The hook holds its producer by a weak reference, so it keeps alive neither a closed client nor
its producer; ``close()`` unregisters it. A forked child inherits its parent's hooks: they do
nothing there (the parent delivers its own events), and the child's producer has its own hook.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref

from ingest.producer import EventProducer

_log = logging.getLogger(__name__)


class ExitFlush:
    """Flushes and closes one producer at interpreter exit; registered on creation."""

    def __init__(self, producer: EventProducer, timeout_s: float) -> None:
        self._producer = weakref.ref(producer)
        self._pid = os.getpid()
        self._timeout_s = timeout_s
        atexit.register(self)

    def cancel(self) -> None:
        """The client was closed: nothing is left to do at exit."""
        atexit.unregister(self)

    def __call__(self) -> None:
        producer = self._producer()
        if producer is None or producer.closed or os.getpid() != self._pid:
            return
        producer.flush(self._timeout_s)
        # Gives up what is still queued; each such event comes back as a failure, by id.
        producer.close()
        failed = producer.take_failures()
        if failed:
            reasons = "; ".join(sorted({event.reason for event in failed}))
            _log.error(
                "a UsageClient was not closed before the interpreter exited: %d event(s) were "
                "not delivered to Kafka within METERSTREAM_EXIT_FLUSH_TIMEOUT_S=%g s (%s). "
                "Record them again with the same ids and event times; close() the client "
                "before exit to get them back as DeliveryError.events. Undelivered ids: %s",
                len(failed),
                self._timeout_s,
                reasons,
                ", ".join(event.event_id for event in failed),
            )
