"""Database engines and migrations: PostgreSQL (psycopg 3) in production, SQLite embedded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import ArgumentError

from meterstream.errors import ConfigError
from meterstream.settings import Settings, redact_url

MIGRATIONS = Path(__file__).parent / "migrations"


def database_url(settings: Settings) -> str:
    """The SQLAlchemy URL: Settings already spells PostgreSQL with psycopg 3 as its driver."""
    return settings.database_url


def build_engine(settings: Settings, **options: Any) -> Engine:
    """An engine for ``settings.database_url``. SQLite writers take the write lock at BEGIN, so a
    read-modify-write transaction can never interleave with another writer's.

    Raises ConfigError naming the variable when SQLAlchemy cannot read the URL; the message shows
    the URL without its password (SQLAlchemy's own message may quote a part of it).
    """
    url = database_url(settings)
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30}, **options)
            event.listen(engine, "connect", _sqlite_connect)
            event.listen(engine, "begin", _sqlite_begin)
            return engine
        return create_engine(url, pool_pre_ping=True, **options)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(
            f"METERSTREAM_DATABASE_URL={redact_url(url)}: not a URL SQLAlchemy can read "
            f"({type(exc).__name__}); check the port is a number and that special characters "
            "in the user or password are %-encoded"
        ) from None


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Hand transaction control to the "begin" hook below instead of the sqlite3 module.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (Alembic); safe to run again."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
