"""Commits capped at what the worker applied: faust acks the events it skips after a rebalance.

The worker's own faust app runs in this process, on the real broker and real PostgreSQL, so the
test can do what faust's stream does with a stale event after a generation change: ack it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient
from faust.types import TP
from faust.types.tuples import ConsumerMessage
from sqlalchemy import Engine

from aggregators.app import WorkerState, build_app
from aggregators.offsets import AppliedOffsets
from aggregators.pipeline import ApplyPipeline, RawMessage
from aggregators.reference import reference_totals
from meterstream.db import build_engine, migrate
from meterstream.events import UsageEvent
from meterstream.kafka import client_config, watermarks
from meterstream.meters import load_catalogue
from meterstream.metrics import AggregatorMetrics
from meterstream.settings import Settings
from tests.aggregators.test_batch import stored_totals
from tests.aggregators.test_worker import record_stream
from tests.aggregators.workers import wait_until
from tests.conftest import EXAMPLE_METERS

SettingsFactory = Callable[..., Settings]


def _raw(partition: int, *offsets: int, topic: str = "usage") -> list[RawMessage]:
    return [(topic, partition, offset, b"", 0.0, ()) for offset in offsets]


def test_cap_is_one_past_the_highest_offset_applied_per_partition() -> None:
    applied = AppliedOffsets()
    assert applied.cap("usage", 0) is None
    applied.note(_raw(0, 10, 11, 12) + _raw(1, 7))
    assert applied.cap("usage", 0) == 13
    assert applied.cap("usage", 1) == 8
    assert applied.cap("usage", 2) is None
    assert applied.cap("other", 0) is None


def test_a_late_batch_never_lowers_the_cap() -> None:
    applied = AppliedOffsets()
    applied.note(_raw(0, 20, 21))
    # A batch taken before a rebalance, finishing after a newer one.
    applied.note(_raw(0, 5, 6))
    assert applied.cap("usage", 0) == 22


def test_revocation_drops_the_cap_and_a_reassignment_starts_over() -> None:
    applied = AppliedOffsets()
    applied.note(_raw(0, 30) + _raw(1, 40))
    applied.forget({TP("usage", 0)})
    assert applied.cap("usage", 0) is None
    assert applied.cap("usage", 1) == 41
    # Assigned again, from wherever its next owner committed.
    applied.note(_raw(0, 12))
    assert applied.cap("usage", 0) == 13
    # A batch of the earlier assignment finishing late: what it applied is in the database.
    applied.note(_raw(0, 30))
    assert applied.cap("usage", 0) == 31


def _committed(bootstrap: str, group: str, topic: str) -> int | None:
    """The group's committed offset of partition 0, read from the broker."""
    admin = AdminClient(client_config(bootstrap))
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, 0)])
    for future in admin.list_consumer_group_offsets([request]).values():
        for tp in future.result(timeout=10).topic_partitions:
            return int(tp.offset) if tp.offset >= 0 else None
    return None


def _stale_copy(topic: str, offset: int, generation_id: int) -> ConsumerMessage:
    """A message as faust's stream holds one fetched before the last rebalance."""
    return ConsumerMessage(
        topic,
        0,
        offset,
        0.0,
        0,
        None,
        None,
        b"",
        None,
        tp=TP(topic, 0),
        generation_id=generation_id,
    )


async def _ack_unapplied_offsets_then_commit(
    settings: Settings, engine: Engine
) -> tuple[int | None, int, list[UsageEvent]]:
    """Run the worker's app; once the events in the topic are committed, ack the next five
    offsets, which it has not applied (as faust does with the stale events it skips), and
    commit. Returns the offset the group committed then, the high watermark before the acks,
    and the events produced afterwards behind those offsets."""
    bootstrap, group, topic = settings.kafka_bootstrap, settings.consumer_group, settings.topic
    pipeline = ApplyPipeline(settings)
    app = build_app(settings, WorkerState(pipeline, engine, AggregatorMetrics()))
    await app.start()
    try:
        high = watermarks(bootstrap, topic)[0][1]
        # In a thread: the faust app under test runs on this event loop meanwhile.
        await asyncio.to_thread(
            wait_until, lambda: _committed(bootstrap, group, topic) == high, 60, f"{high} committed"
        )
        # Not produced yet, so surely not applied; acked through faust's Consumer.ack, the
        # call a stream makes for an event it skips.
        stale = app.consumer_generation_id - 1
        for offset in range(high, high + 5):
            app.consumer.ack(_stale_copy(topic, offset, stale))
        await app.consumer.commit()
        committed_then = await asyncio.to_thread(_committed, bootstrap, group, topic)
        # The events behind those offsets arrive: applied, then committed.
        late = await asyncio.to_thread(record_stream, settings, 5, 2, "late-")
        end = watermarks(bootstrap, topic)[0][1]
        await asyncio.to_thread(
            wait_until, lambda: _committed(bootstrap, group, topic) == end, 60, f"{end} committed"
        )
        return committed_then, high, late
    finally:
        await app.stop()
        pipeline.close()


def test_offsets_acked_but_not_applied_are_not_committed(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    postgres_url: str,
) -> None:
    settings = settings_factory(topic=topic_factory(1), database_url=postgres_url)
    engine = build_engine(settings)
    migrate(engine)
    events = record_stream(settings, 20, seed=1)
    committed_then, high, late = asyncio.run(_ack_unapplied_offsets_then_commit(settings, engine))
    # Without the cap faust commits high + 5 here: a crash now would lose those five events.
    assert committed_then == high
    assert stored_totals(engine) == reference_totals(events + late, load_catalogue(EXAMPLE_METERS))
    engine.dispose()


async def _commits_of_a_partition_with_a_gap(
    settings: Settings, engine: Engine
) -> list[int | None]:
    app = build_app(settings, WorkerState(ApplyPipeline(settings), engine, AggregatorMetrics()))
    consumer, tp = app.consumer, TP(settings.topic, 0)
    app.topics.acking_topics.add(settings.topic)  # as the agent's stream does when it starts
    for offset in (10, 11, 12):
        consumer.ack(_stale_copy(settings.topic, offset, 0))
    # Offsets 13 to 19 do not exist (a compacted range, or transaction markers): faust's _gap.
    await consumer._add_gap(tp, 13, 20)  # as faust calls it: up to the next real offset
    for offset in (20, 21):
        consumer.ack(_stale_copy(settings.topic, offset, 0))
    offsets = [consumer._new_offset(tp)]  # nothing applied yet
    applied = consumer.applied
    applied.note(_raw(0, 10, 11, topic=settings.topic))
    offsets.append(consumer._new_offset(tp))
    applied.note(_raw(0, 12, topic=settings.topic))
    offsets.append(consumer._new_offset(tp))
    applied.note(_raw(0, 20, 21, topic=settings.topic))
    offsets.append(consumer._new_offset(tp))  # 20 and 21 were kept, and the gap joins them
    # faust's gap interval includes offset 20 itself, so 20 is counted twice on the way: the
    # run stops one short once, and the next commit takes the rest. Nothing is lost.
    offsets.append(consumer._new_offset(tp))
    # Never started, so never stopped: close the loop its consumer thread made for itself.
    consumer._thread.thread_loop.close()
    return offsets


def test_acked_offsets_above_the_cap_are_committed_once_applied_across_a_gap(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str]
) -> None:
    settings = settings_factory(topic=topic_factory(1))
    engine = build_engine(settings)
    assert asyncio.run(_commits_of_a_partition_with_a_gap(settings, engine)) == [
        None,
        12,
        13,
        21,
        22,
    ]
    engine.dispose()
