"""Dead letters: what the aggregators refused, read back, and sent again once the cause is fixed.

Every refused message is kept whole in ``rejected_events.raw`` (and on ``<topic>.dlq``), in the
transaction of its batch. A replay produces those exact bytes to the usage topic again, keyed by
customer as the SDK keys them, so the event keeps its id, source and time: once a meter is added
or a clock corrected, it is counted; one already counted (a replay run twice) is a duplicate the
deduplication keys skip; one still at fault is dead-lettered again, as a new row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from confluent_kafka import KafkaError, Message, Producer
from sqlalchemy import Engine, select

from meterstream.content_modes import Header, decode_headers, encode_headers
from meterstream.errors import ReplayError
from meterstream.kafka import client_config
from meterstream.schema import rejected_events
from meterstream.settings import Settings

__all__ = ["DeadLetter", "dead_letters", "replay"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One refused message as ``rejected_events`` keeps it."""

    topic: str
    partition: int
    offset: int
    reason: str
    detail: str
    event_id: str | None
    customer_id: str | None
    meter: str | None
    rejected_at: datetime
    raw: bytes
    # Its Kafka headers: a binary-mode event's attributes, sent back with it.
    headers: tuple[Header, ...] = ()


def dead_letters(
    engine: Engine, topic: str, *, reason: str | None = None, since: datetime | None = None
) -> list[DeadLetter]:
    """The dead letters of ``topic``, oldest first; only ``reason``'s, and only those refused
    at or after ``since``, when given."""
    c = rejected_events.c
    query = select(
        c.topic,
        c.partition,
        c.offset,
        c.reason,
        c.detail,
        c.event_id,
        c.customer_id,
        c.meter,
        c.rejected_at,
        c.raw,
        c.headers,
    ).where(c.topic == topic)
    if reason is not None:
        query = query.where(c.reason == reason)
    if since is not None:
        query = query.where(c.rejected_at >= since)
    query = query.order_by(c.rejected_at, c.partition, c.offset)
    with engine.connect() as connection:
        return [
            DeadLetter(**{**row._mapping, "headers": decode_headers(row.headers)})
            for row in connection.execute(query)
        ]


# Reasons a replay can never cure: the event's time only gets older, its value's digits and its
# size do not change. Replaying them only dead-letters them again.
NEVER_PASS = frozenset({"beyond_horizon", "beyond_stripe_digits", "too_large"})


def worth_replaying(letters: Sequence[DeadLetter], reason: str | None) -> list[DeadLetter]:
    """``letters`` without those whose reason can never pass, unless ``reason`` (the one the
    operator asked for) names it."""
    return [
        letter for letter in letters if letter.reason == reason or letter.reason not in NEVER_PASS
    ]


def replay(settings: Settings, letters: Sequence[DeadLetter], timeout_s: float = 60.0) -> int:
    """Produce each distinct message of ``letters`` to the usage topic again and wait for
    Kafka's acknowledgement of every one; return how many were sent.

    Raises ReplayError when Kafka refused some or did not answer within ``timeout_s``; those
    that did arrive are counted once however often the replay is run.
    """
    producer = Producer(
        {
            **client_config(settings.kafka_bootstrap),
            "acks": "all",
            "enable.idempotence": True,
            "delivery.timeout.ms": int(timeout_s * 1000),
        }
    )
    failures: list[str] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(str(error))

    # A message refused twice (its producer re-sent it) has two rows; once is enough. Its
    # headers count: two binary-mode events may carry the same data under two ids.
    sent: set[bytes] = set()
    for letter in letters:
        digest = hashlib.blake2b(
            len(letter.raw).to_bytes(8, "big")
            + letter.raw
            + (encode_headers(letter.headers) or b""),
            digest_size=16,
        ).digest()
        if digest in sent:
            continue
        sent.add(digest)
        key = letter.customer_id.encode() if letter.customer_id else None
        while True:
            try:
                producer.produce(
                    settings.topic,
                    letter.raw,
                    key,
                    headers=list(letter.headers) or None,
                    on_delivery=delivered,
                )
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(1.0)
        producer.poll(0)
    left = producer.flush(timeout_s)
    if failures or left:
        raise ReplayError(
            f"{len(failures) + left} of {len(sent)} dead letter(s) did not reach "
            f"{settings.topic!r} at {settings.kafka_bootstrap} "
            f"({failures[0] if failures else 'no answer in time'}); run the replay again: "
            "what did arrive is counted once"
        )
    return len(sent)
