"""Offset commits capped at what this worker applied, because faust acks events it skips.

After a consumer-group generation change, faust skips the messages of the old generation still
in a stream and acknowledges them itself (``faust/streams.py``, ``Stream._py_aiter``:
``do_ack or value is skipped_value``). It commits the longest run of consecutive acknowledged
offsets (``Consumer._new_offset`` in ``faust/transport/consumer.py``). So after a rebalance the
stale copies of events are acked while their new copies are still buffered or being applied; once
our earlier batch is acked too, the run reaches past them, faust commits it, and a crash then
loses those events: the next owner of the partition starts after them.

``CappedConsumer`` caps every commit of a partition at (the highest offset this worker applied
for it) + 1, as recorded by ``AppliedOffsets`` after each batch's transaction committed. A cap
never exceeds what is in the database: faust hands a partition's messages to the stream in
offset order from the committed offset it was assigned at, a skip lasts until the next
generation (whose fetch starts again at the committed offset), and batches commit in the order
they were taken. So once the batch holding offset ``o`` committed, every offset below ``o`` is
in the database, even when that batch finished after its partition was revoked. A cap that is
too low only delays a commit; the events read again are no-ops for the deduplication keys.

Where a partition starts: faust seeks every assigned partition to Kafka's committed offset
(``Consumer.perform_seek``, after each rebalance). ``CappedConsumer`` then seeks back the
partitions whose offset in the database (``aggregators.offset_store``, written with each batch)
is behind it: the database lost events it had applied (restored from a backup), and they are
applied again. Kafka's committed offset is only a hint.

Depends on faust internals, checked against faust-streaming 0.15.3 (aiokafka driver):
``Consumer._new_offset``, ``Consumer._acked`` / ``_acked_index`` (the acked offsets it consumes),
``Consumer.on_partitions_revoked``, ``Consumer.perform_seek`` / ``_committed_offset`` / ``seek``,
``Transport.Consumer`` (the class a transport builds) and the
``App.transport`` setter. Check them again when upgrading faust.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

import faust
from faust.transport.drivers import aiokafka
from faust.types.tuples import ack_lock

from aggregators.offset_store import start_offsets
from aggregators.pipeline import RawMessage
from meterstream.errors import ConfigError

__all__ = ["AppliedOffsets", "CappedConsumer", "use_applied_offsets"]

_log = logging.getLogger(__name__)
# (topic, partition): faust's and aiokafka's TopicPartition are both namedtuples of these.
_Partition = tuple[str, int]
# topic -> {partition: next offset} as the database records it (blocking; run in a thread).
StoredOffsets = Callable[[str], dict[int, int]]


class AppliedOffsets:
    """Per partition, the next offset after the highest one this worker applied since the
    partition was last revoked: the most a commit may claim.

    Not thread-safe: used from the worker's event loop only (faust commits there too).
    """

    def __init__(self) -> None:
        self._next: dict[_Partition, int] = {}

    def note(self, raw: Iterable[RawMessage]) -> None:
        """Record a batch whose transaction committed (call before acknowledging it)."""
        highest: dict[_Partition, int] = {}
        for topic, partition, offset, *_rest in raw:
            key = (topic, partition)
            if offset >= highest.get(key, -1):
                highest[key] = offset
        for key, offset in highest.items():
            # max: batches commit in order, but a late one (taken before a rebalance) may
            # report offsets below those of a newer one; it must not lower the cap.
            self._next[key] = max(self._next.get(key, 0), offset + 1)

    def cap(self, topic: str, partition: int) -> int | None:
        """The highest offset a commit may name, or None when nothing was applied."""
        return self._next.get((topic, partition))

    def forget(self, partitions: Iterable[Any]) -> None:
        """Drop revoked partitions: their next owner may move them on; we start over."""
        for tp in partitions:
            self._next.pop((tp.topic, tp.partition), None)


class CappedConsumer(aiokafka.Consumer):
    """faust's aiokafka consumer, committing no offset past what ``AppliedOffsets`` records."""

    def __init__(self, transport: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(transport, *args, **kwargs)
        self.applied: AppliedOffsets = transport.applied
        self.stored: StoredOffsets = transport.stored

    async def perform_seek(self) -> None:
        await super().perform_seek()
        assigned = self.assignment()
        loop = asyncio.get_running_loop()
        for topic in sorted({tp.topic for tp in assigned}):
            # The database is the record of what was applied: a failure to read it propagates
            # (faust's recovery raises it) rather than resume from Kafka's offsets alone.
            stored = await loop.run_in_executor(None, self.stored, topic)
            partitions = {tp.partition: tp for tp in assigned if tp.topic == topic}
            committed = {p: self._committed_offset.get(tp) for p, tp in partitions.items()}
            for partition, offset in sorted(start_offsets(stored, committed).items()):
                _log.warning(
                    "%s[%d]: the database applied up to offset %d, Kafka's group committed %s; "
                    "reading again from %d (a restored database?)",
                    topic,
                    partition,
                    offset,
                    committed[partition],
                    offset,
                )
                await self.seek(partitions[partition], offset)

    def _new_offset(self, tp: Any) -> int | None:
        cap = self.applied.cap(tp.topic, tp.partition)
        if cap is None:
            # Leave the acked offsets for a later commit, once a batch of this partition applied.
            return None
        # faust removes the offsets it commits from _acked, and later refuses to commit across
        # a hole at the head of _acked: hide the offsets at or above the cap from it rather
        # than let it drop them, so they are committed once the cap has moved past them.
        # Under ack_lock, as faust's own ack() is: acking from another thread is its public API.
        with ack_lock:
            acked: list[int] = self._acked[tp]
            held = [offset for offset in acked if offset >= cap]
            if held:
                acked[:] = [offset for offset in acked if offset < cap]
            try:
                offset: int | None = super()._new_offset(tp)
            finally:
                acked.extend(held)  # _acked_index still has them; faust sorts _acked each call
        # faust merges _gap intervals (offsets that do not exist) only up to the largest acked
        # offset it sees, which is below the cap; min() guards against a faust upgrade
        # changing that.
        return None if offset is None else min(offset, cap)

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        try:
            # faust waits here for the events in hand to be acked and commits them (capped).
            await super().on_partitions_revoked(revoked)
        finally:
            self.applied.forget(revoked)
            # Skip-acks that arrived while faust waited above are held back by the cap and
            # would stay forever (no cap, no commit, for a partition gone): drop them, as
            # faust's own revocation does; their next owner reads them again.
            for tp in revoked:
                self._acked.pop(tp, None)
                self._acked_index.pop(tp, None)
                self._gap.pop(tp, None)


class _CappedTransport(aiokafka.Transport):
    Consumer = CappedConsumer

    def __init__(
        self, url: Any, app: faust.App, applied: AppliedOffsets, stored: StoredOffsets
    ) -> None:
        super().__init__(url, app)
        self.applied = applied
        self.stored = stored


def use_applied_offsets(app: faust.App, applied: AppliedOffsets, stored: StoredOffsets) -> None:
    """Make ``app`` (not started) commit no offset past what ``applied`` records, and start
    each assigned partition no later than ``stored`` (the database) says."""
    # Before anything reads app.transport (declaring topics and agents builds it).
    urls = app.conf.broker_consumer
    if any(url.scheme != "kafka" for url in urls):
        raise ConfigError(
            "METERSTREAM_KAFKA_BOOTSTRAP: the aggregator runs on faust's aiokafka driver only; "
            f"give host:port pairs, got {', '.join(str(url) for url in urls)}"
        )
    app.transport = _CappedTransport(urls, app, applied, stored)
