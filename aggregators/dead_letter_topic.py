"""Rejected messages to the dead-letter topic: bounded, and never a reason to stall.

The ``rejected_events`` table is the record of every rejected message (its whole raw bytes
included; ``meterstream dead-letters replay`` reads them from there). The topic is the signal
for people and tools watching it. So what goes to the topic is bounded: at most
``DEAD_LETTER_VALUE_BYTES`` of the value (a message too large for the producer's request limit
would otherwise be refused again and again, and the batch never acknowledged), with its size,
digest and origin in headers. A send the broker refuses for good (``_FINAL``) is logged and
counted, not retried: the letter is already stored in the table.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

from aiokafka.errors import (
    CorruptRecordException,
    InvalidTimestampError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnsupportedForMessageFormatError,
)
from prometheus_client import CollectorRegistry, Counter

from aggregators.batch import BatchResult, Rejected
from aggregators.intake import header_bytes
from meterstream.events import MAX_EVENT_BYTES
from meterstream.settings import Settings

_log = logging.getLogger(__name__)

# Every message the aggregators could accept fits whole; only ``too_large`` ones are cut.
DEAD_LETTER_VALUE_BYTES = MAX_EVENT_BYTES
# Refusals about the record itself: sending it again cannot succeed. Not every non-retriable
# aiokafka error is here: a timeout or a closed producer is not the letter's fault, and those
# are retried (the batch waits) so that the topic does not silently miss letters.
_FINAL = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    CorruptRecordException,
    InvalidTimestampError,
    UnsupportedForMessageFormatError,
)


def _is_final(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps: faust raises ProducerSendError from aiokafka's
    error) is a refusal of the record itself."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, _FINAL):
            return True
        seen = seen.__cause__
    return False


def dead_letter_topic(settings: Settings) -> str:
    return f"{settings.topic}.dlq"


def dead_letter_headers(rejected: Rejected) -> list[tuple[str, bytes | None]]:
    """The message's own headers (a binary-mode event's attributes), then why and from where:
    enough to find the whole message in ``rejected_events``.

    Its own headers are kept in order, unless they take more than ``DEAD_LETTER_VALUE_BYTES``
    (then ``meterstream.headers_truncated`` is 1 and the table alone has them) and except any
    named ``meterstream.*``, which would pass for ours."""
    message, rejection = rejected.message, rejected.rejection
    raw = message.value or b""
    own = [
        (name, value)
        for name, value in message.headers
        if not name.startswith("meterstream.") and _encodable(name)
    ]
    cut = header_bytes(own) > DEAD_LETTER_VALUE_BYTES
    return [
        *([] if cut else own),
        ("meterstream.reason", rejection.reason.encode()),
        ("meterstream.detail", rejection.detail.encode()[:1000]),
        ("meterstream.topic", message.topic.encode()),
        ("meterstream.partition", str(message.partition).encode()),
        ("meterstream.offset", str(message.offset).encode()),
        ("meterstream.size", str(len(raw)).encode()),
        # The raw_digest of its rejected_events row.
        ("meterstream.digest", hashlib.blake2b(raw, digest_size=16).hexdigest().encode()),
        ("meterstream.truncated", b"1" if len(raw) > DEAD_LETTER_VALUE_BYTES else b"0"),
        ("meterstream.headers_truncated", b"1" if cut else b"0"),
    ]


def _encodable(name: str) -> bool:
    """Whether the producer can write ``name`` (UTF-8): a name with a lone surrogate would be
    refused on every try, and the batch never acknowledged."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class DeadLetterSender:
    """Sends a batch's rejected messages to the dead-letter topic (a faust topic)."""

    def __init__(self, topic: Any, registry: CollectorRegistry) -> None:
        self._topic = topic
        self.unsent = Counter(
            "meterstream_aggregator_dead_letters_unsent",
            "Dead letters the broker refused for good (kept in rejected_events only).",
            ["reason"],
            registry=registry,
        )

    async def send_once(self, result: BatchResult) -> None:
        """Send every rejected message and wait for the broker; raise if one may be sent again
        later (the caller retries the whole batch's letters; a duplicate letter is harmless)."""
        sends = [self._send(rejected) for rejected in result.rejected]
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        retry: BaseException | None = None
        for rejected, outcome in zip(result.rejected, outcomes, strict=True):
            if isinstance(outcome, BaseException) and _is_final(outcome):
                message = rejected.message
                _log.error(
                    "the broker refused the dead letter of %s[%d]@%d for good (%s); it is kept "
                    "in rejected_events only",
                    message.topic,
                    message.partition,
                    message.offset,
                    outcome,
                )
                self.unsent.labels(rejected.rejection.reason).inc()
            elif isinstance(outcome, BaseException) and retry is None:
                retry = outcome
        if retry is not None:
            raise retry

    async def _send(self, rejected: Rejected) -> None:
        customer = rejected.rejection.customer_id
        pending = await self._topic.send(
            key=customer.encode() if customer else None,
            value=(rejected.message.value or b"")[:DEAD_LETTER_VALUE_BYTES],
            headers=dead_letter_headers(rejected),
        )
        await pending
