"""Fixtures for tests against the real parts: a Kafka-protocol broker, PostgreSQL, Stripe's SDK.

The broker is the embedded one unless METERSTREAM_KAFKA_BOOTSTRAP names another; PostgreSQL is
the server at METERSTREAM_TEST_POSTGRES_URL (default: the local one), where each session creates
and drops its own database.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from sqlalchemy import Engine

from meterstream.db import build_engine, migrate
from meterstream.embedded import embedded_broker
from meterstream.kafka import client_config, ensure_topic
from meterstream.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_METERS = ROOT / "examples" / "meters.toml"


POSTGRES_ADMIN_URL = os.environ.get(
    "METERSTREAM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@contextmanager
def fresh_postgres_database(options: str = "") -> Iterator[str]:
    """The URL of a new PostgreSQL database (CREATE DATABASE ``options``), dropped after."""
    name = f"meterstream_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" {options}')
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def migrated_engine_at(url: str) -> Iterator[Engine]:
    """An engine on the database at ``url``, migrated first, disposed after."""
    engine = build_engine(load_settings(database_url=url))
    migrate(engine)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that takes it runs twice: on real PostgreSQL and on SQLite."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite:///{tmp_path / 'meterstream.db'}"


@pytest.fixture
def postgres_engine(postgres_url: str) -> Iterator[Engine]:
    """An engine on a freshly migrated PostgreSQL database (for what only PostgreSQL has)."""
    with migrated_engine_at(postgres_url) as engine:
        yield engine


@pytest.fixture
def migrated_engine(database_url: str) -> Iterator[Engine]:
    """An engine on a freshly migrated database (PostgreSQL and SQLite, see database_url)."""
    with migrated_engine_at(database_url) as engine:
        yield engine


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    given = os.environ.get("METERSTREAM_KAFKA_BOOTSTRAP")
    if given:
        yield given
        return
    with embedded_broker() as broker:
        yield broker.bootstrap


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> Callable[..., str]:
    """Create a fresh uuid-named topic per call, so tests never see each other's events."""

    def create(partitions: int = 4) -> str:
        topic = f"test-{uuid.uuid4().hex[:12]}"
        ensure_topic(kafka_bootstrap, topic, partitions)
        return topic

    return create


@pytest.fixture
def settings_factory(kafka_bootstrap: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings for one test: the session's broker, a fresh topic, the example catalogue."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "kafka_bootstrap": kafka_bootstrap,
            "meters_file": EXAMPLE_METERS,
            "database_url": f"sqlite:///{tmp_path / 'meterstream.db'}",
            "kafka_session_timeout_s": 6.0,
            "consumer_group": f"test-group-{uuid.uuid4().hex[:8]}",
        }
        values.update(overrides)
        return load_settings(**values)

    return build


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[Any]:
    """Read ``expected`` messages from the start of every partition (no consumer group)."""
    consumer = Consumer(
        {
            **client_config(bootstrap),
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        messages: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(messages) < expected and time.monotonic() < deadline:
            for message in consumer.consume(10_000, timeout=0.5):
                if message.error() is None:
                    messages.append(message)
        return messages
    finally:
        consumer.close()
