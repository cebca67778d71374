"""The ledger's per-batch statements of a stream cycle (the newest row of 100 keys, the answer
to one call with the stamp of the next): right on both databases, and on PostgreSQL looked
up key by key in an index whatever the planner's statistics say, so a catch-up's cost per
batch never grows with the ledger."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, event, select

from meterstream.report_queue import queue_windows
from meterstream.schema import ledger as ledger_table
from meterstream.schema import report_queue
from reporters import ledger
from reporters.due import settle
from reporters.ledger import KeyHead, LedgerRow, bulk, key_heads, latest_row, model
from tests.reporters.test_ledger import (
    NOW,
    PLUS_5,
    pending_row,
    stored_text,
    wait_for_a_lock_wait,
)


def key_row(customer: str, sequence: int) -> LedgerRow:
    row = pending_row(sequence)
    identifier = ledger.identifier_for(
        customer, row.meter, row.window_start, row.window_end, 1, deployment_id="test"
    )
    return dataclasses.replace(row, customer_id=customer, identifier=identifier)


def insert(engine: Engine, rows: list[LedgerRow]) -> None:
    with engine.begin() as connection:
        ledger.insert_rows(connection, rows)


@contextmanager
def plans_of(engine: Engine, kinds: tuple[str, ...]) -> Iterator[list[str]]:
    """The EXPLAIN text of each statement starting with one of ``kinds`` run meanwhile."""
    plans: list[str] = []

    def explain(connection: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().startswith(kinds):
            cursor = connection.connection.dbapi_connection.cursor()
            cursor.execute(f"EXPLAIN {statement}", parameters)
            plans.append("\n".join(str(r[0]) for r in cursor.fetchall()))

    event.listen(engine, "before_cursor_execute", explain)
    try:
        yield plans
    finally:
        event.remove(engine, "before_cursor_execute", explain)


def test_key_heads_are_each_keys_newest_row(migrated_engine: Engine) -> None:
    engine = migrated_engine
    insert(engine, [key_row(f"cus_{c}", s) for c in range(5) for s in range(c + 1)])
    keys = {(f"cus_{c}", "tokens") for c in range(7)}  # cus_5 and cus_6 have no rows

    with engine.connect() as connection:
        heads = key_heads(connection, keys)
        expected = {}
        for key in sorted(keys):
            row = latest_row(connection, *key)
            if row is not None:
                expected[key] = KeyHead(row.sequence, row.accounted_total, row.units_total)

    assert heads == expected
    assert heads[("cus_4", "tokens")].sequence == 4
    assert set(heads) == {(f"cus_{c}", "tokens") for c in range(5)}


def test_key_heads_on_postgresql_never_read_other_keys_rows(postgres_engine: Engine) -> None:
    """A catch-up grows the ledger faster than autovacuum's statistics: with none, the planner
    hashed the whole ledger for every chunk of 100 keys (a cost that grew with history). Each
    key is now one backward step of ledger_sequence, whatever the statistics."""
    engine = postgres_engine
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE ledger SET (autovacuum_enabled = false)")
    insert(engine, [key_row(f"cus_{c:05d}", 0) for c in range(5_000)])
    keys = {(f"cus_{c:05d}", "tokens") for c in range(4_950, 5_050)}

    with plans_of(engine, ("SELECT", "WITH")) as plans, engine.connect() as connection:
        heads = key_heads(connection, keys)

    assert len(heads) == 50
    assert len(plans) == 1
    assert "Seq Scan on ledger" not in plans[0]
    assert "Hash" not in plans[0]
    assert "ledger_sequence" in plans[0]


def test_the_stream_answer_and_next_stamp_find_rows_by_identifier(
    migrated_engine: Engine,
) -> None:
    """The acceptance of one call and the stamp of the next: the rows still pending only,
    found through the identifier's index (never by status), and reported as updated. (With
    a ledger of a few thousand rows PostgreSQL rightly reads the whole table instead.)"""
    engine = migrated_engine
    rows = [key_row(f"cus_{c:05d}", 0) for c in range(20_000)]
    insert(engine, rows)
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.exec_driver_sql("ANALYZE ledger")
    accepted = [r.identifier for r in rows[:100]]
    to_stamp = [r.identifier for r in rows[100:200]]
    ledger.mark_acknowledged(engine, accepted[0], "sent", "req_0", NOW)  # settled elsewhere
    ledger.mark_rejected(engine, to_stamp[0], "invalid", "no", None, NOW)  # settled elsewhere

    sqlite = engine.dialect.name == "sqlite"
    with plans_of(engine, () if sqlite else ("UPDATE", "SELECT")) as plans:
        marked, stamped = ledger.accept_then_stamp(engine, accepted, to_stamp, NOW)

    assert marked == set(accepted[1:])
    assert stamped == set(to_stamp[1:])
    for plan in plans:
        assert "ledger_by_status" not in plan
        assert "ledger_identifier_key" in plan
    with engine.connect() as connection:
        found = dict(
            connection.execute(select(ledger_table.c.identifier, ledger_table.c.status)).all()
        )
        attempts = dict(
            connection.execute(select(ledger_table.c.identifier, ledger_table.c.attempts)).all()
        )
    assert [found[i] for i in accepted] == ["sent"] + ["accepted"] * 99
    assert [found[i] for i in to_stamp] == ["rejected"] + ["pending"] * 99
    assert [attempts[i] for i in to_stamp[1:]] == [2] * 99  # pending_row has 1 already
    assert all(found[r.identifier] == "pending" for r in rows[200:])
    assert all(attempts[r.identifier] == 1 for r in rows[200:])


def test_settle_deletes_the_queue_rows_still_at_the_revision_read(migrated_engine: Engine) -> None:
    """A chunk's queue rows leave in one call (driver-level on PostgreSQL): only those still
    at the revision read; a window changed since (a newer revision) keeps its row, and a
    time in another zone names the same instant."""
    engine = migrated_engine
    queued = [(f"cus_{c:03d}", "tokens", NOW - timedelta(hours=c), 1) for c in range(150)]
    with engine.begin() as connection:
        queue_windows(connection, queued)
        queue_windows(connection, [("cus_007", "tokens", NOW - timedelta(hours=7), 2)])
    read = [  # b"": the digest of a meter without dimensions
        (c, m, s.astimezone(PLUS_5) if n % 2 else s, b"", r)
        for n, (c, m, s, r) in enumerate(queued)
    ]

    with engine.begin() as connection:
        settle(connection, read[:100])

    with engine.connect() as connection:
        left = connection.execute(select(report_queue.c.customer_id, report_queue.c.revision)).all()
    assert sorted(left) == [("cus_007", 2), *((f"cus_{c:03d}", 1) for c in range(100, 150))]


def _rows_visited(plan: dict[str, Any]) -> int:
    """Rows that the plan's nodes returned, each node's rows times its loops, summed."""
    visited = int(plan.get("Actual Rows", 0) * plan.get("Actual Loops", 1))
    return visited + sum(_rows_visited(child) for child in plan.get("Plans", []))


def test_the_stream_acceptance_visits_each_row_a_bounded_number_of_times(
    postgres_engine: Engine,
) -> None:
    """The acceptance locks its rows in a subquery, then updates them: ``identifier IN
    (locking subquery)`` was planned as a nested loop rescanning the locked rows for every
    row updated (1,000 rows: 500,000 visited, 296 ms), which made the acceptor a large share
    of the database's time in a catch-up. Joined, each row is visited a few times."""
    engine = postgres_engine
    rows = [key_row(f"cus_{c:05d}", 0) for c in range(1_000)]
    insert(engine, rows)
    identifiers = [r.identifier for r in rows[:400]]
    plans: list[dict[str, Any]] = []

    def explain(connection: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().startswith("UPDATE ledger SET status"):
            cursor = connection.connection.dbapi_connection.cursor()
            cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters)
            plans.append(cursor.fetchone()[0][0]["Plan"])

    event.listen(engine, "before_cursor_execute", explain)
    try:
        explained = ledger.accept_then_stamp(engine, identifiers, [], NOW)
    finally:
        event.remove(engine, "before_cursor_execute", explain)

    assert explained == (set(), set())  # the EXPLAIN ANALYZE, run first, accepted them all
    assert len(plans) == 1
    assert _rows_visited(plans[0]) <= 10 * len(identifiers)


def test_settle_on_postgresql_locks_the_queue_rows_in_the_order_given(
    postgres_engine: Engine,
) -> None:
    """settle deletes a chunk's queue rows in one statement, locking them in the order given
    (the aggregators' key order, so neither can deadlock the other): with another transaction
    holding the last key's row, settle has taken every other row before it waits."""
    engine = postgres_engine
    queued = [(f"cus_{c:03d}", "tokens", NOW - timedelta(hours=1), 1) for c in range(50)]
    with engine.begin() as connection:
        queue_windows(connection, queued)
    keys = [(c, m, s, b"", r) for c, m, s, r in queued]
    admin_url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin_url) as holder, psycopg.connect(admin_url) as probe:
        holder.execute("SELECT 1 FROM report_queue WHERE customer_id = 'cus_049' FOR UPDATE")

        def settle_all() -> None:
            with engine.begin() as connection:
                settle(connection, keys)

        with ThreadPoolExecutor(1) as pool:
            settling = pool.submit(settle_all)
            wait_for_a_lock_wait(probe)
            unlocked = probe.execute(
                "SELECT customer_id FROM report_queue FOR UPDATE SKIP LOCKED"
            ).fetchall()
            probe.rollback()
            holder.rollback()
            settling.result(timeout=30)
    assert unlocked == []  # all taken by settle, but the last (the holder's)
    with engine.connect() as connection:
        assert connection.execute(select(report_queue.c.customer_id)).all() == []


_PG_TYPE_NAMES = {
    "character varying": "varchar",
    "text": "text",
    "bigint": "int8",
    "integer": "int4",
    "numeric": "numeric",
    "timestamp with time zone": "timestamptz",
    "bytea": "bytea",
}


def test_the_binary_copy_types_are_the_migrated_ledgers_own(postgres_engine: Engine) -> None:
    """Binary COPY sends each value in the binary form of the type it is told: one told
    int4 for a bigint column, say, would be misread. The migrated table decides."""
    with postgres_engine.connect() as connection:
        found = dict(
            connection.exec_driver_sql(
                "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
                "WHERE attrelid = 'ledger'::regclass AND attnum > 0 AND NOT attisdropped"
            ).all()
        )
    assert [_PG_TYPE_NAMES[found[name]] for name in bulk.COLUMNS] == list(bulk.COPY_TYPES)


_DECIMALS = st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
    lambda d: abs(d.adjusted()) < 60
)
_INT64 = st.integers(-(2**63), 2**63 - 1)
_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    totals=st.tuples(_DECIMALS, _DECIMALS, _DECIMALS),
    numbers=st.tuples(_INT64, _INT64, _INT64, _INT64, st.integers(0, 2**31 - 1)),
    texts=st.tuples(_TEXT, _TEXT, _TEXT),
    digest=st.binary(max_size=16),
)
def test_binary_copy_stores_what_sqlalchemy_stores(
    postgres_engine: Engine,
    totals: tuple[Decimal, Decimal, Decimal],
    numbers: tuple[int, int, int, int, int],
    texts: tuple[str, str, str],
    digest: bytes,
) -> None:
    """Generated values of every column type through the binary COPY and through SQLAlchemy's
    INSERT: the same text stored (a numeric's digits and scale included)."""
    row = dataclasses.replace(
        key_row(texts[0][:50] or "c", 1),
        window_value=totals[0],
        accounted_total=totals[1],
        unit_scale=totals[2],
        revision=numbers[0],
        units_total=numbers[1],
        value=numbers[2],
        sequence=numbers[3],
        attempts=numbers[4],
        last_error=texts[1],
        combination=texts[2],
        combination_digest=digest,
    )
    engine = postgres_engine
    with engine.begin() as connection:
        connection.execute(ledger_table.delete())
        connection.execute(ledger_table.insert(), [model.values_of(row)])
    expected = stored_text(engine)
    with engine.begin() as connection:
        connection.execute(ledger_table.delete())
        ledger.insert_rows(connection, [row])
    assert stored_text(engine) == expected
