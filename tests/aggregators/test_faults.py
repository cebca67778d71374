"""Whose fault a failure is, decided by what the error is: real errors from real databases."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from aggregators.faults import is_database_failure
from tests.conftest import POSTGRES_ADMIN_URL


def _error_of(url: str, statement: str) -> DBAPIError:
    """The error of ``statement`` (several, separated by "; ", run in one transaction)."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with pytest.raises(DBAPIError) as caught, engine.connect() as connection:
            for part in statement.split("; "):
                connection.execute(text(part))
        return caught.value
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("statement", "database_failure"),
    [
        ("SELECT 1 / 0", False),  # 22012: this value's fault
        ("SELECT 'x'::int", False),  # 22P02
        ("SELECT chr(0)", False),  # 54000: a value PostgreSQL text cannot hold
        ("SELECT * FROM no_such_table", True),  # 42P01: the schema, not a message
        ("SELECT pg_terminate_backend(pg_backend_pid())", True),  # 57P01: the server went away
        # 25006: a standby promoted/demoted under us (failover), or a read-only default.
        ("SET TRANSACTION READ ONLY; CREATE TEMP TABLE ro (x int)", True),
        ("EXECUTE nosuch", True),  # 26000: a prepared statement a pooler (PgBouncer) lost
        # 23514 without a constraint: a day partition of seen_events dropped under the worker.
        (
            "CREATE TEMP TABLE parted (d date) PARTITION BY RANGE (d); "
            "INSERT INTO parted VALUES ('2026-12-05')",
            True,
        ),
        # 23514 with a constraint: a CHECK the row's values break, the message's fault.
        ("CREATE TEMP TABLE checked (v int CHECK (v > 0)); INSERT INTO checked VALUES (-1)", False),
    ],
)
def test_postgresql_errors_are_told_apart_by_their_sqlstate(
    statement: str, database_failure: bool
) -> None:
    assert is_database_failure(_error_of(POSTGRES_ADMIN_URL, statement)) is database_failure


def test_a_refused_connection_is_the_databases_failure() -> None:
    error = _error_of("postgresql://postgres@127.0.0.1:1/postgres", "SELECT 1")
    assert is_database_failure(error)


def test_a_locked_sqlite_file_is_the_databases_failure(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path)
    try:
        holder.execute("BEGIN IMMEDIATE")
        engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
        try:
            with pytest.raises(DBAPIError) as caught, engine.begin() as connection:
                connection.execute(text("CREATE TABLE t (x)"))
        finally:
            engine.dispose()
    finally:
        holder.close()
    assert is_database_failure(caught.value)
    assert not is_database_failure(ValueError("year 58894 is out of range"))
