"""Kafka administration shared by the stages: wait for a broker, create topics, read offsets."""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # NewTopic is missing from the stub's __all__
    AdminClient,
    NewTopic,
)

from meterstream.errors import BrokerUnavailableError

# Where librdkafka's own log lines go. Without a logger, librdkafka's threads print them straight
# to the process's stderr (``%6|1796410951.338|BGQUEUE|rdkafka#producer-2| ...``), past logging:
# a line that is not JSON under --log-format json, written by a C thread in between ours.
_librdkafka_log = logging.getLogger("librdkafka")


def client_config(bootstrap: str) -> dict[str, Any]:
    """The librdkafka settings every meterstream client shares.

    librdkafka's log lines go to the ``librdkafka`` logger, in the process's log format. They
    are handed over when the client is served (``poll``, ``flush``, ``consume``); an AdminClient
    is never polled, so its lines are dropped: its failures reach the caller as exceptions.
    """
    return {
        "bootstrap.servers": bootstrap,
        # A closed connection is routine (the embedded broker restarting, a client closing);
        # librdkafka would log each one as a failure.
        "log.connection.close": False,
        "logger": _librdkafka_log,
    }


def wait_for_broker(bootstrap: str, timeout_s: float = 10.0) -> None:
    """Return once a broker at ``bootstrap`` answers a metadata request.

    Raises BrokerUnavailableError naming the bootstrap and what to do.
    """
    admin = AdminClient(client_config(bootstrap))
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            return
        except KafkaException as exc:
            last_error = str(exc.args[0]) if exc.args else str(exc)
    raise BrokerUnavailableError(
        f"METERSTREAM_KAFKA_BOOTSTRAP={bootstrap}: no broker answered in {timeout_s:g} s "
        f"({last_error}); start one (meterstream broker) or fix the address"
    )


def ensure_topic(bootstrap: str, topic: str, partitions: int, timeout_s: float = 10.0) -> None:
    """Create ``topic`` with ``partitions`` partitions unless it exists; wait until visible."""
    admin = AdminClient(client_config(bootstrap))
    existing = admin.list_topics(timeout=timeout_s).topics
    if topic not in existing:
        futures = admin.create_topics([NewTopic(topic, num_partitions=partitions)])
        for future in futures.values():
            try:
                future.result(timeout=timeout_s)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metadata = admin.list_topics(topic=topic, timeout=timeout_s).topics.get(topic)
        if metadata is not None and metadata.error is None and metadata.partitions:
            return
        time.sleep(0.05)
    raise BrokerUnavailableError(
        f"topic {topic!r} did not appear on {bootstrap} in {timeout_s:g} s"
    )


def end_offsets(bootstrap: str, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """The high watermark (the offset after the last message) of every partition of ``topic``."""
    return {
        partition: high
        for partition, (_low, high) in watermarks(bootstrap, topic, timeout_s).items()
    }


def watermarks(bootstrap: str, topic: str, timeout_s: float = 10.0) -> dict[int, tuple[int, int]]:
    """(first retained offset, offset after the last message) of every partition of ``topic``.

    The high watermark is read from a Fetch response, not from ListOffsets alone: the embedded
    broker (Tansu 0.6) answers ListOffsets(latest) with the last *batch's* base offset + 1, which
    undercounts whenever that batch holds several messages. Fetching from just before that offset
    returns the last batch, and the Fetch response carries the true watermark (on Apache Kafka
    too).
    """
    consumer = Consumer(
        {
            **client_config(bootstrap),
            "group.id": "meterstream-offsets-probe",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
        listed: dict[int, tuple[int, int]] = {}
        for partition in metadata.partitions:
            listed[partition] = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout_s
            )
        probe = [
            TopicPartition(topic, p, high - 1) for p, (low, high) in listed.items() if high > low
        ]
        if probe:
            consumer.assign(probe)
            waiting = {tp.partition for tp in probe}
            deadline = time.monotonic() + timeout_s
            while waiting and time.monotonic() < deadline:
                for message in consumer.consume(500, timeout=0.2):
                    waiting.discard(message.partition())
            for tp in probe:
                _low, high = consumer.get_watermark_offsets(tp, cached=True)
                low, listed_high = listed[tp.partition]
                if high is not None and high > listed_high:
                    listed[tp.partition] = (low, high)
        return listed
    finally:
        consumer.close()
