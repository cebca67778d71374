"""mark_all_acknowledged on PostgreSQL and SQLite: it reports the rows it updated, and says so
loudly (rolling back) when the updates do not match the rows it found pending."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from sqlalchemy import Engine, event, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.exc import DatabaseError, IntegrityError

from meterstream.errors import AcknowledgementMismatchError
from meterstream.schema import ledger as ledger_table
from reporters import ledger
from reporters.ledger import (
    LedgerRow,
    all_rows,
    bulk,
    model,
    transitions,
)

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)


def pending_row(sequence: int) -> LedgerRow:
    start = NOW - timedelta(hours=sequence + 2)
    end = start + timedelta(hours=1)
    return LedgerRow(
        customer_id="cus_a",
        meter="tokens",
        window_start=start,
        window_end=end,
        revision=1,
        sequence=sequence,
        window_value=Decimal(3),
        accounted_total=Decimal(3 * (sequence + 1)),
        units_total=3 * (sequence + 1),
        value=3,
        event_name="tokens",
        stripe_customer_id="cus_a",
        timestamp=start,
        identifier=ledger.identifier_for("cus_a", "tokens", start, end, 1, deployment_id="test"),
        status="pending",
        attempts=1,
        first_attempt_at=NOW,
        error_code=None,
        last_error=None,
        stripe_request_id=None,
        created_at=NOW,
        updated_at=NOW,
        sent_at=None,
        unit_scale=Decimal(1),
    )


def insert_pending(engine: Engine, count: int) -> list[str]:
    rows = [pending_row(n) for n in range(count)]
    with engine.begin() as connection:
        ledger.insert_rows(connection, rows)
    return [row.identifier for row in rows]


def test_acknowledgement_reports_the_rows_it_updated(migrated_engine: Engine) -> None:
    identifiers = insert_pending(migrated_engine, 3)
    assert ledger.mark_acknowledged(migrated_engine, identifiers[0], "sent", "req_0", NOW)

    marked = ledger.mark_all_acknowledged(
        migrated_engine, {i: f"req_{n}" for n, i in enumerate(identifiers)}, "sent", NOW
    )

    assert marked == set(identifiers[1:])  # the first was settled before
    assert {r.identifier: r.stripe_request_id for r in all_rows(migrated_engine)} == {
        identifiers[0]: "req_0",
        identifiers[1]: "req_1",
        identifiers[2]: "req_2",
    }


def test_acknowledgement_without_a_request_id_leaves_it_empty(migrated_engine: Engine) -> None:
    identifiers = insert_pending(migrated_engine, 3)
    with migrated_engine.begin() as connection:
        connection.execute(update(ledger_table).values(stripe_request_id="req_old"))

    marked = ledger.mark_all_acknowledged(
        migrated_engine,
        {identifiers[0]: None, identifiers[1]: "req_1", identifiers[2]: None},
        "accepted",
        NOW,
    )

    assert marked == set(identifiers)
    assert [
        (r.status, r.stripe_request_id, r.sent_at, r.updated_at) for r in all_rows(migrated_engine)
    ] == [
        ("accepted", None, NOW, NOW),
        ("accepted", "req_1", NOW, NOW),
        ("accepted", None, NOW, NOW),
    ]


def test_acknowledgement_updating_fewer_rows_than_found_raises_and_rolls_back(
    migrated_engine: Engine,
) -> None:
    identifiers = insert_pending(migrated_engine, 3)
    settled = identifiers[1]

    # Between the select and the updates, a row stops being pending (what the row lock is
    # there to prevent), in the same transaction so neither database blocks on it.
    def settle_one_first(connection: Any, clauseelement: Any, *args: Any) -> None:
        if clauseelement is transitions._ACKNOWLEDGE:
            connection.execute(
                update(ledger_table)
                .where(ledger_table.c.identifier == settled)
                .values(status="rejected")
            )

    event.listen(migrated_engine, "before_execute", settle_one_first)
    try:
        with pytest.raises(AcknowledgementMismatchError, match=r"3 pending .* updated 2"):
            ledger.mark_all_acknowledged(
                migrated_engine, dict.fromkeys(identifiers, "req_x"), "sent", NOW
            )
    finally:
        event.remove(migrated_engine, "before_execute", settle_one_first)

    # Nothing of that transaction was committed: every row is still pending, unacknowledged.
    assert {(r.status, r.stripe_request_id) for r in all_rows(migrated_engine)} == {
        ("pending", None)
    }


def test_postgresql_locks_the_pending_rows_in_identifier_order() -> None:
    sql = str(transitions._STILL_PENDING.compile(dialect=postgresql.dialect()))

    assert sql.endswith("ORDER BY ledger.identifier FOR UPDATE")


# -- insert_rows goes to the driver directly: it must store what SQLAlchemy stores ------------

PLUS_5 = timezone(timedelta(hours=5, minutes=30))


FALL_BACK = datetime(2025, 11, 2, 1, 30, tzinfo=ZoneInfo("America/New_York"))


def varied_rows() -> list[LedgerRow]:
    """Rows with the values a conversion could get wrong: times in other zones, microseconds,
    shared and distinct times, None, decimals with exponents, fractions and negative signs."""
    rows = []
    decimals = [Decimal("3"), Decimal("0.000001"), Decimal("1E+3"), Decimal("-2.50"), Decimal(0)]
    for n, total in enumerate(decimals):
        base = pending_row(n)
        start = base.window_start.astimezone(PLUS_5) if n % 2 else base.window_start
        rows.append(
            dataclasses.replace(
                base,
                window_start=start,
                window_value=total,
                accounted_total=total * 3 + Decimal("0.125"),
                timestamp=base.timestamp + timedelta(microseconds=123_456 * n),
                status=("pending", "rejected", "sent", "carried", "unknown")[n],
                attempts=n,
                first_attempt_at=None if n % 2 else NOW.astimezone(PLUS_5),
                error_code="timestamp_too_old" if n == 1 else None,
                last_error="trop vieux — « 1 € »" if n == 1 else None,
                stripe_request_id=f"req_{n}" if n == 2 else None,
                # Rows 3 and 4: the two readings of New York's DST fall-back hour, equal as
                # Python datetimes, an hour apart as instants.
                created_at=FALL_BACK.replace(fold=n - 3) if n >= 3 else NOW,
                updated_at=NOW.astimezone(PLUS_5),
                sent_at=NOW + timedelta(seconds=n) if n == 2 else None,
            )
        )
    # Rows 5 and 6: UTC spelled otherwise than datetime.UTC (timezone(timedelta(0)),
    # ZoneInfo("UTC")), a UTC time with fold=1, and in one call the same instant in UTC and
    # in UTC+5:30 as well as times equal to those of the rows above.
    for n, zone in ((5, timezone(timedelta(0))), (6, ZoneInfo("UTC"))):
        base = pending_row(n)
        rows.append(
            dataclasses.replace(
                base,
                window_start=base.window_start.astimezone(zone),
                window_end=base.window_end.astimezone(PLUS_5),
                timestamp=base.window_start.replace(fold=1),
                first_attempt_at=NOW.astimezone(zone),
                created_at=NOW,
                updated_at=NOW.astimezone(PLUS_5),
                sent_at=base.window_start + timedelta(microseconds=1),
            )
        )
    return rows


def stored_text(engine: Engine) -> list[tuple[Any, ...]]:
    """Every stored value as the database holds it: SQLite's quote() shows the storage class
    and the exact text; PostgreSQL's ::text shows a numeric's scale."""
    if engine.dialect.name == "sqlite":
        columns = ", ".join(f'typeof("{c}"), quote("{c}")' for c in model.COLUMNS)
    else:
        columns = ", ".join(f'"{c}"::text' for c in model.COLUMNS)
    with engine.connect() as connection:
        return [
            tuple(r)
            for r in connection.exec_driver_sql(
                f"SELECT {columns} FROM ledger ORDER BY sequence"  # noqa: S608
            )
        ]


def test_insert_rows_stores_exactly_what_sqlalchemy_stores(migrated_engine: Engine) -> None:
    rows = varied_rows()
    with migrated_engine.begin() as connection:
        connection.execute(ledger_table.insert(), [model.values_of(row) for row in rows])
    by_sqlalchemy, stored_by_sqlalchemy = all_rows(migrated_engine), stored_text(migrated_engine)
    with migrated_engine.begin() as connection:
        connection.execute(ledger_table.delete())
    with migrated_engine.begin() as connection:
        ledger.insert_rows(connection, rows)

    assert all_rows(migrated_engine) == by_sqlalchemy
    assert stored_text(migrated_engine) == stored_by_sqlalchemy
    assert len(by_sqlalchemy) == len(rows)


@pytest.mark.parametrize("dialect", [sqlite.dialect(), psycopg_dialect.dialect()])
def test_driver_values_are_sqlalchemys_bind_processing(dialect: Any) -> None:
    rows = varied_rows()
    columns = [ledger_table.c[name] for name in model.COLUMNS]
    processors = [column.type._cached_bind_processor(dialect) for column in columns]
    expected = [
        tuple(
            value if process is None else process(value)
            for value, process in zip(model.values_of(row).values(), processors, strict=True)
        )
        for row in rows
    ]

    got = ledger.driver_values(dialect.name, rows)

    assert got == expected
    assert [[type(v) for v in row] for row in got] == [[type(v) for v in row] for row in expected]
    # Equal is not enough: the same time zone object, fold, digits of a decimal.
    assert [[repr(v) for v in row] for row in got] == [[repr(v) for v in row] for row in expected]
    # Every column the raw path passes through unchanged has no SQLAlchemy conversion.
    for name, process in zip(model.COLUMNS, processors, strict=True):
        if name not in bulk.TIME_COLUMNS | bulk.DECIMAL_COLUMNS:
            assert process is None, name


class _NoOffset(tzinfo):
    """A zone that does not know its offset: Python treats its times as naive."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
@pytest.mark.parametrize("zone", [None, _NoOffset()])
def test_driver_values_refuse_a_time_without_an_offset(dialect: str, zone: tzinfo | None) -> None:
    rows = [*varied_rows(), dataclasses.replace(pending_row(9), sent_at=NOW.replace(tzinfo=zone))]
    with pytest.raises(ValueError, match="naive datetime"):
        ledger.driver_values(dialect, rows)


def test_insert_rows_refuses_a_naive_time_and_reports_a_second_writer(
    migrated_engine: Engine,
) -> None:
    naive = dataclasses.replace(pending_row(0), created_at=NOW.replace(tzinfo=None))
    with pytest.raises(ValueError, match="naive datetime"), migrated_engine.begin() as connection:
        ledger.insert_rows(connection, [naive])
    insert_pending(migrated_engine, 2)
    with pytest.raises(IntegrityError), migrated_engine.begin() as connection:
        ledger.insert_rows(connection, [pending_row(5), pending_row(1)])
    # The refused statement wrote nothing: the two rows of the first insert only.
    assert [r.sequence for r in all_rows(migrated_engine)] == [0, 1]


def test_a_batch_of_rows_is_found_by_identifier_not_by_status(migrated_engine: Engine) -> None:
    """A batch of 100 identifiers (and a single row's update) is looked up in the identifier's
    unique index, with a backlog of pending rows. Otherwise both databases walked every pending row
    (ledger_by_status) once per batch, which made a cycle quadratic in its backlog: SQLite
    without statistics; PostgreSQL with statistics that say pending rows are rare (taken
    before the backlog built up, as here). Measured on PostgreSQL with 24,000 pending rows
    (stamp and acknowledgement of one batch of 100): 73 ms before, 4.5 ms now."""
    engine = migrated_engine
    sqlite = engine.dialect.name == "sqlite"
    backlog = insert_pending(engine, 10_000)
    if not sqlite:  # SQLite databases have no statistics: the reporter never runs ANALYZE
        with engine.begin() as connection:
            connection.exec_driver_sql("ALTER TABLE ledger SET (autovacuum_enabled = false)")
            connection.execute(update(ledger_table).values(status="sent"))
            connection.exec_driver_sql("ANALYZE ledger")  # the statistics: pending rows are rare
            connection.execute(update(ledger_table).values(status="pending"))
    plans: list[tuple[str, str]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def explain(
        connection: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any
    ) -> None:
        if statement.startswith(("SELECT", "UPDATE")):
            cursor = connection.connection.dbapi_connection.cursor()
            prefix = "EXPLAIN QUERY PLAN" if sqlite else "EXPLAIN"
            cursor.execute(f"{prefix} {statement}", parameters)
            plans.append((statement.split()[0], " ".join(str(r[-1]) for r in cursor.fetchall())))

    identifiers = backlog[:100]
    assert ledger.start_attempts(engine, identifiers, NOW) == set(identifiers)
    acknowledged = ledger.mark_all_acknowledged(engine, dict.fromkeys(identifiers), "accepted", NOW)
    assert acknowledged == set(identifiers)
    assert ledger.mark_attempt(engine, backlog[100], "timed out", NOW)  # one row: _update
    event.remove(engine, "before_cursor_execute", explain)

    assert [kind for kind, _plan in plans] == ["UPDATE", "SELECT", "UPDATE", "UPDATE"]
    for _kind, plan in plans:
        assert "ledger_by_status" not in plan
        assert ("(identifier=?)" if sqlite else "ledger_identifier_key") in plan


def test_accept_then_stamp_writes_both_or_neither(migrated_engine: Engine) -> None:
    """The answer to one stream call and the stamp of the next share a transaction: if the
    stamp fails, the accepted rows stay pending (resent under their identifiers)."""
    first, second = insert_pending(migrated_engine, 4)[:2], insert_pending_later(migrated_engine)
    accepted, stamped = ledger.accept_then_stamp(migrated_engine, first, [second], NOW)
    assert (accepted, stamped) == (set(first), {second})

    with migrated_engine.begin() as connection:
        connection.execute(update(ledger_table).values(status="pending"))
    refuse_updates_of(migrated_engine, second)
    with pytest.raises(DatabaseError):
        ledger.accept_then_stamp(migrated_engine, first, [second], NOW)
    assert all(r.status == "pending" for r in all_rows(migrated_engine))


def insert_pending_later(engine: Engine) -> str:
    row = dataclasses.replace(pending_row(10), customer_id="cus_b")
    row = dataclasses.replace(
        row,
        identifier=ledger.identifier_for(
            "cus_b",
            row.meter,
            row.window_start,
            row.window_end,
            row.revision,
            deployment_id="test",
        ),
    )
    with engine.begin() as connection:
        ledger.insert_rows(connection, [row])
    return row.identifier


def refuse_updates_of(engine: Engine, identifier: str) -> None:
    """A trigger failing any update of one row (PostgreSQL and SQLite)."""
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE UPDATE ON ledger "
                f"WHEN OLD.identifier = '{identifier}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
            return
        connection.exec_driver_sql(
            "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql"
        )
        connection.exec_driver_sql(
            "CREATE TRIGGER refuse BEFORE UPDATE ON ledger FOR EACH ROW "
            f"WHEN (OLD.identifier = '{identifier}') EXECUTE FUNCTION refuse()"
        )


def test_stream_acceptance_locks_its_rows_in_identifier_order(postgres_engine: Engine) -> None:
    """Two writers accepting overlapping batches cannot deadlock only if each locks its rows
    in one global order. The rows here lie in the table in the reverse of identifier order
    (a seq or bitmap heap scan meets them so); another transaction holds the row of the
    largest identifier. Locking in identifier order, the acceptance takes every other row
    before it waits on that one; in the table's order it waits before taking any."""
    engine = postgres_engine
    rows = sorted((pending_row(n) for n in range(20)), key=lambda r: r.identifier, reverse=True)
    with engine.begin() as connection:
        ledger.insert_rows(connection, rows)
    identifiers = [row.identifier for row in rows]
    largest = identifiers[0]
    admin_url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin_url) as holder, psycopg.connect(admin_url) as probe:
        holder.execute("SELECT 1 FROM ledger WHERE identifier = %s FOR UPDATE", [largest])
        with ThreadPoolExecutor(1) as pool:
            accepting = pool.submit(ledger.accept_then_stamp, engine, identifiers, [], NOW)
            wait_for_a_lock_wait(probe)
            unlocked = probe.execute(
                "SELECT identifier FROM ledger WHERE identifier = ANY(%s) "
                "ORDER BY identifier FOR UPDATE SKIP LOCKED",
                [identifiers],
            ).fetchall()
            probe.rollback()
            holder.rollback()
            accepted, _stamped = accepting.result(timeout=30)
    assert unlocked == []  # all taken by the acceptance, but the largest (the holder's)
    assert accepted == set(identifiers)


def wait_for_a_lock_wait(connection: psycopg.Connection[Any]) -> None:
    """Until some session of this database waits on a lock (polls pg_stat_activity), within
    30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        waiting = connection.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
        connection.rollback()
        if waiting is not None and waiting[0] > 0:
            return
        time.sleep(0.01)
    raise AssertionError("the acceptance never waited on the held row")


def test_a_stamp_taken_back_leaves_a_first_attempt_only_where_another_stamp_stays(
    migrated_engine: Engine,
) -> None:
    """undo_attempts takes back one stamp: a row left with none has no first attempt (it was
    never called); a row with an earlier call keeps its first attempt. A row reconcile made
    pending again has no stamp either: stamped then taken back, it has no first attempt,
    whenever its earlier stamps were made (stamped_at no longer tells them apart)."""
    never, twice, again = insert_pending(migrated_engine, 3)  # each stamped once, at NOW
    later = NOW + timedelta(minutes=5)
    ledger.start_attempts(migrated_engine, [twice], later)
    with migrated_engine.begin() as connection:
        connection.execute(
            update(ledger_table).where(ledger_table.c.identifier == again).values(status="unknown")
        )
    assert ledger.mark_pending_again(migrated_engine, again, later)
    ledger.start_attempts(migrated_engine, [again], later)

    ledger.undo_attempts(migrated_engine, [never, twice, again], later)

    found = {row.identifier: row for row in all_rows(migrated_engine)}
    assert (found[never].attempts, found[never].first_attempt_at) == (0, None)
    assert (found[twice].attempts, found[twice].first_attempt_at) == (1, NOW)
    assert (found[again].attempts, found[again].first_attempt_at) == (0, None)
