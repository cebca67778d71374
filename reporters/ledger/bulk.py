"""The ledger's driver-level writes and the planner hint its updates use.

insert_rows hands the driver the values already converted as the schema's types would
convert them, as one COPY on PostgreSQL and one executemany elsewhere (several times cheaper
than SQLAlchemy's per-row processing); FilterOnly keeps a ``status = ...`` test out of the
planner's index choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from operator import attrgetter
from typing import Any

import psycopg
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Connection,
    Integer,
    LargeBinary,
    String,
    Text,
    bindparam,
    func,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from meterstream.schema import (
    LEDGER_COUNT_SLOTS,
    ExactDecimal,
    UTCDateTime,
    ledger,
    ledger_rows_written,
)
from reporters.ledger.model import COLUMNS, FIELDS, LedgerRow, values_of


def insert_row(connection: Connection, row: LedgerRow) -> None:
    """Insert one row in ``connection``'s transaction (SQLAlchemy's own processing)."""
    connection.execute(ledger.insert().values(**values_of(row)))
    count_written(connection, 1)


def count_written(connection: Connection, rows: int) -> None:
    """Add ``rows`` to the ledger's written-rows counter in the inserting transaction (the
    restore mark's measure: reporters/restore.py), in this connection's own slot."""
    if connection.dialect.name == "postgresql":
        slot: Any = func.pg_backend_pid() % LEDGER_COUNT_SLOTS
        insert: Any = postgresql_insert(ledger_rows_written)
    else:  # SQLite has one writer at a time
        slot, insert = 0, sqlite_insert(ledger_rows_written)
    statement = insert.values(slot=slot, rows=rows)
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=[ledger_rows_written.c.slot],
            set_={"rows": ledger_rows_written.c.rows + statement.excluded.rows},
        )
    )


def insert_rows(connection: Connection, rows: Iterable[LedgerRow]) -> None:
    """Insert many rows in ``connection``'s transaction: one COPY or executemany of the driver, with
    the values converted here as the schema's types convert them (driver_values), which is
    several times cheaper than SQLAlchemy's per-row processing. Errors are SQLAlchemy's
    (IntegrityError for a second writer), as with ledger.insert()."""
    dialect = connection.dialect
    values = driver_values(dialect.name, rows)
    if values and dialect.name == "postgresql":
        _copy_rows(connection, values)
        count_written(connection, len(values))
    elif values:
        # sqlite3 takes qmark, psycopg format; another driver needs its own placeholder here.
        placeholders = {"qmark": "?", "format": "%s", "pyformat": "%s"}
        if dialect.paramstyle not in placeholders:
            raise NotImplementedError(f"ledger inserts: paramstyle {dialect.paramstyle!r}")
        placeholder = placeholders[dialect.paramstyle]
        connection.exec_driver_sql(
            f"INSERT INTO ledger ({_INSERT_COLUMNS}) "  # noqa: S608  # fixed column names
            f"VALUES ({', '.join([placeholder] * len(FIELDS))})",
            values,
        )
        count_written(connection, len(values))


def _copy_rows(connection: Connection, values: Sequence[tuple[Any, ...]]) -> None:
    """PostgreSQL: the rows through one binary COPY in ``connection``'s transaction. A third
    of the server's CPU and under half of ours of the pipelined executemany it replaced (a
    statement per row); binary rather than text: 3.7 against 8.9 us of our CPU a row, and
    less of the server's (it parses no text). A unique violation (a second writer) is
    SQLAlchemy's IntegrityError, as for an INSERT."""
    driver = connection.connection.driver_connection
    if not isinstance(driver, psycopg.Connection):  # the only PostgreSQL driver configured
        raise NotImplementedError(f"ledger inserts: PostgreSQL driver {type(driver).__name__}")
    try:
        with (
            driver.cursor() as cursor,
            cursor.copy(f"COPY ledger ({_INSERT_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(COPY_TYPES)
            for row in values:
                copy.write_row(row)
    except psycopg.IntegrityError as exc:
        raise IntegrityError("COPY ledger", None, exc) from exc


_INSERT_COLUMNS = ", ".join(f'"{name}"' for name in COLUMNS)


# The PostgreSQL type name of each of the ledger's column types, as binary COPY must be told
# it: a value in another type's binary form would be misread, so test_ledger checks these
# names against the migrated table's own types. Subclasses before their bases.
_COPY_TYPE_NAMES: tuple[tuple[type[Any], str], ...] = (
    (UTCDateTime, "timestamptz"),
    (ExactDecimal, "numeric"),
    (BigInteger, "int8"),
    (Integer, "int4"),
    (LargeBinary, "bytea"),
    (Text, "text"),
    (String, "varchar"),
)


def _postgresql_type(column: Column[Any]) -> str:
    for kind, name in _COPY_TYPE_NAMES:
        if isinstance(column.type, kind):
            return name
    raise NotImplementedError(f"ledger.{column.name}: no binary COPY type for {column.type!r}")


COPY_TYPES = tuple(_postgresql_type(ledger.c[name]) for name in COLUMNS)
# The columns of a ledger row that the schema's types convert (UTCDateTime, ExactDecimal); the
# others (strings and integers) go to the driver as they are. test_ledger checks this against
# SQLAlchemy's own bind processors on SQLite and PostgreSQL.
TIME_COLUMNS = frozenset(
    c.name for c in ledger.columns if isinstance(c.type, UTCDateTime) and c.name in COLUMNS
)
DECIMAL_COLUMNS = frozenset(
    c.name for c in ledger.columns if isinstance(c.type, ExactDecimal) and c.name in COLUMNS
)


_ALL_FIELDS = attrgetter(*FIELDS)  # a row's values as a tuple, in one C call
_TIME_INDEXES = tuple(i for i, name in enumerate(COLUMNS) if name in TIME_COLUMNS)
_DECIMAL_INDEXES = tuple(i for i, name in enumerate(COLUMNS) if name in DECIMAL_COLUMNS)


def driver_values(dialect_name: str, rows: Iterable[LedgerRow]) -> list[tuple[Any, ...]]:
    """The rows as the driver receives them from SQLAlchemy, columns in FIELDS order.

    UTCDateTime: a naive datetime is refused (ValueError); else the UTC time, aware for
    PostgreSQL, and on SQLite the text SQLAlchemy's SQLite DATETIME writes
    ('YYYY-MM-DD HH:MM:SS.ffffff' of the naive UTC time). ExactDecimal: unchanged for
    PostgreSQL, format(value, "f") on SQLite. None stays None. Each distinct time is
    converted once per call.
    """
    sqlite = dialect_name == "sqlite"
    time = _TimeConverter(sqlite)  # one for all the time columns: they share values
    converters: list[tuple[int, Callable[[Any], Any]]] = [(i, time) for i in _TIME_INDEXES]
    if sqlite:  # PostgreSQL takes the Decimal as it is
        converters += [(i, _decimal_text) for i in _DECIMAL_INDEXES]
    values: list[tuple[Any, ...]] = []
    for row in rows:
        found = list(_ALL_FIELDS(row))
        for i, convert in converters:
            value = found[i]
            if value is not None:
                found[i] = convert(value)
        values.append(tuple(found))
    return values


def _decimal_text(value: Decimal) -> str:
    return format(value, "f")


class _TimeConverter:
    """UTCDateTime's bind processing for one driver_values call, each distinct time once."""

    __slots__ = ("_by_instant", "_sqlite", "_utc")

    def __init__(self, sqlite: bool) -> None:
        self._sqlite = sqlite
        # Times in UTC itself (nearly all: the reporter reads and makes them so), keyed by
        # value alone: within one zone without DST, equal means the same instant.
        self._utc: dict[datetime, Any] = {}
        # Any other zone: keyed with the offset too, since two readings of a DST fall-back
        # hour in one zone compare equal (and hash alike) while they are an hour apart.
        self._by_instant: dict[tuple[datetime, timedelta | None], Any] = {}

    def __call__(self, value: datetime) -> Any:
        if value.tzinfo is UTC:
            if not self._sqlite:
                return value  # what value.astimezone(UTC) returns: the same object
            found = self._utc.get(value)
            if found is None:
                found = self._utc[value] = value.replace(tzinfo=None).isoformat(" ", "microseconds")
            return found
        key = (value, value.utcoffset())
        found = self._by_instant.get(key)
        if found is None:
            if value.tzinfo is None or key[1] is None:
                raise ValueError(f"naive datetime {value!r}: meterstream stores UTC times only")
            utc = value.astimezone(UTC)
            found = utc.replace(tzinfo=None).isoformat(" ", "microseconds") if self._sqlite else utc
            self._by_instant[key] = found
        return found


class FilterOnly(FunctionElement[bool]):
    """``column = value``, tested on the rows the other conditions find and never used to
    find them. For ``identifier IN (100 ids) AND status = 'pending'`` both databases
    otherwise walk every pending row through ledger_by_status, once per batch, which makes
    a cycle quadratic in its backlog: SQLite because without statistics it guesses that an
    equality on an index matches about 10 rows, PostgreSQL because its statistics say what
    the table held at its last ANALYZE (a fresh table, or one where pending rows were rare
    until a backlog built up). SQLite: ``likely()`` (a hint); PostgreSQL: ``column || ''``,
    an expression no index covers. Elsewhere plain SQL."""

    type = Boolean()
    inherit_cache = True

    def __init__(self, column: ColumnElement[str], value: str) -> None:
        super().__init__(column, bindparam(None, value, type_=column.type))


def _operands(element: FilterOnly, compiler: SQLCompiler, **kw: Any) -> tuple[str, str]:
    column, value = element.clauses
    return compiler.process(column, **kw), compiler.process(value, **kw)


@compiles(FilterOnly)
def _compile_plain(element: FilterOnly, compiler: SQLCompiler, **kw: Any) -> str:
    column, value = _operands(element, compiler, **kw)
    return f"({column} = {value})"


@compiles(FilterOnly, "sqlite")
def _compile_sqlite(element: FilterOnly, compiler: SQLCompiler, **kw: Any) -> str:
    column, value = _operands(element, compiler, **kw)
    return f"likely({column} = {value})"


@compiles(FilterOnly, "postgresql")
def _compile_postgresql(element: FilterOnly, compiler: SQLCompiler, **kw: Any) -> str:
    column, value = _operands(element, compiler, **kw)
    return f"(({column} || '') = {value})"


def still_pending() -> ColumnElement[bool]:
    return FilterOnly(ledger.c.status, "pending")
