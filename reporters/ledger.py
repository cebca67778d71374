"""The ledger: what was (or will be) sent to Stripe, under which identifier, and how it ended.

A row is written and committed before its call, then updated from the answer. Statuses:

- ``pending``   written, not yet acknowledged; resent (same identifier, same body) until it is.
                Each call is stamped first (``attempts`` + 1, ``first_attempt_at``) in a
                committed write (one statement for a round or batch of rows), so after a
                crash the ledger knows whether Stripe may have it.
- ``unknown``   pending, but its first call was more than ``UNKNOWN_AFTER`` ago: Stripe only
                promises to deduplicate an identifier for about 24 h, so a resend could bill
                twice. Never resent blindly; ``meterstream reconcile`` asks Stripe's summaries
                and marks it ``sent`` or back to ``pending``, or leaves it for a person.
- ``sent``      Stripe acknowledged it (v1: 200, or "already exists" for our own identifier).
- ``accepted``  the v2 stream answered 202: Stripe took it but validates later, so it is
                *unconfirmed*: not final for billing lag and status until ``meterstream
                reconcile`` finds it in Stripe's summaries and marks it ``sent``. Consuming
                Stripe's ``v1.billing.meter.error_report_triggered`` events is not implemented;
                a bad event shows as an ``accepted`` row that reconcile cannot confirm.
- ``rejected``  Stripe refused it for good (400), or it was too old to send; ``error_code`` and
                ``last_error`` say why. Its units stay accounted: a person decides.
- ``carried``   a sum-meter row worth 0 whole units; nothing to send, its fraction is carried.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from operator import attrgetter
from typing import Any, Literal

from sqlalchemy import Boolean, ColumnElement, Connection, Engine, bindparam, func, select, update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from meterstream.schema import ExactDecimal, UTCDateTime, ledger

Status = Literal["pending", "sent", "accepted", "rejected", "carried", "unknown"]
ACKNOWLEDGED: tuple[Status, ...] = ("sent", "accepted")
# Stripe has said its last word (or nothing needs saying), and it is confirmed: no more calls
# for the row, and billing is not behind on it. ``accepted`` is not here: see the docstring.
FINAL: tuple[Status, ...] = ("sent", "rejected", "carried")
# Stripe deduplicates identifiers and Idempotency-Keys for "at least 24 h"; 4 h of margin.
UNKNOWN_AFTER = timedelta(hours=20)


def identifier_for(
    customer_id: str, meter: str, window_start: datetime, window_end: datetime, revision: int
) -> str:
    """The meter event's identifier: deterministic, so a resend after a crash is recognised.

    A hash of the parts (customer ids may be long or hold any character), 52 characters, well
    under Stripe's 100. It holds no deployment namespace (no setting names one): two
    deployments reporting the same customer, meter and window to one Stripe account would
    collide, and the second would be taken as "already exists". Use one Stripe account (or
    distinct meters) per deployment.
    """
    parts = "\x1f".join(
        (customer_id, meter, window_start.isoformat(), window_end.isoformat(), str(revision))
    )
    return "ms1_" + hashlib.sha256(parts.encode("utf-8")).hexdigest()[:48]


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One ledger row; the fields of a meter event request are all here, so a resend is
    byte-for-byte the same request."""

    customer_id: str
    meter: str
    window_start: datetime
    window_end: datetime
    revision: int
    sequence: int
    total: Decimal
    accounted_total: Decimal
    units_total: int
    value: int
    event_name: str
    stripe_customer_id: str
    timestamp: datetime
    identifier: str
    status: str
    attempts: int
    first_attempt_at: datetime | None
    error_code: str | None
    last_error: str | None
    stripe_request_id: str | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None


_FIELDS: tuple[str, ...] = LedgerRow.__slots__


def _row(mapping: Any) -> LedgerRow:
    return LedgerRow(**{name: mapping[name] for name in _FIELDS})


def _values(row: LedgerRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in _FIELDS}


def latest_row(connection: Connection, customer_id: str, meter: str) -> LedgerRow | None:
    """The newest row of one (customer, meter): it carries the running totals."""
    found = (
        connection.execute(
            select(ledger)
            .where(ledger.c.customer_id == customer_id, ledger.c.meter == meter)
            .order_by(ledger.c.sequence.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    return None if found is None else _row(found)


def window_total(
    connection: Connection, customer_id: str, meter: str, window_start: datetime
) -> tuple[int, Decimal]:
    """(revision, exact total) of a window's newest row; (0, 0) if it was never reported."""
    found = connection.execute(
        select(ledger.c.revision, ledger.c.total)
        .where(
            ledger.c.customer_id == customer_id,
            ledger.c.meter == meter,
            ledger.c.window_start == window_start,
        )
        .order_by(ledger.c.revision.desc())
        .limit(1)
    ).first()
    return (0, Decimal(0)) if found is None else (int(found[0]), found[1])


def latest_window_row(
    connection: Connection, customer_id: str, meter: str, window_start: datetime
) -> LedgerRow | None:
    """The newest row of one window (its highest revision)."""
    found = (
        connection.execute(
            select(ledger)
            .where(
                ledger.c.customer_id == customer_id,
                ledger.c.meter == meter,
                ledger.c.window_start == window_start,
            )
            .order_by(ledger.c.revision.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    return None if found is None else _row(found)


def insert_row(connection: Connection, row: LedgerRow) -> None:
    connection.execute(ledger.insert().values(**_values(row)))


# -- bulk: the same reads and writes for many (customer, meter) pairs in one statement ---------

_l = ledger.c
_OTHER = ledger.alias("newer")
# Only the running totals: reading whole rows (seven times to parse, 23 columns to map) cost
# about 10 us of the 54 us of CPU that writing a row took once its (customer, meter) had one.
_KEY_HEADS = select(
    _l.customer_id, _l.meter, _l.sequence, _l.accounted_total, _l.units_total
).where(
    _l.customer_id.in_(bindparam("customers", expanding=True)),
    _l.meter.in_(bindparam("meters", expanding=True)),
    _l.sequence
    == select(func.max(_OTHER.c.sequence))
    .where(_OTHER.c.customer_id == _l.customer_id, _OTHER.c.meter == _l.meter)
    .scalar_subquery(),
)
_WINDOW_ROWS = select(
    _l.customer_id, _l.meter, _l.window_start, _l.revision, _l.total, _l.timestamp
).where(
    _l.customer_id.in_(bindparam("customers", expanding=True)),
    _l.meter.in_(bindparam("meters", expanding=True)),
    _l.window_start.in_(bindparam("starts", expanding=True)),
)
WindowKey = tuple[str, str, datetime]  # (customer_id, meter, window_start)


@dataclass(frozen=True, slots=True)
class KeyHead:
    """The newest ledger row of one (customer, meter): the running totals write_rows reads."""

    sequence: int
    accounted_total: Decimal
    units_total: int


@dataclass(frozen=True, slots=True)
class WindowHead:
    """The newest ledger row of one window: what write_row reads of it."""

    revision: int
    total: Decimal
    timestamp: datetime


def key_heads(
    connection: Connection, keys: Collection[tuple[str, str]]
) -> dict[tuple[str, str], KeyHead]:
    """The running totals of latest_row for every (customer, meter) of ``keys``, in one query."""
    if not keys:
        return {}
    found = connection.execute(
        _KEY_HEADS,
        {"customers": sorted({k[0] for k in keys}), "meters": sorted({k[1] for k in keys})},
    )
    return {
        (customer_id, meter): KeyHead(sequence, accounted_total, units_total)
        for customer_id, meter, sequence, accounted_total, units_total in found
        if (customer_id, meter) in keys
    }


def window_heads(
    connection: Connection, windows: Collection[WindowKey]
) -> dict[WindowKey, WindowHead]:
    """The newest row (highest revision) of every window of ``windows`` that has one."""
    if not windows:
        return {}
    found = connection.execute(
        _WINDOW_ROWS,
        {
            "customers": sorted({w[0] for w in windows}),
            "meters": sorted({w[1] for w in windows}),
            "starts": sorted({w[2] for w in windows}),
        },
    )
    heads: dict[WindowKey, WindowHead] = {}
    for customer_id, meter, window_start, revision, total, timestamp in found:
        key = (customer_id, meter, window_start)
        if key in windows and (key not in heads or revision > heads[key].revision):
            heads[key] = WindowHead(int(revision), total, timestamp)
    return heads


def insert_rows(connection: Connection, rows: Iterable[LedgerRow]) -> None:
    """Insert many rows in ``connection``'s transaction: one executemany of the driver, with
    the values converted here as the schema's types convert them (driver_values), which is
    several times cheaper than SQLAlchemy's per-row processing. Errors are SQLAlchemy's
    (IntegrityError for a second writer), as with ledger.insert()."""
    dialect = connection.dialect
    values = driver_values(dialect.name, rows)
    if values:
        # sqlite3 takes qmark, psycopg format; another driver needs its own placeholder here.
        placeholders = {"qmark": "?", "format": "%s", "pyformat": "%s"}
        if dialect.paramstyle not in placeholders:
            raise NotImplementedError(f"ledger inserts: paramstyle {dialect.paramstyle!r}")
        placeholder = placeholders[dialect.paramstyle]
        connection.exec_driver_sql(
            f"INSERT INTO ledger ({_INSERT_COLUMNS}) "  # noqa: S608  # fixed column names
            f"VALUES ({', '.join([placeholder] * len(_FIELDS))})",
            values,
        )


_INSERT_COLUMNS = ", ".join(f'"{name}"' for name in _FIELDS)
# The columns of a ledger row that the schema's types convert (UTCDateTime, ExactDecimal); the
# others (strings and integers) go to the driver as they are. test_ledger checks this against
# SQLAlchemy's own bind processors on SQLite and PostgreSQL.
_TIME_COLUMNS = frozenset(
    c.name for c in ledger.columns if isinstance(c.type, UTCDateTime) and c.name in _FIELDS
)
_DECIMAL_COLUMNS = frozenset(
    c.name for c in ledger.columns if isinstance(c.type, ExactDecimal) and c.name in _FIELDS
)


_ALL_FIELDS = attrgetter(*_FIELDS)  # a row's values as a tuple, in one C call
_TIME_INDEXES = tuple(i for i, name in enumerate(_FIELDS) if name in _TIME_COLUMNS)
_DECIMAL_INDEXES = tuple(i for i, name in enumerate(_FIELDS) if name in _DECIMAL_COLUMNS)


def driver_values(dialect_name: str, rows: Iterable[LedgerRow]) -> list[tuple[Any, ...]]:
    """The rows as the driver receives them from SQLAlchemy, columns in _FIELDS order.

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


class _FilterOnly(FunctionElement[bool]):
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


def _operands(element: _FilterOnly, compiler: SQLCompiler, **kw: Any) -> tuple[str, str]:
    column, value = element.clauses
    return compiler.process(column, **kw), compiler.process(value, **kw)


@compiles(_FilterOnly)
def _compile_plain(element: _FilterOnly, compiler: SQLCompiler, **kw: Any) -> str:
    column, value = _operands(element, compiler, **kw)
    return f"({column} = {value})"


@compiles(_FilterOnly, "sqlite")
def _compile_sqlite(element: _FilterOnly, compiler: SQLCompiler, **kw: Any) -> str:
    column, value = _operands(element, compiler, **kw)
    return f"likely({column} = {value})"


@compiles(_FilterOnly, "postgresql")
def _compile_postgresql(element: _FilterOnly, compiler: SQLCompiler, **kw: Any) -> str:
    column, value = _operands(element, compiler, **kw)
    return f"(({column} || '') = {value})"


def _still_pending() -> ColumnElement[bool]:
    return _FilterOnly(_l.status, "pending")


_STAMP = (
    update(ledger)
    .where(_l.identifier.in_(bindparam("identifiers", expanding=True)), _still_pending())
    .values(
        attempts=_l.attempts + 1,
        first_attempt_at=func.coalesce(_l.first_attempt_at, bindparam("now")),
        updated_at=bindparam("now"),
    )
    .returning(_l.identifier)
)


def start_attempts(engine: Engine, identifiers: Collection[str], now: datetime) -> set[str]:
    """start_attempt for many rows in one committed statement; the identifiers stamped (the
    others are no longer pending: do not call them)."""
    if not identifiers:
        return set()
    with engine.begin() as connection:
        return _start_attempts(connection, identifiers, now)


def _start_attempts(
    connection: Connection, identifiers: Collection[str], now: datetime
) -> set[str]:
    if not identifiers:
        return set()
    found = connection.execute(_STAMP, {"identifiers": list(identifiers), "now": now})
    return {str(identifier) for (identifier,) in found}


class AcknowledgementMismatchError(RuntimeError):
    """mark_all_acknowledged updated another number of rows than it found pending."""


_STILL_PENDING = (
    select(_l.identifier)
    .where(_l.identifier.in_(bindparam("identifiers", expanding=True)), _still_pending())
    # Locked in one order, so two writers locking overlapping rows cannot deadlock.
    .order_by(_l.identifier)
    .with_for_update()
)
_ACKNOWLEDGE = (
    update(ledger)
    .where(_l.identifier.in_(bindparam("identifiers", expanding=True)), _still_pending())
    .values(
        status=bindparam("new_status"),
        stripe_request_id=None,
        last_error=None,
        error_code=None,
        updated_at=bindparam("now"),
        sent_at=bindparam("now"),
    )
)
_SET_REQUEST_ID = (
    update(ledger)
    .where(_l.identifier == bindparam("row_identifier"), _l.status == bindparam("new_status"))
    .values(stripe_request_id=bindparam("request_id"))
)


def mark_all_acknowledged(
    engine: Engine, request_ids: Mapping[str, str | None], status: Status, now: datetime
) -> set[str]:
    """mark_acknowledged for many pending rows (identifier -> Stripe's request id) in one
    committed transaction; the identifiers updated (the others were settled elsewhere).

    Statements that compile once and stay cached (a CASE over 100 request ids compiled anew
    every time was a tenth of the v1 reporter's CPU): the rows still pending, locked in
    identifier order (PostgreSQL; SQLite's writer already holds the database); one update of
    them all, still guarded by ``status = 'pending'``, with no request id; then, in one
    executemany, the request id of each row that has one (the stream's rows have none). The
    rows each update changed must be the rows it meant to: the identifiers returned are those
    updated. If not (a row changed despite the lock), AcknowledgementMismatchError, and the
    transaction is rolled back: nothing is marked, the rows stay pending and are resent under
    their identifiers, which Stripe deduplicates.
    """
    if not request_ids:
        return set()
    with engine.begin() as connection:
        return _acknowledge(connection, request_ids, status, now)


def _acknowledge(
    connection: Connection, request_ids: Mapping[str, str | None], status: Status, now: datetime
) -> set[str]:
    if not request_ids:
        return set()
    found = connection.execute(_STILL_PENDING, {"identifiers": list(request_ids)})
    pending = {str(identifier) for (identifier,) in found}
    if pending:
        updated = connection.execute(
            _ACKNOWLEDGE,
            {"identifiers": sorted(pending), "new_status": status, "now": now},
        ).rowcount
        with_ids = [
            {"row_identifier": i, "new_status": status, "request_id": request_ids[i]}
            for i in sorted(pending)
            if request_ids[i] is not None
        ]
        ids_set = connection.execute(_SET_REQUEST_ID, with_ids).rowcount if with_ids else 0
        if updated != len(pending) or ids_set != len(with_ids):
            raise AcknowledgementMismatchError(
                f"acknowledging {len(pending)} pending ledger row(s) updated {updated} "
                f"(request ids: {ids_set} of {len(with_ids)}); rolled back, the rows stay "
                "pending (is another writer bypassing the lock?)"
            )
    return pending


def pending_rows(engine: Engine) -> list[LedgerRow]:
    """Every pending row, in the order its (customer, meter) must send them."""
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger)
            .where(ledger.c.status == "pending")
            .order_by(ledger.c.customer_id, ledger.c.meter, ledger.c.sequence)
        ).mappings()
        return [_row(mapping) for mapping in found]


def count_with_status(engine: Engine, status: Status) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                select(func.count()).select_from(ledger).where(ledger.c.status == status)
            ).scalar_one()
        )


def start_attempt(engine: Engine, identifier: str, now: datetime) -> bool:
    """Record, committed, that a call for a pending row is about to start; False if the row
    is no longer pending (another reporter or a late answer settled it): then do not call."""
    return _update(
        engine,
        identifier,
        "pending",
        attempts=ledger.c.attempts + 1,
        first_attempt_at=func.coalesce(ledger.c.first_attempt_at, now),
        updated_at=now,
    )


def mark_acknowledged(
    engine: Engine,
    identifier: str,
    status: Status,
    request_id: str | None,
    now: datetime,
    expected: Status = "pending",
) -> bool:
    return _update(
        engine,
        identifier,
        expected,
        status=status,
        stripe_request_id=request_id,
        last_error=None,
        error_code=None,
        updated_at=now,
        sent_at=now,
    )


def mark_rejected(
    engine: Engine,
    identifier: str,
    code: str,
    message: str,
    request_id: str | None,
    now: datetime,
) -> bool:
    return _update(
        engine,
        identifier,
        "pending",
        status="rejected",
        error_code=code,
        last_error=message,
        stripe_request_id=request_id,
        updated_at=now,
    )


def mark_attempt(engine: Engine, identifier: str, error: str, now: datetime) -> bool:
    """A failed try that may succeed later: the row stays pending."""
    return _update(engine, identifier, "pending", last_error=error, updated_at=now)


def mark_unknown(engine: Engine, identifier: str, reason: str, now: datetime) -> bool:
    """A pending row too old to resend blindly (UNKNOWN_AFTER); reconcile decides."""
    return _update(
        engine,
        identifier,
        "pending",
        status="unknown",
        error_code="resend_window_expired",
        last_error=reason,
        updated_at=now,
    )


def mark_pending_again(engine: Engine, identifier: str, now: datetime) -> bool:
    """An unknown row Stripe's summaries show it never recorded: safe to send afresh."""
    return _update(
        engine,
        identifier,
        "unknown",
        status="pending",
        first_attempt_at=None,
        error_code=None,
        last_error="reconcile: not in Stripe's summaries; sending again",
        updated_at=now,
    )


def confirm_accepted(engine: Engine, identifier: str, now: datetime) -> bool:
    """An ``accepted`` (v2 stream) row that Stripe's summaries show counted: ``sent``."""
    return _update(engine, identifier, "accepted", status="sent", updated_at=now)


def _update(engine: Engine, identifier: str, expected: Status, **values: Any) -> bool:
    """Update one row only while it has status ``expected``, so a late answer or a second
    reporter cannot overwrite a settled row; True if the row was updated."""
    with engine.begin() as connection:
        done = connection.execute(
            update(ledger)
            .where(ledger.c.identifier == identifier, _FilterOnly(ledger.c.status, expected))
            .values(values)
        )
        return bool(done.rowcount)


def rows_with_status(engine: Engine, status: Status) -> list[LedgerRow]:
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger)
            .where(ledger.c.status == status)
            .order_by(ledger.c.customer_id, ledger.c.meter, ledger.c.sequence)
        ).mappings()
        return [_row(mapping) for mapping in found]


def rows_for(engine: Engine, customer_id: str, meter: str) -> list[LedgerRow]:
    """Every row of one (customer, meter) in sending order (for people and tests)."""
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger)
            .where(ledger.c.customer_id == customer_id, ledger.c.meter == meter)
            .order_by(ledger.c.sequence)
        ).mappings()
        return [_row(mapping) for mapping in found]


def all_rows(engine: Engine) -> list[LedgerRow]:
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger).order_by(ledger.c.customer_id, ledger.c.meter, ledger.c.sequence)
        ).mappings()
        return [_row(mapping) for mapping in found]


def counts_by_status(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger.c.status, func.count()).group_by(ledger.c.status)
        ).all()
    return {str(status): int(count) for status, count in found}


def recent_rejections(engine: Engine, limit: int = 10) -> list[LedgerRow]:
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger)
            .where(ledger.c.status == "rejected")
            .order_by(ledger.c.updated_at.desc())
            .limit(limit)
        ).mappings()
        return [_row(mapping) for mapping in found]


def last_sent_at(engine: Engine) -> datetime | None:
    """When Stripe last acknowledged a row (None if never)."""
    with engine.connect() as connection:
        found: datetime | None = connection.execute(
            select(ledger.c.sent_at)
            .where(ledger.c.sent_at.is_not(None))
            .order_by(ledger.c.sent_at.desc())
            .limit(1)
        ).scalar()
    return found


def accept_then_stamp(
    engine: Engine, accepted: Collection[str], to_stamp: Collection[str], now: datetime
) -> tuple[set[str], set[str]]:
    """mark_all_acknowledged(``accepted``, status accepted) then start_attempts(``to_stamp``)
    in one committed transaction: the stream's answer to one call and the stamp of the next
    cost one commit. Returns (identifiers accepted, identifiers stamped); if either part
    fails, neither is written (the accepted rows stay pending and are resent under their
    identifiers, which Stripe deduplicates; the next batch is not called)."""
    with engine.begin() as connection:
        marked = _acknowledge(connection, dict.fromkeys(accepted), "accepted", now)
        return marked, _start_attempts(connection, to_stamp, now)
