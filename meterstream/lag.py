"""Consumer lag, read from the broker itself: the group's committed offsets against the
partitions' end offsets. Right even while every worker is down, on the embedded broker and on
Apache Kafka alike."""

from __future__ import annotations

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from meterstream.kafka import client_config, watermarks


def consumer_lag(bootstrap: str, group: str, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """Messages not yet committed by ``group``, per partition of ``topic``.

    A partition the group never committed counts from its first retained message.
    """
    progress = group_progress(bootstrap, group, topic, timeout_s)
    return {partition: lag for partition, (_position, lag) in progress.items()}


def group_progress(
    bootstrap: str, group: str, topic: str, timeout_s: float = 10.0
) -> dict[int, tuple[int, int]]:
    """Per partition of ``topic``: (``group``'s committed offset, or the first retained offset
    when it never committed; messages behind it)."""
    offsets = watermarks(bootstrap, topic, timeout_s)
    committed = committed_offsets(bootstrap, group, topic, list(offsets), timeout_s)
    progress: dict[int, tuple[int, int]] = {}
    for partition, (low, high) in offsets.items():
        position = committed.get(partition, low)
        progress[partition] = (position, max(0, high - position))
    return progress


def committed_offsets(
    bootstrap: str, group: str, topic: str, partitions: list[int], timeout_s: float = 10.0
) -> dict[int, int]:
    """``group``'s committed offset of each of ``partitions`` that has one."""
    admin = AdminClient(client_config(bootstrap))
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions])
    committed: dict[int, int] = {}
    for future in admin.list_consumer_group_offsets([request]).values():
        for tp in future.result(timeout=timeout_s).topic_partitions:
            if tp.offset >= 0:
                committed[tp.partition] = tp.offset
    return committed
