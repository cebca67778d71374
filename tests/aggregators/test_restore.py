"""A database restored from a backup resumes from its own applied offsets, not Kafka's.

Real PostgreSQL, real pg_dump and pg_restore, the real broker, real worker processes.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition
from sqlalchemy import Engine, select

from aggregators.batch import BatchApplier, Message
from aggregators.offset_store import start_offsets, stored_or_seeded
from aggregators.reference import reference_totals
from meterstream.db import build_engine
from meterstream.kafka import client_config
from meterstream.lag import consumer_lag
from meterstream.meters import load_catalogue
from meterstream.metrics import AggregatorMetrics
from meterstream.schema import applied_offsets
from meterstream.settings import Settings
from tests.aggregators.test_batch import stored_totals
from tests.aggregators.test_database_conditions import restore_rows, snapshot_rows
from tests.aggregators.test_worker import migrated, record_stream
from tests.aggregators.workers import all_applied, events_applied, wait_until, worker
from tests.conftest import EXAMPLE_METERS, POSTGRES_ADMIN_URL

SettingsFactory = Callable[..., Settings]


def _postgres_tool(name: str) -> str:
    found = shutil.which(name) or next(iter(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")), None)
    assert found, f"{name} is needed to test a restore; install the PostgreSQL client"
    return found


def _nothing_behind(settings: Settings) -> bool:
    lag = consumer_lag(settings.kafka_bootstrap, settings.consumer_group, settings.topic)
    return not any(lag.values())


def test_a_restored_database_replays_what_it_lost_and_ends_with_the_uninterrupted_totals(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    postgres_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(
        topic=topic_factory(4), database_url=postgres_url, aggregate_batch_max_events=300
    )
    engine = migrated(settings)
    log = tmp_path / "worker.log"
    before = record_stream(settings, 2_000, seed=11)
    with worker(settings, log):
        wait_until(lambda: all_applied(settings, engine), 120, "the first events applied")
    backup = tmp_path / "backup.dump"
    subprocess.run(
        [_postgres_tool("pg_dump"), "--format=custom", f"--file={backup}", postgres_url],
        check=True,
    )
    after = record_stream(settings, 1_500, seed=12, id_prefix="after-")
    with worker(settings, log):
        wait_until(lambda: all_applied(settings, engine), 120, "the later events applied")
        # Kafka's group has committed past everything: alone, it would resume past the loss.
        wait_until(lambda: _nothing_behind(settings), 60, "the group to commit everything")
    catalogue = load_catalogue(EXAMPLE_METERS)
    uninterrupted = stored_totals(engine)
    assert uninterrupted == reference_totals(before + after, catalogue)
    engine.dispose()

    name = postgres_url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    subprocess.run(
        [_postgres_tool("pg_restore"), "--exit-on-error", f"--dbname={postgres_url}", str(backup)],
        check=True,
    )
    engine = build_engine(settings)
    assert events_applied(engine) == len({e.event_id for e in before})
    assert _nothing_behind(settings)

    with worker(settings, log):
        wait_until(lambda: all_applied(settings, engine), 120, "the lost events applied again")
    assert stored_totals(engine) == uninterrupted
    engine.dispose()


def test_the_batch_transaction_records_each_partitions_next_offset(
    migrated_engine: Engine,
) -> None:
    engine = migrated_engine
    applier = BatchApplier(
        engine, load_catalogue(EXAMPLE_METERS), AggregatorMetrics(), horizon_days=35
    )
    now = datetime.now(UTC)
    applier.apply([Message("usage", 0, 7, b"not json", now), Message("usage", 2, 40, None, now)])
    applier.apply([Message("usage", 0, 3, b"{}", now)])  # an earlier owner's late batch
    with engine.connect() as connection:
        rows = connection.execute(select(applied_offsets).order_by(applied_offsets.c.partition))
        assert [tuple(r) for r in rows] == [("usage", 0, 8), ("usage", 2, 41)]


def test_partitions_start_from_the_database_only_when_it_is_behind() -> None:
    committed: dict[int, int | None] = {0: 100, 1: 100, 2: None, 3: 50}
    # Behind: read again from the database's offset; ahead or equal: Kafka's stands; none
    # committed (the group's offsets expired): the database's, not the whole topic again.
    assert start_offsets({0: 60, 1: 100, 2: 10, 3: 80}, committed) == {0: 60, 2: 10}
    # A partition the database never applied, while it applied others: from the beginning.
    assert start_offsets({0: 100}, committed) == {1: 0, 3: 0}
    # Nothing recorded at all (a database upgraded to keep offsets): Kafka's offsets stand.
    assert start_offsets({}, committed) == {}


def test_an_upgraded_database_adopts_the_groups_committed_offsets_once(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str], postgres_url: str
) -> None:
    settings = settings_factory(topic=topic_factory(3), database_url=postgres_url)
    engine = migrated(settings)
    producer = Producer(client_config(settings.kafka_bootstrap))
    for partition in (0, 1):
        for _ in range(5):
            producer.produce(settings.topic, b"x", partition=partition)
    producer.flush(10)
    # The group's offsets as a worker from before the upgrade left them; partition 2 unused.
    consumer = Consumer(
        {**client_config(settings.kafka_bootstrap), "group.id": settings.consumer_group}
    )
    consumer.commit(
        offsets=[TopicPartition(settings.topic, 0, 5), TopicPartition(settings.topic, 1, 3)],
        asynchronous=False,
    )
    consumer.close()
    seed = partial(
        stored_or_seeded, engine, settings.kafka_bootstrap, settings.consumer_group, settings.topic
    )
    assert seed() == {0: 5, 1: 3}
    # From now on the database's offsets are the record: nothing to seek, on either partition.
    assert start_offsets(seed(), {0: 5, 1: 3, 2: None}) == {}
    engine.dispose()


def test_a_database_restored_under_a_running_worker_stops_it_and_the_next_resumes_from_it(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    postgres_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(topic=topic_factory(2), database_url=postgres_url)
    engine = migrated(settings)
    log = tmp_path / "worker.log"
    with worker(settings, log) as process:
        first = record_stream(settings, 300, seed=21)
        wait_until(lambda: all_applied(settings, engine), 60, "the first events applied")
        backup = snapshot_rows(engine)
        second = record_stream(settings, 300, seed=22, id_prefix="second-")
        wait_until(lambda: all_applied(settings, engine), 60, "the second events applied")
        restore_rows(engine, backup)  # the worker keeps running: its offsets are now ahead
        third = record_stream(settings, 300, seed=23, id_prefix="third-")
        wait_until(lambda: process.poll() is not None, 60, "the worker to stop")
    assert process.returncode == 75
    assert "the database went back in time" in log.read_text(errors="replace")
    with worker(settings, log):
        wait_until(lambda: all_applied(settings, engine), 60, "everything applied again")
    catalogue = load_catalogue(EXAMPLE_METERS)
    assert stored_totals(engine) == reference_totals(first + second + third, catalogue)
    engine.dispose()
