"""``reconcile --since`` reads what its range and the work in hand hold, never the history
(issue #15): on PostgreSQL, after ANALYZE, with 12,000 rows of history and 10 pairs with rows
in the range, it asks Stripe once per pair in the range (and once per unknown row's minute),
and no query reads the ledger or window_totals whole. Before, it read every ledger row and
every window, and compared every pair that ever had a row."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, update

from meterstream.db import build_engine, migrate
from meterstream.meters import load_catalogue
from meterstream.schema import ledger
from meterstream.settings import load_settings
from reporters.ledger import all_rows
from reporters.reconcile import Reconciliation, reconcile
from reporters.service import connect, fetch_summary
from stripe_emulator import run_stripe_emulator
from tests.reporters.test_report_queue import history
from tests.reporters.test_reporter import (
    World,
    _reconcile,
    create_stripe_meters,
    hour_start,
    put_total,
    world_settings,
)
from tests.reporters.test_retention import move_back

ACTIVE = [f"cus_h{c:04d}" for c in range(10)]


@pytest.fixture
def counted_world(postgres_url: str, tmp_path: Path) -> Iterator[World]:
    engine = build_engine(load_settings(database_url=postgres_url))
    migrate(engine)
    try:
        with run_stripe_emulator(rate_limit_per_s=None, keep_requests=10_000) as emulator:
            create_stripe_meters(emulator)
            for customer in ACTIVE:
                emulator.state.create_customer(customer_id=customer)
            settings = world_settings(emulator, postgres_url, tmp_path)
            yield World(emulator, engine, settings, load_catalogue(settings.meters_file))
    finally:
        engine.dispose()


def test_reconcile_since_reads_the_range_and_asks_stripe_once_per_pair(
    counted_world: World,
) -> None:
    world = counted_world
    history(world, customers=300, hours=40)  # reported, all older than the range
    for customer in ACTIVE:
        put_total(world.engine, customer, "tokens", hour_start(1), "3")
    world.cycle()
    recent = [r for r in all_rows(world.engine) if r.window_start == hour_start(1)]
    assert len(recent) == len(ACTIVE) and {r.status for r in recent} == {"sent"}
    with world.engine.begin() as connection:  # Stripe has it; its answer was lost 21 h ago
        connection.execute(
            update(ledger)
            .where(ledger.c.identifier == recent[0].identifier)
            .values(status="unknown")
        )
        connection.exec_driver_sql("ANALYZE")
    plans: list[str] = []

    def explain(connection: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            first = parameters[0] if isinstance(parameters, list) else parameters
            cursor = connection.connection.dbapi_connection.cursor()
            cursor.execute(f"EXPLAIN {statement}", first)
            plans.append("\n".join(str(r[0]) for r in cursor.fetchall()))

    found = reconcile_watched(world, explain, clear_received=True)

    assert found.settled == [f"{recent[0].identifier}: Stripe has it; marked sent"]
    assert sorted(line.stripe_customer_id for line in found.lines) == ACTIVE
    assert found.drifting == 0
    assert all(line.ledger_value == 3 == line.stripe_value for line in found.lines)
    summaries = [r for r in world.emulator.received if "event_summaries" in r.path]
    assert len(summaries) == len(ACTIVE) + 1  # one per pair, one for the unknown row's minute
    assert len(plans) >= 5
    for plan in plans:
        assert "Seq Scan on ledger" not in plan, plan
        assert "Seq Scan on window_totals" not in plan, plan


def _ledger_rows_read(plan: dict[str, Any]) -> int:
    """Ledger rows one EXPLAIN ANALYZE plan node and its children read (returned or filtered
    out, over every loop)."""
    own = 0
    if plan.get("Relation Name") == "ledger":
        loops = plan.get("Actual Loops", 1)
        kept = plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)
        own = int(kept * loops) + plan.get("Rows Removed by Index Recheck", 0)
    return own + sum(_ledger_rows_read(child) for child in plan.get("Plans", []))


def test_reconcile_reads_no_rejected_row_older_than_its_range(counted_world: World) -> None:
    """Rejected rows are never resent and outlive the sent ones (bill by hand): with 11,600
    of them before the range, reconcile reads a few dozen ledger rows. Before, it read every
    rejected row ever written (through ledger_by_status, so no Seq Scan showed it) and listed
    the 290 pairs they belong to as drift."""
    world = counted_world
    history(world, customers=300, hours=40)
    with world.engine.begin() as connection:  # rejected when they were written, long ago
        connection.execute(
            update(ledger)
            .where(ledger.c.customer_id.not_in(ACTIVE))
            .values(status="rejected", error_code="invalid_value", updated_at=ledger.c.timestamp)
        )
    for customer in ACTIVE:
        put_total(world.engine, customer, "tokens", hour_start(1), "3")
    world.cycle()
    with world.engine.begin() as connection:
        connection.exec_driver_sql("ANALYZE")
    read: list[int] = []

    def count(connection: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            first = parameters[0] if isinstance(parameters, list) else parameters
            cursor = connection.connection.dbapi_connection.cursor()
            cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", first)
            read.append(_ledger_rows_read(cursor.fetchone()[0][0]["Plan"]))

    found = reconcile_watched(world, count)

    assert read and sum(read) < 200, read  # before: over 11,600
    assert sorted(line.stripe_customer_id for line in found.lines) == ACTIVE
    assert found.drifting == 0


def test_reconcile_lists_rejected_rows_of_its_range_and_rows_rejected_since(
    world: World,
) -> None:
    """A rejected row is listed when its timestamp is in the range, or when it was rejected
    within it (usage too old for Stripe, found after an outage); not one rejected and
    timestamped before the range (meterstream status lists the newest rejections)."""
    put_total(world.engine, "cus_gone", "tokens", hour_start(3), "4")  # unknown to Stripe
    put_total(world.engine, "cus_none", "tokens", hour_start(3), "5")  # unknown to Stripe
    put_total(world.engine, "cus_late", "tokens", hour_start(36 * 24), "6")  # too old
    world.cycle()
    rows = {row.customer_id: row for row in all_rows(world.engine)}
    assert {row.status for row in rows.values()} == {"rejected"}
    move_back(world.engine, "cus_gone", {hour_start(3)}, timedelta(days=5))

    lines = _reconcile(world, since=timedelta(days=2))

    assert sorted((line.stripe_customer_id, line.not_billed) for line in lines) == [
        ("cus_late", ("cus_late rejected 6",)),
        ("cus_none", ("cus_none rejected 5",)),
    ]


def reconcile_watched(
    world: World, listener: Callable[..., None], *, clear_received: bool = False
) -> Reconciliation:
    """``reconcile`` from two hours back, with ``listener`` on every statement it runs
    (before_cursor_execute); with ``clear_received``, the emulator's record of calls is
    emptied first (after the connection's own calls)."""
    connected = connect(world.settings, world.catalogue, world.metrics, world.stop)
    if clear_received:
        world.emulator.received.clear()
    event.listen(world.engine, "before_cursor_execute", listener)
    try:
        return reconcile(
            world.engine,
            world.catalogue,
            connected.stripe_meters,
            fetch_summary(connected),
            hour_start(2),
            datetime.now(UTC),
        )
    finally:
        event.remove(world.engine, "before_cursor_execute", listener)
