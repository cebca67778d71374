"""meterstream.db's engines: PostgreSQL's batch arrays go in binary, and come back the same."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.adapt import PyFormat
from psycopg.pq import Format
from sqlalchemy import Engine

from meterstream.db import BinaryArray, build_engine
from meterstream.settings import load_settings

# PostgreSQL's text holds any character but NUL; a lone surrogate has no UTF-8 at all.
_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30
)


def test_a_binary_array_is_dumped_in_binary(postgres_url: str) -> None:
    engine = build_engine(load_settings(database_url=postgres_url))
    try:
        with engine.connect() as connection:
            raw = connection.connection.dbapi_connection
            assert raw is not None
            dumper = raw.adapters.get_dumper(BinaryArray, PyFormat.AUTO)
            assert dumper.format == Format.BINARY
    finally:
        engine.dispose()


def test_binary_arrays_of_every_kind_come_back_the_same(postgres_url: str) -> None:
    engine = build_engine(load_settings(database_url=postgres_url))
    plus_5 = timezone(timedelta(hours=5))
    at = datetime(2026, 1, 5, 12, 30, 15, 123456, tzinfo=plus_5)
    try:
        with engine.connect() as connection:
            found = connection.exec_driver_sql(
                "SELECT %s::varchar[], %s::bigint[], %s::timestamptz[], %s::bytea[], %s::varchar[]",
                (
                    BinaryArray(["a,b", 'q"', "{x}", "é\\", "", "NULL"]),
                    BinaryArray([0, -(2**63), 2**63 - 1]),
                    BinaryArray([at]),
                    BinaryArray([b"\x00\xff", b""]),
                    BinaryArray([]),
                ),
            ).one()
    finally:
        engine.dispose()
    assert found == (
        ["a,b", 'q"', "{x}", "é\\", "", "NULL"],
        [0, -(2**63), 2**63 - 1],
        [at.astimezone(UTC)],
        [b"\x00\xff", b""],
        [],
    )


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=st.lists(_TEXT, max_size=20))
def test_any_strings_come_back_the_same(postgres_engine: Engine, values: list[str]) -> None:
    with postgres_engine.connect() as connection:
        (found,) = connection.exec_driver_sql("SELECT %s::varchar[]", (BinaryArray(values),)).one()
    assert found == values
