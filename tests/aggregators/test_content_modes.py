"""CloudEvents in both Kafka content modes, as the official CloudEvents SDK writes them.

The messages are made by the SDK's Kafka bindings (``cloudevents.core.bindings.kafka`` and the
older ``cloudevents.v1.kafka``), not by our encoder, and go through the real broker into a
running worker (faust, the applying child, the database), so the headers are shown to survive
the whole path: counted when good, dead-lettered with a named reason and their headers kept
when not, and sent back with their headers by a replay.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.v1.event import CloudEvent
from cloudevents.v1 import kafka as ce_kafka_v1
from cloudevents.v1.http import CloudEvent as CloudEventV1
from confluent_kafka import Producer
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from aggregators.batch import Message, Rejected
from aggregators.dead_letter_topic import dead_letter_headers
from aggregators.dead_letters import dead_letters, replay
from aggregators.intake import Accepted, Clock, Rejection, admit
from meterstream.content_modes import decode_headers, decode_message, encode_headers
from meterstream.db import build_engine, migrate
from meterstream.errors import HeaderError
from meterstream.events import UsageEvent
from meterstream.kafka import client_config
from meterstream.meters import load_catalogue
from meterstream.schema import rejected_events
from meterstream.settings import Settings
from tests.aggregators.test_batch import stored_totals
from tests.aggregators.workers import all_applied, wait_until, worker
from tests.conftest import EXAMPLE_METERS, read_topic

SettingsFactory = Callable[..., Settings]
CATALOGUE = load_catalogue(EXAMPLE_METERS)


def _event(event_id: str, meter: str, value: str, now: datetime) -> CloudEvent:
    return CloudEvent(
        attributes={
            "type": meter,
            "source": "go-billing",
            "id": event_id,
            "subject": "customer-7",
            "time": now,
            "datacontenttype": "application/json",
        },
        data={"value": value, "properties": {"region": "eu"}},
    )


def _by_subject(event: Any) -> bytes:
    return str(event.get_subject()).encode()


def test_the_sdks_binary_and_structured_messages_decode_to_one_event() -> None:
    now = datetime(2026, 11, 24, 10, 0, 0, 123456, tzinfo=UTC)
    expected = UsageEvent(
        "e1", "go-billing", "customer-7", "tokens", Decimal("2.5"), now, {"region": "eu"}
    )
    event = _event("e1", "tokens", "2.5", now)
    binary = ce_kafka.to_binary_event(event)
    structured = ce_kafka.to_structured_event(event)
    assert any(name.startswith("ce_") for name in binary.headers)
    for message in (binary, structured):
        assert decode_message(message.value, list(message.headers.items())) == expected
    # The older binding writes the time with +00:00 and labels structured events
    # application/json: both read the same.
    old = CloudEventV1(
        {
            "type": "tokens",
            "source": "go-billing",
            "id": "e1",
            "subject": "customer-7",
            "time": now.isoformat(),
            "datacontenttype": "application/json",
        },
        {"value": "2.5", "properties": {"region": "eu"}},
    )
    for message in (ce_kafka_v1.to_binary(old), ce_kafka_v1.to_structured(old)):
        assert decode_message(message.value, list(message.headers.items())) == expected


@pytest.mark.parametrize(
    ("change", "header"),
    [
        (lambda h, v: ([*h, ("ce_id", b"again")], v), "ce_id"),
        (lambda h, v: ([*h, ("Content-Type", b"application/json")], v), "content-type"),
        (lambda h, v: ([(n, None if n == "ce_source" else x) for n, x in h], v), "ce_source"),
        (lambda h, v: ([(n, b"\xff" if n == "ce_type" else x) for n, x in h], v), "ce_type"),
        (
            lambda h, v: (
                [(n, b"text/plain" if n == "content-type" else x) for n, x in h],
                v,
            ),
            "content-type",
        ),
        (lambda h, v: ([*h, ("ce_datacontenttype", b"application/json")], v), "ce_datacontenttype"),
    ],
)
def test_bad_headers_are_refused_naming_the_header(
    change: Callable[[list[tuple[str, bytes | None]], bytes], Any], header: str
) -> None:
    message = ce_kafka.to_binary_event(_event("e1", "tokens", "1", datetime.now(UTC)))
    headers, value = change(list(message.headers.items()), message.value)
    with pytest.raises(HeaderError) as raised:
        decode_message(value, headers)
    assert raised.value.field == header


def test_mixing_both_modes_is_refused() -> None:
    event = _event("e1", "tokens", "1", datetime.now(UTC))
    binary = ce_kafka.to_binary_event(event)
    attributes = [(n, v) for n, v in binary.headers.items() if n.startswith("ce_")]
    structured = ce_kafka.to_structured_event(event)
    mixed = [
        # A structured content type and ce_ headers.
        (structured.value, [*attributes, ("content-type", b"application/cloudevents+json")]),
        # ce_ headers, and the whole event as the value.
        (structured.value, list(binary.headers.items())),
    ]
    for value, headers in mixed:
        with pytest.raises(HeaderError, match="both content modes"):
            decode_message(value, headers)
        outcome = admit(
            value,
            CATALOGUE,
            clock=Clock(datetime.now(UTC), 600, 35),
            produced=None,
            headers=headers,
        )
        assert isinstance(outcome, Rejection) and outcome.reason == "invalid_headers"


def test_binary_mode_keeps_the_event_rules_and_their_reasons() -> None:
    clock = Clock(datetime.now(UTC), 600, 35)

    def reason(event: CloudEvent) -> str:
        message = ce_kafka.to_binary_event(event)
        outcome = admit(
            message.value,
            CATALOGUE,
            clock=clock,
            produced=None,
            headers=list(message.headers.items()),
        )
        return outcome.reason if isinstance(outcome, Rejection) else "accepted"

    now = clock.now
    assert reason(_event("e1", "tokens", "1", now)) == "accepted"
    assert reason(_event("e1", "gpu_seconds", "1", now)) == "unknown_meter"
    assert reason(_event("e1", "tokens", "-1", now)) == "invalid_value"
    assert reason(_event("e1", "tokens", "1e5", now)) == "unparseable"
    assert reason(_event("e1", "tokens", "10000000000000000", now)) == "beyond_stripe_digits"
    assert reason(_event("e1", "tokens", "1", now.replace(year=now.year + 1))) == "in_future"
    assert reason(_event("e1", "tokens", "1", now.replace(year=now.year - 1))) == "beyond_horizon"
    big = ce_kafka.to_binary_event(_event("e1", "tokens", "1", now))
    outcome = admit(
        big.value,
        CATALOGUE,
        clock=clock,
        produced=None,
        headers=[*big.headers.items(), ("ce_padding", b"x" * 70_000)],
    )
    assert isinstance(outcome, Rejection) and outcome.reason == "too_large"
    good = ce_kafka.to_binary_event(_event("e1", "tokens", "1", now))
    assert isinstance(
        admit(
            good.value, CATALOGUE, clock=clock, produced=None, headers=list(good.headers.items())
        ),
        Accepted,
    )


def test_sdk_messages_in_both_modes_through_a_running_worker(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    database_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(topic=topic_factory(1), database_url=database_url)
    engine = build_engine(settings)
    migrate(engine)
    now = datetime.now(UTC)
    binary = ce_kafka.to_binary_event(_event("b1", "tokens", "5", now), key_mapper=_by_subject)
    structured = ce_kafka.to_structured_event(
        _event("s1", "tokens", "7", now), key_mapper=_by_subject
    )
    unknown = ce_kafka.to_binary_event(_event("u1", "gpu_seconds", "3", now))
    twice = ce_kafka.to_binary_event(_event("d1", "tokens", "100", now))
    mixed = ce_kafka.to_binary_event(_event("m1", "tokens", "100", now))
    producer = Producer(client_config(settings.kafka_bootstrap))
    sent: list[tuple[bytes, list[tuple[str, bytes]]]] = [
        (binary.value, list(binary.headers.items())),
        (structured.value, list(structured.headers.items())),
        (unknown.value, list(unknown.headers.items())),
        (twice.value, [*twice.headers.items(), ("ce_id", b"d2")]),
        (mixed.value, [*mixed.headers.items(), ("content-type", b"application/cloudevents+json")]),
        # The same binary event again: counted once.
        (binary.value, list(binary.headers.items())),
    ]
    for value, headers in sent:
        producer.produce(settings.topic, value, b"customer-7", headers=headers)
    producer.flush(10)
    with worker(settings, tmp_path / "worker.log"):
        wait_until(lambda: all_applied(settings, engine), what="every message applied")
        dead = read_topic(settings.kafka_bootstrap, f"{settings.topic}.dlq", 3)
    [(value, count)] = stored_totals(engine).values()
    assert (value, count) == (Decimal(12), 2)
    by_offset = {int(dict(m.headers())["meterstream.offset"]): m for m in dead}
    assert {o: dict(m.headers())["meterstream.reason"] for o, m in by_offset.items()} == {
        2: b"unknown_meter",
        3: b"invalid_headers",
        4: b"invalid_headers",
    }
    for offset, letter in by_offset.items():
        # The copy keeps the message's own headers, in order, duplicates included.
        own = [(n, v) for n, v in letter.headers() if not n.startswith("meterstream.")]
        assert own == sent[offset][1]
        assert letter.value() == sent[offset][0]
    with engine.connect() as connection:
        stored = connection.execute(
            select(rejected_events.c.offset, rejected_events.c.reason)
        ).all()
    assert sorted(tuple(r) for r in stored) == [
        (2, "unknown_meter"),
        (3, "invalid_headers"),
        (4, "invalid_headers"),
    ]
    # A replay sends the message back with its headers: without them a binary-mode event
    # would be only its data, and unparseable.
    letters = dead_letters(engine, settings.topic, reason="unknown_meter")
    assert [letter.headers for letter in letters] == [tuple(sent[2][1])]
    assert replay(settings, letters) == 1
    again = read_topic(settings.kafka_bootstrap, settings.topic, len(sent) + 1)
    replayed = [m for m in again if m.offset() == len(sent)]
    assert [(m.value(), m.headers()) for m in replayed] == [sent[2]]
    engine.dispose()


def test_a_header_name_that_is_not_utf8_does_not_stop_the_worker(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    database_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(topic=topic_factory(1), database_url=database_url)
    engine = build_engine(settings)
    migrate(engine)
    now = datetime.now(UTC)
    producer = Producer(client_config(settings.kafka_bootstrap))
    # Kafka header names are bytes on the wire; librdkafka lets any through.
    sent = [("g1", "tokens"), ("bad-name", "tokens"), ("dead", "gpu_seconds"), ("g2", "tokens")]
    for event_id, meter in sent:
        message = ce_kafka.to_binary_event(_event(event_id, meter, "2", now))
        headers: list[tuple[Any, bytes]] = [*message.headers.items(), (b"\xff\xfe", b"x")]
        producer.produce(settings.topic, message.value, b"customer-7", headers=headers)
    producer.flush(10)
    with worker(settings, tmp_path / "worker.log"):
        wait_until(lambda: all_applied(settings, engine), what="every message applied")
        [letter] = read_topic(settings.kafka_bootstrap, f"{settings.topic}.dlq", 1)
    # A header that is not ours is not judged: the three tokens events count.
    [(value, count)] = stored_totals(engine).values()
    assert (value, count) == (Decimal(6), 3)
    # The dead letter went out (without the name no producer can write) and is stored whole.
    assert dict(letter.headers())["meterstream.reason"] == b"unknown_meter"
    assert dict(letter.headers())["ce_id"] == b"dead"
    [stored] = dead_letters(engine, settings.topic)
    assert (
        len(stored.headers) == len(ce_kafka.to_binary_event(_event("d", "t", "1", now)).headers) + 1
    )
    engine.dispose()


def _letter(headers: list[tuple[str, bytes | None]]) -> list[tuple[str, bytes | None]]:
    message = Message("usage", 0, 7, b"{}", None, tuple(headers))
    return dead_letter_headers(Rejected(message, Rejection("invalid_headers", "x")))


def test_the_dead_letter_copy_keeps_own_headers_bounded_and_never_passing_for_ours() -> None:
    own: list[tuple[str, bytes | None]] = [("ce_id", b"1"), ("ce_id", b"2"), ("ce_x", None)]
    letter = _letter([*own, ("meterstream.reason", b"forged"), ("\udcff", b"lone surrogate")])
    assert letter[:3] == own
    assert [v for n, v in letter if n == "meterstream.reason"] == [b"invalid_headers"]
    assert dict(letter)["meterstream.headers_truncated"] == b"0"
    huge = _letter([("ce_id", b"1"), ("ce_padding", b"x" * 70_000)])
    assert not [n for n, _ in huge if not n.startswith("meterstream.")]
    assert dict(huge)["meterstream.headers_truncated"] == b"1"


@given(
    st.lists(
        st.tuples(
            st.text(st.characters(), max_size=20),  # lone surrogates included
            st.one_of(st.none(), st.binary(max_size=40)),
        ),
        max_size=8,
    )
)
def test_stored_headers_come_back_as_they_were(headers: list[tuple[str, bytes | None]]) -> None:
    assert decode_headers(encode_headers(headers)) == tuple(headers)
