"""Aggregator workers on the real broker and real databases: exact totals, whatever happens."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson
from confluent_kafka import Producer
from sqlalchemy import Engine, select

from aggregators.reference import reference_totals
from ingest import UsageClient
from meterstream.db import build_engine, migrate
from meterstream.events import UsageEvent
from meterstream.kafka import client_config
from meterstream.meters import load_catalogue
from meterstream.schema import rejected_events
from meterstream.settings import Settings
from tests.aggregators.test_batch import stored_totals
from tests.aggregators.workers import (
    environment,
    events_applied,
    wait_until,
    worker,
)
from tests.conftest import EXAMPLE_METERS, read_topic

SettingsFactory = Callable[..., Settings]


def migrated(settings: Settings) -> Engine:
    engine = build_engine(settings)
    migrate(engine)
    return engine


def record_stream(
    settings: Settings, count: int, seed: int, id_prefix: str = "e"
) -> list[UsageEvent]:
    """Record ``count`` events of every meter, out of order and partly late, plus re-sends of
    about a tenth of them (same id); return the events as the reference sees them."""
    rng = random.Random(seed)
    catalogue = load_catalogue(EXAMPLE_METERS)
    now = datetime.now(UTC)
    meters = sorted(catalogue.meters)
    events: list[UsageEvent] = []
    with UsageClient(settings) as client:
        for i in range(count):
            event = UsageEvent(
                event_id=f"{id_prefix}{i}",
                source=settings.source,
                customer_id=f"customer-{rng.randint(0, 49)}",
                meter=rng.choice(meters),
                value=Decimal(rng.randint(0, 10**7)) / Decimal(10) ** rng.randint(0, 6),
                # Up to three days late, in no particular order.
                event_time=now - timedelta(seconds=rng.randint(0, 3 * 86_400)),
                properties={"user_id": f"user-{rng.randint(0, 30)}"},
            )
            events.append(event)
            for _ in range(2 if rng.random() < 0.1 else 1):
                client.record(
                    event.customer_id,
                    event.meter,
                    event.value,
                    timestamp=event.event_time,
                    event_id=event.event_id,
                    properties=event.properties,
                )
    return events


def test_worker_totals_match_the_reference(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    database_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(topic=topic_factory(4), database_url=database_url)
    engine = migrated(settings)
    events = record_stream(settings, 5_000, seed=1)
    with worker(settings, tmp_path / "worker.log"):
        wait_until(lambda: events_applied(engine) >= 5_000, what="5,000 events applied")
        # Re-sent an hour later (another process, the same source): still counted once.
        record_stream(settings, 300, seed=1)
        more = record_stream(settings, 200, seed=2, id_prefix="late-")
        wait_until(lambda: events_applied(engine) >= 5_200, what="5,200 events applied")
    catalogue = load_catalogue(EXAMPLE_METERS)
    assert stored_totals(engine) == reference_totals(events + more, catalogue)
    engine.dispose()


def test_worker_killed_mid_stream_ends_with_the_same_totals(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    postgres_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(
        topic=topic_factory(4), database_url=postgres_url, aggregate_batch_max_events=200
    )
    engine = migrated(settings)
    events = record_stream(settings, 20_000, seed=3)
    for _ in range(2):
        with worker(settings, tmp_path / "worker.log") as process:
            wait_until(lambda: events_applied(engine) > 0, what="the worker to start applying")
            process.send_signal(signal.SIGKILL)
            process.wait()
    with worker(settings, tmp_path / "worker.log"):
        wait_until(lambda: events_applied(engine) >= 20_000, 120, "20,000 events applied")
    catalogue = load_catalogue(EXAMPLE_METERS)
    assert stored_totals(engine) == reference_totals(events, catalogue)
    engine.dispose()


def test_two_workers_share_the_partitions_and_stay_exact(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    postgres_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(
        topic=topic_factory(8), database_url=postgres_url, aggregate_batch_max_events=250
    )
    engine = migrated(settings)
    first_batch = record_stream(settings, 6_000, seed=4)
    with worker(settings, tmp_path / "a.log"):
        wait_until(lambda: events_applied(engine) > 0, what="worker A applying")
        with worker(settings, tmp_path / "b.log"):
            # B joins while A is busy; then more usage arrives while both run.
            second_batch = record_stream(settings, 6_000, seed=5, id_prefix="b")
            wait_until(lambda: events_applied(engine) >= 9_000, 120, "9,000 events applied")
        # B left mid-stream: A takes its partitions back.
        third_batch = record_stream(settings, 2_000, seed=6, id_prefix="c")
        wait_until(lambda: events_applied(engine) >= 14_000, 120, "14,000 events applied")
    catalogue = load_catalogue(EXAMPLE_METERS)
    expected = reference_totals(first_batch + second_batch + third_batch, catalogue)
    assert stored_totals(engine) == expected
    engine.dispose()


def test_poisoned_message_goes_to_the_dead_letter_topic_and_the_rest_is_applied(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    database_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(topic=topic_factory(1), database_url=database_url)
    engine = migrated(settings)
    with UsageClient(settings) as client:
        client.record("c", "tokens", 5, event_id="before")
    producer = Producer(client_config(settings.kafka_bootstrap))
    producer.produce(settings.topic, b"\x00not json at all", b"c")
    unknown = {
        "specversion": "1.0",
        "id": "x",
        "source": "other-service",
        "type": "gpu_seconds",
        "subject": "c",
        "time": datetime.now(UTC).isoformat(),
        "data": {"value": "1"},
    }
    producer.produce(settings.topic, orjson.dumps(unknown), b"c")
    producer.flush(10)
    with UsageClient(settings) as client:
        client.record("c", "tokens", 7, event_id="after")
    with worker(settings, tmp_path / "worker.log"):
        wait_until(lambda: events_applied(engine) >= 2, what="the good events")
        dead = read_topic(settings.kafka_bootstrap, f"{settings.topic}.dlq", 2)
    # Dead letters keep the customer key when there is one, so they may sit on any partition.
    by_offset = sorted(dead, key=lambda m: dict(m.headers())["meterstream.offset"])
    assert [dict(m.headers())["meterstream.reason"] for m in by_offset] == [
        b"unparseable",
        b"unknown_meter",
    ]
    assert by_offset[0].value() == b"\x00not json at all"
    assert dict(by_offset[1].headers())["meterstream.offset"] == b"2"
    assert b"no meter 'gpu_seconds'" in dict(by_offset[1].headers())["meterstream.detail"]
    with engine.connect() as connection:
        reasons = connection.execute(
            select(rejected_events.c.offset, rejected_events.c.reason).order_by(
                rejected_events.c.offset
            )
        ).all()
    assert [tuple(r) for r in reasons] == [(1, "unparseable"), (2, "unknown_meter")]
    [(value, count)] = stored_totals(engine).values()
    assert (value, count) == (Decimal(12), 2)
    engine.dispose()


def test_totals_command_prints_json(settings_factory: SettingsFactory, database_url: str) -> None:
    settings = settings_factory(database_url=database_url)
    engine = migrated(settings)
    from aggregators.batch import BatchApplier, Message
    from meterstream.events import encode_event
    from meterstream.metrics import AggregatorMetrics

    now = datetime.now(UTC).replace(minute=30, second=0, microsecond=0) - timedelta(hours=1)
    applier = BatchApplier(
        engine, load_catalogue(EXAMPLE_METERS), AggregatorMetrics(), horizon_days=35
    )
    applier.apply(
        [
            Message(
                "t", 0, 0, encode_event(UsageEvent("1", "s", "c1", "tokens", Decimal("0.1"), now))
            ),
            Message(
                "t", 0, 1, encode_event(UsageEvent("2", "s", "c1", "tokens", Decimal("0.2"), now))
            ),
        ]
    )
    output = subprocess.run(
        [sys.executable, "-m", "meterstream", "totals", "--customer", "c1", "--json"],
        env=environment(settings),
        capture_output=True,
        check=True,
    ).stdout
    start = now.replace(minute=0)
    assert json.loads(output) == [
        {
            "customer": "c1",
            "meter": "tokens",
            "window_start": start.isoformat().replace("+00:00", "Z"),
            "window_end": (start + timedelta(hours=1)).isoformat().replace("+00:00", "Z"),
            "dimensions": {},  # tokens keeps no dimensions
            "value": "0.3",
            "events": 2,
        }
    ]
    engine.dispose()
