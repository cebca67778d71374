"""``reconcile --since`` reads what its range and the work in hand hold, never the history
(issue #15): on PostgreSQL, after ANALYZE, with 12,000 rows of history and 10 pairs with rows
in the range, it asks Stripe once per pair in the range (and once per unknown row's minute),
and no query reads the ledger or window_totals whole. Before, it read every ledger row and
every window, and compared every pair that ever had a row."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, update

from meterstream.db import build_engine, migrate
from meterstream.meters import load_catalogue
from meterstream.schema import ledger
from meterstream.settings import load_settings
from reporters.ledger import all_rows
from reporters.reconcile import reconcile
from reporters.service import connect, fetch_summary
from stripe_emulator import run_stripe_emulator
from tests.reporters.test_report_queue import history
from tests.reporters.test_reporter import (
    World,
    create_stripe_meters,
    hour_start,
    put_total,
    world_settings,
)

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

    connected = connect(world.settings, world.catalogue, world.metrics, world.stop)
    world.emulator.received.clear()
    event.listen(world.engine, "before_cursor_execute", explain)
    try:
        found = reconcile(
            world.engine,
            world.catalogue,
            connected.stripe_meters,
            fetch_summary(connected),
            hour_start(2),
            datetime.now(UTC),
        )
    finally:
        event.remove(world.engine, "before_cursor_execute", explain)

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
