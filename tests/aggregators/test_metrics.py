"""The aggregator's metrics move as the pipeline runs (real broker, real database)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psycopg
import pytest
from confluent_kafka import Producer

from ingest import UsageClient
from meterstream.db import build_engine, migrate
from meterstream.embedded import free_port
from meterstream.kafka import client_config
from meterstream.lag import consumer_lag
from meterstream.metrics_endpoint import scrape
from meterstream.settings import Settings
from tests.aggregators.workers import events_applied, wait_until, worker
from tests.sockets import listening_hosts

SettingsFactory = Callable[..., Settings]


def test_counters_hold_the_numbers_of_a_known_stream(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    postgres_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(topic=topic_factory(4), database_url=postgres_url)
    engine = build_engine(settings)
    migrate(engine)
    with UsageClient(settings) as client:
        for i in range(120):
            client.record(f"c{i % 7}", "tokens", i, event_id=f"t{i}")
        for i in range(30):
            client.record(f"c{i % 7}", "api_calls", event_id=f"a{i}")
        for i in range(10):  # re-sends of ids already recorded
            client.record(f"c{i % 7}", "tokens", i, event_id=f"t{i}")
    producer = Producer(client_config(settings.kafka_bootstrap))
    for _ in range(3):
        producer.produce(settings.topic, b"not json", b"c0")
    unknown = {
        "specversion": "1.0",
        "id": "u1",
        "source": "s",
        "type": "gpu_hours",
        "subject": "c0",
        "time": datetime.now(UTC).isoformat(),
        "data": {"value": "1"},
    }
    producer.produce(settings.topic, orjson.dumps(unknown), b"c0")
    producer.flush(10)

    port = free_port()
    with worker(settings, tmp_path / "worker.log", metrics_port=port):
        wait_until(lambda: events_applied(engine) >= 150, what="150 events applied")

        def settled() -> bool:
            samples = scrape(port)
            dead = sum(v for (n, _l), v in samples.items() if n.endswith("dead_lettered_total"))
            return dead == 4

        wait_until(settled, what="4 dead letters counted")
        samples = scrape(port)
    applied = {
        dict(labels)["meter"]: value
        for (name, labels), value in samples.items()
        if name == "meterstream_aggregator_events_applied_total"
    }
    assert applied == {"tokens": 120, "api_calls": 30}
    assert samples[("meterstream_aggregator_duplicates_skipped_total", ())] == 10
    dead = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "meterstream_aggregator_events_dead_lettered_total"
    }
    assert dead == {"unparseable": 3, "unknown_meter": 1}
    assert samples[("meterstream_aggregator_batch_events_sum", ())] == 164
    engine.dispose()


def test_consumer_lag_rises_while_the_worker_is_stopped_and_falls_to_zero(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    postgres_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(topic=topic_factory(4), database_url=postgres_url)
    engine = build_engine(settings)
    migrate(engine)
    bootstrap, group, topic = settings.kafka_bootstrap, settings.consumer_group, settings.topic
    with UsageClient(settings) as client:
        for i in range(200):
            client.record(f"c{i % 9}", "tokens", 1)
    assert sum(consumer_lag(bootstrap, group, topic).values()) == 200
    port = free_port()
    with worker(settings, tmp_path / "worker.log", metrics_port=port):
        wait_until(lambda: events_applied(engine) >= 200, what="the first 200 events")
        wait_until(
            lambda: sum(consumer_lag(bootstrap, group, topic).values()) == 0,
            what="the committed offsets to catch up",
        )

        def gauge_is_zero() -> bool:
            lag = [
                value
                for (name, _labels), value in scrape(port).items()
                if name == "meterstream_aggregator_consumer_lag_messages"
            ]
            return len(lag) == 4 and sum(lag) == 0

        wait_until(gauge_is_zero, what="the lag gauge at zero on every partition")
    # The worker is stopped: new usage piles up, and the broker says so.
    with UsageClient(settings) as client:
        for i in range(300):
            client.record(f"c{i % 9}", "tokens", 1)
    assert sum(consumer_lag(bootstrap, group, topic).values()) == 300
    with worker(settings, tmp_path / "worker.log"):
        wait_until(lambda: events_applied(engine) >= 500, 90, "all 500 events")
        wait_until(
            lambda: sum(consumer_lag(bootstrap, group, topic).values()) == 0,
            what="lag back to zero",
        )
    engine.dispose()


@pytest.mark.parametrize(("host", "bound"), [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])  # noqa: S104 - what a container sets
def test_the_worker_serves_metrics_on_loopback_unless_told_otherwise(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    host: str | None,
    bound: str,
) -> None:
    settings = settings_factory(topic=topic_factory(1))
    if host is not None:
        settings = settings.model_copy(update={"metrics_host": host})
    engine = build_engine(settings)
    migrate(engine)
    engine.dispose()
    port = free_port()
    with worker(settings, tmp_path / "worker.log", metrics_port=port):
        wait_until(lambda: bool(scrape(port)), what="/metrics answering")
        assert listening_hosts(port) == {bound}


def _stalled(port: int, topic: str) -> dict[str, float]:
    return {
        dict(labels)["partition"]: value
        for (name, labels), value in scrape(port).items()
        if name == "meterstream_aggregator_partition_stalled" and dict(labels)["topic"] == topic
    }


def test_a_worker_that_cannot_commit_reports_its_partition_stalled_and_recovers(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    postgres_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(
        topic=topic_factory(1), database_url=postgres_url, stall_after_s=1.0
    )
    engine = build_engine(settings)
    migrate(engine)
    port = free_port()
    with worker(settings, tmp_path / "worker.log", metrics_port=port):
        with UsageClient(settings) as client:
            client.record("c0", "tokens", 1, event_id="before")
        wait_until(lambda: events_applied(engine) == 1, what="the first event applied")
        wait_until(lambda: _stalled(port, settings.topic) == {"0": 0}, what="a calm gauge")
        # Every batch now waits on a lock at its last write: the worker applies nothing.
        with psycopg.connect(postgres_url) as blocker:
            blocker.execute("LOCK TABLE applied_offsets IN EXCLUSIVE MODE")
            with UsageClient(settings) as client:
                client.record("c0", "tokens", 2, event_id="stuck")
            wait_until(lambda: _stalled(port, settings.topic) == {"0": 1}, what="stalled")
            assert events_applied(engine) == 1
            blocker.rollback()
        wait_until(lambda: events_applied(engine) == 2, what="the held event applied")
        wait_until(lambda: _stalled(port, settings.topic) == {"0": 0}, what="no longer stalled")
    engine.dispose()
