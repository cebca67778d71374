"""The report queue on real PostgreSQL: whatever the commit order of aggregator workers and the
reporter, every change is reported, once. Each test forces one interleaving with explicit
connections and transactions: a worker is the aggregators' own apply_partials on a connection
the test commits; the reporter is the cycle's own read (take_due) and write (write_rows, which
deletes the queue row in the transaction of the ledger row)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, func, select, text

from aggregators.aggregation import Partial
from aggregators.status import totals_facts
from aggregators.totals import apply_partials
from meterstream.db import build_engine, migrate
from meterstream.deployment import stored_deployment_id
from meterstream.meters import load_catalogue
from meterstream.schema import ledger, meter_scales, report_queue, window_totals
from meterstream.settings import load_settings
from reporters.backstop import queue_missed
from reporters.due import DueWindow, take_due
from reporters.ledger import LedgerRow, identifier_for, insert_rows, rows_for
from reporters.rows import RowJob, write_rows
from reporters.service import build_reporter, connect
from reporters.status import reporter_status
from tests.conftest import EXAMPLE_METERS
from tests.reporters.test_reporter import (
    World,
    hour_start,
    put_total,
)

CUSTOMER, METER = "cus_a", "tokens"
WINDOW = hour_start(2)
DEADLINE_S = 10.0


class Worker:
    """One aggregator worker's batch transaction on the window, committed when the test says."""

    def __init__(self, world: World, value: str, event_id: str) -> None:
        self.world, self.value, self.event_id = world, Decimal(value), event_id
        self.connection: Connection = world.engine.connect()
        self.connection.begin()
        self.applied = threading.Event()

    def apply(self) -> None:
        partial = Partial.first(
            WINDOW + timedelta(hours=1),
            self.value,
            WINDOW + timedelta(minutes=10),
            self.event_id,
            None,
        )
        apply_partials(
            self.connection, {(CUSTOMER, METER, WINDOW, ""): partial}, self.world.catalogue, now()
        )
        self.applied.set()

    def apply_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.apply)
        thread.start()
        return thread

    def commit(self) -> None:
        self.connection.commit()
        self.connection.close()

    def rollback(self) -> None:
        self.connection.rollback()
        self.connection.close()


def now() -> datetime:
    return datetime.now(UTC)


def commit_change(world: World, value: str, event_id: str) -> None:
    worker = Worker(world, value, event_id)
    worker.apply()
    worker.commit()


def read(world: World) -> list[DueWindow]:
    """The reporter's read of a cycle."""
    return [w for windows in take_due(world.engine, [METER]).values() for w in windows]


def write(world: World, windows: list[DueWindow]) -> None:
    """The reporter's write of a cycle: the ledger rows, and the queue rows deleted (guarded)."""
    deployment_id = stored_deployment_id(world.engine)
    jobs = [
        RowJob(w, world.catalogue.meters[METER], METER, CUSTOMER, deployment_id) for w in windows
    ]
    write_rows(world.engine, jobs, now(), world.settings.horizon_days)


def in_thread(action: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=action)
    thread.start()
    return thread


def wait_until_blocked(engine: Engine, sessions: int = 1) -> None:
    """Until ``sessions`` connections of this database wait for a lock (a row another holds)."""
    deadline = time.monotonic() + DEADLINE_S
    with engine.connect() as connection:
        while time.monotonic() < deadline:
            waiting = connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
            connection.rollback()
            if waiting >= sessions:
                return
            time.sleep(0.01)
    raise AssertionError(f"no {sessions} session(s) waiting for a lock within {DEADLINE_S} s")


def join(thread: threading.Thread) -> None:
    thread.join(DEADLINE_S)
    assert not thread.is_alive()


def assert_reported_once(world: World, revisions: list[int], total: int) -> None:
    """Drain with real cycles, then: the ledger holds exactly ``revisions``, the newest being
    the window's; Stripe got each row once and the window's total; the queue is empty and the
    full comparison finds nothing it missed."""
    reporter = world.reporter()
    for _ in range(3):
        reporter.run_cycle()
    rows = rows_for(world.engine, CUSTOMER, METER)
    assert [r.revision for r in rows] == revisions
    assert {r.status for r in rows} == {"sent"}
    with world.engine.connect() as connection:
        current = connection.execute(select(window_totals.c.revision)).scalar_one()
        queued = connection.execute(select(func.count()).select_from(report_queue)).scalar_one()
    assert (current, queued) == (revisions[-1], 0)
    identifiers = [e.identifier for e in world.emulator.state.events]
    assert sorted(identifiers) == sorted(r.identifier for r in rows)
    assert world.totals() == {(METER, CUSTOMER): total}
    assert queue_missed(world.engine, [METER]) == 0


def test_changes_committed_before_the_read_are_reported_as_their_newest_revision(
    pg_world: World,
) -> None:
    commit_change(pg_world, "5", "e1")
    commit_change(pg_world, "3", "e2")
    write(pg_world, read(pg_world))
    assert_reported_once(pg_world, [2], 8)


def test_a_change_committed_after_the_delete_is_reported_next_cycle(pg_world: World) -> None:
    commit_change(pg_world, "5", "e1")
    write(pg_world, read(pg_world))
    commit_change(pg_world, "3", "e2")
    assert_reported_once(pg_world, [1, 2], 8)


def test_a_change_committed_between_the_read_and_the_delete_keeps_its_queue_row(
    pg_world: World,
) -> None:
    commit_change(pg_world, "5", "e1")
    windows = read(pg_world)
    commit_change(pg_world, "3", "e2")
    write(pg_world, windows)  # revision 1; the queue row now says 2: not deleted
    with pg_world.engine.connect() as connection:
        assert connection.execute(select(report_queue.c.revision)).scalar_one() == 2
    assert_reported_once(pg_world, [1, 2], 8)


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_the_delete_waits_for_a_worker_in_flight_and_then_rechecks(
    pg_world: World, outcome: str
) -> None:
    commit_change(pg_world, "5", "e1")
    windows = read(pg_world)
    worker = Worker(pg_world, "3", "e2")
    worker.apply()  # holds the window's and the queue row's locks, not committed
    reporter = in_thread(lambda: write(pg_world, windows))
    wait_until_blocked(pg_world.engine)  # the reporter's delete waits for the worker
    if outcome == "commit":
        worker.commit()
    else:
        worker.rollback()
    join(reporter)
    if outcome == "commit":
        assert_reported_once(pg_world, [1, 2], 8)
    else:
        assert_reported_once(pg_world, [1], 5)


def test_a_worker_waits_for_the_reporters_delete_then_queues_afresh(pg_world: World) -> None:
    commit_change(pg_world, "5", "e1")
    windows = read(pg_world)
    worker = Worker(pg_world, "3", "e2")
    started: list[threading.Thread] = []

    def before_commit(_connection: Any) -> None:
        # The reporter's ledger row and queue delete are written, not committed: the worker
        # changes the window now, and its queue upsert waits for the delete.
        if not started:
            started.append(worker.apply_in_thread())
            wait_until_blocked(pg_world.engine)

    event.listen(pg_world.engine, "commit", before_commit)
    try:
        write(pg_world, windows)
    finally:
        event.remove(pg_world.engine, "commit", before_commit)
    join(started[0])
    worker.commit()
    assert_reported_once(pg_world, [1, 2], 8)


@pytest.mark.parametrize(("first", "second"), [("5", "3"), ("3", "5")])
def test_two_workers_on_one_window_in_either_order_leave_the_newest_revision_queued(
    pg_world: World, first: str, second: str
) -> None:
    commit_change(pg_world, "1", "e0")
    write(pg_world, read(pg_world))
    one, two = Worker(pg_world, first, "e1"), Worker(pg_world, second, "e2")
    one.apply()
    waiting = two.apply_in_thread()
    wait_until_blocked(pg_world.engine)  # the second worker waits for the first's window row
    one.commit()
    join(waiting)  # the second has applied on top of the first, not committed
    windows = read(pg_world)  # sees the first worker's revision 2
    assert [w.revision for w in windows] == [2]
    reporter = in_thread(lambda: write(pg_world, windows))
    wait_until_blocked(pg_world.engine)  # its delete waits for the second worker
    two.commit()
    join(reporter)
    assert_reported_once(pg_world, [1, 2, 3], 9)


def test_the_backstop_queues_and_counts_a_change_made_without_the_queue(
    pg_world: World,
) -> None:
    commit_change(pg_world, "5", "e1")
    pg_world.cycle()
    with pg_world.engine.begin() as connection:  # a writer that forgets the queue
        connection.execute(window_totals.update().values(value=Decimal(7), revision=2))
    assert pg_world.cycle().acknowledged == 0  # the queue does not know

    reporter = pg_world.reporter()
    assert reporter.run_backstop() == 1
    assert pg_world.metric("meterstream_reporter_backstop_found_total") == 1
    assert reporter.run_backstop() == 0  # queued now: found once
    assert_reported_once(pg_world, [1, 2], 7)


def test_the_migration_queues_the_windows_due_before_the_upgrade(database_url: str) -> None:
    engine = build_engine(load_settings(database_url=database_url))
    try:
        migrate(engine, "0002")
        with engine.begin() as connection:
            for hours_ago, revision in ((3, 1), (4, 2), (5, 0)):
                connection.execute(
                    window_totals.insert().values(
                        customer_id=CUSTOMER,
                        meter=METER,
                        window_start=hour_start(hours_ago),
                        window_end=hour_start(hours_ago - 1),
                        value=Decimal(revision),
                        events=revision,
                        revision=revision,
                        first_applied_at=now(),
                        updated_at=now(),
                    )
                )
            reported = {"customer_id": CUSTOMER, "meter": METER, "window_end": hour_start(2)}
            for hours_ago in (3, 4):  # both reported at revision 1; the second changed since
                connection.execute(
                    ledger.insert().values(
                        **reported,
                        window_start=hour_start(hours_ago),
                        revision=1,
                        sequence=hours_ago,
                        total=Decimal(1),
                        accounted_total=Decimal(1),
                        units_total=1,
                        value=1,
                        event_name=METER,
                        stripe_customer_id=CUSTOMER,
                        timestamp=hour_start(hours_ago),
                        identifier=f"id{hours_ago}",
                        status="sent",
                        attempts=1,
                        created_at=now(),
                        updated_at=now(),
                    )
                )
        migrate(engine)
        with engine.connect() as connection:
            queued = connection.execute(
                select(report_queue.c.window_start, report_queue.c.revision).order_by(
                    report_queue.c.window_start
                )
            ).all()
        # Reported at its revision, or revision 0 (created, never changed): nothing to report.
        assert [tuple(row) for row in queued] == [(hour_start(4), 2)]
        # The meters the ledger held, their scale to check at the reporter's next start.
        with engine.connect() as connection:
            scales = connection.execute(select(meter_scales.c.meter, meter_scales.c.unit_scale))
            assert [tuple(row) for row in scales] == [(METER, None)]
    finally:
        engine.dispose()


def history(world: World, customers: int, hours: int) -> None:
    """``customers`` x ``hours`` tokens windows, all reported (revision 1, sent), in bulk."""
    totals, rows = [], []
    for c in range(customers):
        customer = f"cus_h{c:04d}"
        for h in range(hours):
            start = hour_start(h + 3)
            end = start + timedelta(hours=1)
            totals.append(
                {
                    "customer_id": customer,
                    "meter": METER,
                    "window_start": start,
                    "window_end": end,
                    "value": Decimal(1),
                    "events": 1,
                    "revision": 1,
                    "last_event_time": start,
                    "first_applied_at": start,
                    "updated_at": start,
                }
            )
            rows.append(
                LedgerRow(
                    customer_id=customer,
                    meter=METER,
                    window_start=start,
                    window_end=end,
                    revision=1,
                    sequence=hours - h,
                    window_value=Decimal(1),
                    accounted_total=Decimal(hours - h),
                    units_total=hours - h,
                    value=1,
                    event_name=METER,
                    stripe_customer_id=customer,
                    timestamp=start,
                    identifier=identifier_for(
                        customer, METER, start, end, 1, deployment_id="bench"
                    ),
                    status="sent",
                    attempts=1,
                    first_attempt_at=end,
                    error_code=None,
                    last_error=None,
                    stripe_request_id=None,
                    created_at=end,
                    updated_at=end,
                    sent_at=end,
                )
            )
    with world.engine.begin() as connection:
        connection.execute(window_totals.insert(), totals)
        insert_rows(connection, rows)


def test_a_cycle_and_status_look_up_the_work_in_hand_never_scan_history(
    pg_world: World,
) -> None:
    """With 10,000 windows of history (after ANALYZE), no query of a cycle, of status (the
    reporter's facts and the aggregators') or of the gauges reads ledger or window_totals
    whole: they find the queue's windows, the pending rows and each key's head through
    indexes. Before the report queue, every cycle joined all of window_totals with a GROUP BY
    of the whole ledger (6x slower at 1,000,000 windows, bench/report/history.py)."""
    world = pg_world
    history(world, customers=100, hours=100)
    for c in range(20):  # work in hand: late events on old windows, and new windows
        put_total(world.engine, f"cus_h{c:04d}", METER, hour_start(10), "4")
        put_total(world.engine, f"cus_h{c:04d}", METER, hour_start(1), "2")
    put_total(world.engine, "acme", METER, hour_start(1), "2")  # held: no customer link
    for c in range(20):
        world.emulator.state.create_customer(customer_id=f"cus_h{c:04d}")
    with world.engine.begin() as connection:
        connection.exec_driver_sql("ANALYZE")
    plans: list[str] = []

    def explain(connection: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "WITH")):
            first = parameters[0] if isinstance(parameters, list) else parameters
            cursor = connection.connection.dbapi_connection.cursor()
            cursor.execute(f"EXPLAIN {statement}", first)
            plans.append("\n".join(str(r[0]) for r in cursor.fetchall()))

    event.listen(world.engine, "before_cursor_execute", explain)
    try:
        result = world.cycle()
        facts = reporter_status(world.engine, world.catalogue, now())
        totals = totals_facts(world.engine)  # the aggregators' part of meterstream status
    finally:
        event.remove(world.engine, "before_cursor_execute", explain)

    assert (result.acknowledged, result.held) == (40, {"no_customer_link": 1})
    assert facts["due_windows"] == 0 and facts["held_windows"] == {"no_customer_link": 1}
    assert facts["ledger"]["sent"] == 10_040
    assert (totals["windows"], totals["events"]) == (10_021, 10_021)
    assert len(plans) > 10
    for plan in plans:
        assert "Seq Scan on ledger" not in plan, plan
        assert "Seq Scan on window_totals" not in plan, plan


def test_the_aggregators_queue_each_window_whose_revision_changes(migrated_engine: Engine) -> None:
    """PostgreSQL's one statement and SQLite's path both queue, in the batch's transaction,
    the windows whose value changed, with their new revision, and only those."""
    catalogue = load_catalogue(EXAMPLE_METERS)
    start = hour_start(2)

    def batch(values: dict[str, str], event_id: str) -> None:
        partials = {
            (customer, METER, start, ""): Partial.first(
                start + timedelta(hours=1), Decimal(value), start, event_id, None
            )
            for customer, value in values.items()
        }
        with migrated_engine.begin() as connection:
            apply_partials(connection, partials, catalogue, now())

    def queued() -> dict[str, int]:
        with migrated_engine.connect() as connection:
            found = connection.execute(select(report_queue.c.customer_id, report_queue.c.revision))
            return {customer: int(revision) for customer, revision in found}

    batch({"cus_a": "2", "cus_b": "3"}, "e1")
    assert queued() == {"cus_a": 1, "cus_b": 1}
    with migrated_engine.begin() as connection:
        connection.execute(report_queue.delete())  # as if the reporter had reported both
    batch({"cus_a": "0", "cus_b": "1"}, "e2")  # cus_a's sum does not change: not queued
    assert queued() == {"cus_b": 2}
    batch({"cus_b": "1"}, "e3")
    assert queued() == {"cus_b": 3}


def test_a_running_reporter_runs_the_backstop_every_report_backstop_s(pg_world: World) -> None:
    commit_change(pg_world, "5", "e1")
    pg_world.cycle()
    with pg_world.engine.begin() as connection:  # a writer that forgets the queue
        connection.execute(window_totals.update().values(value=Decimal(7), revision=2))
    ticks = iter(now() + timedelta(seconds=s) for s in range(0, 10_000, 10))
    reporter = build_reporter(
        connect(pg_world.settings, pg_world.catalogue, pg_world.metrics, pg_world.stop),
        pg_world.engine,
        pg_world.catalogue,
        pg_world.stop,
        clock=lambda: next(ticks),
    )
    # METERSTREAM_REPORT_BACKSTOP_S is an hour: not at start, then once an hour has passed.
    assert reporter.run_cycle().acknowledged == 0
    assert pg_world.metric("meterstream_reporter_backstop_found_total") == 0
    for _ in range(3600 // 10):
        next(ticks)
    assert reporter.run_cycle().acknowledged == 1
    assert pg_world.metric("meterstream_reporter_backstop_found_total") == 1
    assert_reported_once(pg_world, [1, 2], 7)


def test_a_naive_recheck_time_is_refused_not_read_in_the_sessions_zone(
    migrated_engine: Engine,
) -> None:
    """The queue is read through the driver on PostgreSQL, without UTCDateTime's check of
    the times it binds: the read checks its one time itself."""
    with pytest.raises(ValueError, match="naive datetime"):
        take_due(migrated_engine, ["tokens"], datetime(2026, 1, 1))  # naive: the point
