"""settle locks report_queue rows in Python's order (code points): reporters/due.py says that
is the aggregators' order. The aggregators' PostgreSQL statement (aggregators/postgres.py)
upserts them ``ORDER BY customer_id, meter, ...`` in the database's collation, which is
Python's only in a C database. In one whose collation is not C (the postgres image's
initdb default is en_US.utf8) the orders differ for ordinary customer ids ("a1", "a_1"),
and an aggregator batch and a reporter writer deadlock: PostgreSQL aborts one of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from typing import TypeVar

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from aggregators.postgres import upsert_totals
from meterstream.report_queue import queue_windows
from reporters.due import DueWindow, settle
from reporters.held_windows import set_aside
from reporters.rows import HELD_NO_CUSTOMER_LINK
from tests.conftest import fresh_postgres_database, migrated_engine_at
from tests.reporters.test_ledger import NOW, wait_for_a_lock_wait

_KINDS = {"additive": ["tokens"], "max": [], "min": []}
_START = NOW - timedelta(hours=1)
T = TypeVar("T")


@pytest.fixture
def en_us_engine() -> Iterator[Engine]:
    """A migrated database whose default collation is ICU en-US (not C)."""
    en_us = "TEMPLATE template0 LOCALE 'C.UTF-8' LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
    with fresh_postgres_database(en_us) as url, migrated_engine_at(url) as engine:
        yield engine


def _batch(customers: list[str]) -> list[tuple]:
    return [
        ((c, "tokens", _START, ""), _START + timedelta(hours=1), Decimal(1), 1, NOW, "e1")
        for c in customers
    ]


def race_an_aggregator(
    engine: Engine, batch_order: list[str], reporter_step: Callable[[], T]
) -> tuple[list[BaseException], T | None]:
    """An aggregator batch takes the queue rows of ``batch_order``'s first customer, then,
    once ``reporter_step`` (on a thread of its own) waits on that row, the rest's: the
    deadlocks seen, and what ``reporter_step`` returned (None if it failed)."""
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    failures: list[BaseException] = []
    done: T | None = None
    with engine.connect() as aggregator, psycopg.connect(url) as probe:
        upsert_totals(aggregator, _batch(batch_order[:1]), _KINDS, NOW)
        with ThreadPoolExecutor(1) as pool:
            stepping = pool.submit(reporter_step)
            wait_for_a_lock_wait(probe)
            try:
                upsert_totals(aggregator, _batch(batch_order[1:]), _KINDS, NOW)
            except OperationalError as exc:
                failures.append(exc)
            aggregator.rollback()
            try:
                done = stepping.result(timeout=30)
            except OperationalError as exc:
                failures.append(exc)
    return failures, done


def test_settle_and_an_aggregator_batch_take_the_queue_rows_in_one_order(
    en_us_engine: Engine,
) -> None:
    engine = en_us_engine
    customers = ["a1", "a_1"]  # Python: a1 < a_1; ICU en-US: a_1 < a1
    # The order an aggregator batch of both windows takes their queue rows in (its inserts'
    # order, rolled back).
    with engine.connect() as connection:
        upsert_totals(connection, _batch(customers), _KINDS, NOW)
        aggregator_order = [
            c
            for (c,) in connection.exec_driver_sql(
                "SELECT customer_id FROM report_queue ORDER BY ctid"
            )
        ]
        connection.rollback()
    queued = [(c, "tokens", _START, 1) for c in customers]
    with engine.begin() as connection:
        queue_windows(connection, queued)

    def settle_both() -> None:
        with engine.begin() as connection:
            settle(connection, [(c, m, s, b"", r) for c, m, s, r in queued])

    failures, _ = race_an_aggregator(engine, aggregator_order, settle_both)
    assert failures == []  # no deadlock
    assert aggregator_order == sorted(customers)  # settle's order


def test_set_aside_takes_the_queue_rows_in_key_order(postgres_engine: Engine) -> None:
    """A chunk's holds come in two runs (windows with no customer link, then the rows' own):
    set_aside marks them in key order, as an aggregator batch takes them, so the two never
    deadlock. An aggregator holds the first key's row; set_aside, given the second key
    first, waits on the first before it takes the second."""
    engine = postgres_engine
    customers = ["a", "b"]
    queued = [(c, "tokens", _START, 1) for c in customers]
    with engine.begin() as connection:
        queue_windows(connection, queued)
    held = [
        (
            DueWindow(c, "tokens", _START, _START + timedelta(hours=1), 1, Decimal(1), None, 1),
            HELD_NO_CUSTOMER_LINK,
        )
        for c in reversed(customers)
    ]
    failures, first = race_an_aggregator(engine, customers, lambda: set_aside(engine, held, NOW))
    assert failures == []  # no deadlock
    assert first == {0, 1}  # both held, reported by their places in ``held``
