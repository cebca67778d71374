"""The ledger's high-water mark, kept where a database restore cannot take it back: Kafka.

A database restored from a backup cannot know it went back in time. So after each cycle the
reporter writes the number of ledger rows (rows are never deleted, so the count only grows)
to a compacted topic, keyed by the deployment id; at start it reads the latest value back. A
ledger with fewer rows than its mark was restored (reporters/restore.py holds the sending).

Kafka because every deployment already runs it (the aggregators need it), it is replicated and
backed up apart from PostgreSQL, and compaction keeps the newest mark per key forever. One
partition: the newest message of a key is the newest mark.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Protocol

import orjson
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # NewTopic is missing from the stub's __all__
    AdminClient,
    NewTopic,
)

from meterstream.errors import BrokerUnavailableError
from meterstream.kafka import client_config, wait_for_broker, watermarks


class MarkStore(Protocol):
    """Where marks live: the newest number of ledger rows per deployment."""

    def read(self, deployment_id: str) -> int | None:
        """The newest mark of ``deployment_id``, None if it never had one."""
        ...

    def write(self, deployment_id: str, ledger_rows: int, at: datetime) -> None:
        """Store a mark durably (acknowledged by the broker) before returning."""
        ...


class KafkaMarks:
    """Marks on a compacted one-partition topic (``cleanup.policy=compact``), key = deployment
    id, value = ``{"ledger_rows": N, "at": ISO time}``. Raises BrokerUnavailableError when the
    broker does not answer within ``timeout_s``."""

    def __init__(self, bootstrap: str, topic: str, timeout_s: float = 10.0) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout_s = timeout_s
        self._ready = False

    def _ensure_topic(self) -> None:
        if self._ready:
            return
        try:
            wait_for_broker(self.bootstrap, self.timeout_s)
        except BrokerUnavailableError as exc:
            raise self._unavailable("no broker answered") from exc
        admin = AdminClient(client_config(self.bootstrap))
        if self.topic not in admin.list_topics(timeout=self.timeout_s).topics:
            new = NewTopic(self.topic, num_partitions=1, config={"cleanup.policy": "compact"})
            for future in admin.create_topics([new]).values():
                try:
                    future.result(timeout=self.timeout_s)
                except KafkaException as exc:
                    if "TOPIC_ALREADY_EXISTS" not in str(exc):
                        raise self._unavailable(str(exc)) from exc
        self._ready = True

    def read(self, deployment_id: str) -> int | None:
        self._ensure_topic()
        try:
            low, high = watermarks(self.bootstrap, self.topic, self.timeout_s).get(0, (0, 0))
        except KafkaException as exc:
            raise self._unavailable(str(exc)) from exc
        if high <= low:
            return None
        return self._newest(deployment_id, low, high)

    def _newest(self, deployment_id: str, low: int, high: int) -> int | None:
        consumer = Consumer(
            {
                **client_config(self.bootstrap),
                "group.id": "meterstream-marks-reader",
                "enable.auto.commit": False,
            }
        )
        newest: int | None = None
        key = deployment_id.encode("utf-8")
        try:
            consumer.assign([TopicPartition(self.topic, 0, low)])
            deadline = time.monotonic() + self.timeout_s
            position = low
            while position < high:
                if time.monotonic() > deadline:
                    raise self._unavailable(f"read {position - low} of {high - low} marks")
                for message in consumer.consume(1000, timeout=0.2):
                    offset, value = message.offset(), message.value()
                    if message.error() is not None or offset is None:
                        continue
                    position = max(position, offset + 1)
                    if message.key() == key and value is not None:
                        newest = int(orjson.loads(value)["ledger_rows"])
        finally:
            consumer.close()
        return newest

    def write(self, deployment_id: str, ledger_rows: int, at: datetime) -> None:
        self._ensure_topic()
        producer = Producer(
            {**client_config(self.bootstrap), "enable.idempotence": True, "acks": "all"}
        )
        failed: list[str] = []

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                failed.append(str(error))

        value = orjson.dumps({"ledger_rows": ledger_rows, "at": at.isoformat()})
        producer.produce(self.topic, key=deployment_id, value=value, on_delivery=delivered)
        left = producer.flush(self.timeout_s)
        if left or failed:
            raise self._unavailable(failed[0] if failed else "not acknowledged in time")

    def _unavailable(self, detail: str) -> BrokerUnavailableError:
        return BrokerUnavailableError(
            f"METERSTREAM_KAFKA_BOOTSTRAP={self.bootstrap}: could not read or write the ledger "
            f"mark on topic {self.topic!r} (METERSTREAM_MARKS_TOPIC) in {self.timeout_s:g} s "
            f"({detail}); the reporter sends nothing until it can check it: start the broker "
            "or fix the address"
        )
