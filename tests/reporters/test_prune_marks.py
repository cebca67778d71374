"""Each ledger prune pass starts where the last one ended, and runs only when due (issue #15).

Before, every pass (every ``report --once``, so every cron minute) read again every final row
past the ledger's retention, the newest rows of windows 45 to 60 days old among them, which it
keeps. Marks in the database (reporters/retention.py) make a pass read the rows that turned old
since, and the rows whose windows went since; a pass runs hourly, whichever process runs it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, func, select

from aggregators.retention import prune_aggregates
from meterstream.schema import ledger
from reporters.ledger import rows_for
from reporters.retention import (
    PRUNABLE,
    PruneMarks,
    load_marks,
    pass_ranges,
    prune_ledger_pass,
)
from tests.reporters.test_billing_safety import StepClock, reporter_with
from tests.reporters.test_reporter import World, hour_start, put_total
from tests.reporters.test_retention import history, move_back, rejected_history

RETENTION, WINDOW_RETENTION, REJECTED_RETENTION = 45, 60, 400


def _rows(world: World, customer_id: str) -> set[str]:
    return {
        r.identifier for m in ("tokens", "storage") for r in rows_for(world.engine, customer_id, m)
    }


def test_report_once_prunes_only_when_a_pass_is_due(world: World) -> None:
    clock = StepClock()
    history(world, "cus_a")
    prune_aggregates(world.engine, world.settings, datetime.now(UTC))
    assert (reporter_with(world, clock).prune_ledger() or 0) > 0  # the first: a full pass
    # A window reported twice: its first revision may go once 45 days old, in 30 minutes.
    for value in ("4", "5"):
        put_total(world.engine, "cus_b", "tokens", hour_start(5), value)
        world.cycle()
    put_total(world.engine, "cus_b", "tokens", hour_start(2), "1")  # the head
    world.cycle()
    superseded = rows_for(world.engine, "cus_b", "tokens")[0]
    move_back(world.engine, "cus_b", {hour_start(5)}, timedelta(days=RETENTION, minutes=-30))
    before = _rows(world, "cus_b")

    # A second `report --once` (a new process, a new Reporter) within the hour: no pass.
    assert reporter_with(world, clock).prune_ledger() is None
    assert _rows(world, "cus_b") == before

    clock.offset = timedelta(hours=1)
    assert reporter_with(world, clock).prune_ledger() == 1
    assert _rows(world, "cus_b") == before - {superseded.identifier}


def test_a_pass_does_not_read_again_the_rows_the_last_one_kept(world: World) -> None:
    history(world, "cus_a")  # its newest rows of windows 50 days old stay: windows kept
    prune_aggregates(world.engine, world.settings, datetime.now(UTC))
    clock = StepClock()
    reporter_with(world, clock).prune_ledger()
    windows = [m.window for m in world.catalogue]
    later = datetime.now(UTC) + timedelta(hours=1)
    old = and_(ledger.c.status.in_(PRUNABLE), ledger.c.updated_at < later - timedelta(days=45))

    next_pass = pass_ranges(load_marks(world.engine), later, RETENTION, WINDOW_RETENTION, windows)

    with world.engine.connect() as connection:
        kept = connection.execute(select(func.count()).where(old)).scalar_one()
        read = connection.execute(
            select(func.count()).where(old, next_pass.condition())
        ).scalar_one()
    assert kept >= 3 and read == 0  # before: every one of them, every pass
    assert not next_pass.full


def test_a_row_kept_for_its_window_goes_in_the_pass_after_the_window_went(world: World) -> None:
    put_total(world.engine, "cus_b", "tokens", hour_start(3), "4")
    put_total(world.engine, "cus_b", "tokens", hour_start(2), "5")  # the head: always kept
    world.cycle()
    first = rows_for(world.engine, "cus_b", "tokens")[0]
    # Its timestamp 20 minutes past the line where a 1mo window (the catalogue's longest)
    # must have gone: the aggregators have not pruned it yet at the first pass.
    target = datetime.now(UTC) - timedelta(days=WINDOW_RETENTION + 31) + timedelta(minutes=20)
    move_back(world.engine, "cus_b", {first.window_start}, first.timestamp - target)
    clock = StepClock()
    reporter_with(world, clock).prune_ledger()  # full pass: the window is still there
    assert first.identifier in _rows(world, "cus_b")
    prune_aggregates(world.engine, world.settings, datetime.now(UTC))  # now it went

    clock.offset = timedelta(hours=1)
    marks = load_marks(world.engine)
    assert marks.updated_mark is not None and marks.full_pass_at is not None
    assert (reporter_with(world, clock).prune_ledger() or 0) == 1

    assert first.identifier not in _rows(world, "cus_b")
    assert len(rows_for(world.engine, "cus_b", "tokens")) == 1


def test_ranges_start_at_the_marks_and_a_full_pass_comes_weekly() -> None:
    now = datetime(2026, 12, 4, 12, tzinfo=UTC)
    hour_ago = now - timedelta(hours=1)
    marks = PruneMarks(
        updated_mark=hour_ago - timedelta(days=45),
        timestamp_mark=hour_ago - timedelta(days=91),
        full_pass_at=now - timedelta(days=1),
        last_pass_at=hour_ago,
    )
    ranges = pass_ranges(marks, now, 45, 60, ["1h", "1mo"])
    assert (ranges.updated_from, ranges.updated_to) == (
        marks.updated_mark,
        now - timedelta(days=45),
    )
    assert (ranges.timestamp_from, ranges.timestamp_to) == (
        marks.timestamp_mark,
        now - timedelta(days=91),
    )
    assert pass_ranges(marks, now, 45, 60, ["1h"]).timestamp_to == now - timedelta(days=60, hours=1)
    assert (ranges.rejected_from, ranges.rejected_to) == (None, None)  # rejected rows stay
    rejected = pass_ranges(marks, now, 45, 60, ["1h"], 400)
    assert (rejected.rejected_from, rejected.rejected_to) == (
        hour_ago - timedelta(days=400),
        now - timedelta(days=400),
    )
    weekly = PruneMarks(marks.updated_mark, marks.timestamp_mark, now - timedelta(days=7), hour_ago)
    assert pass_ranges(weekly, now, 45, 60, ["1h"]).full
    full = pass_ranges(weekly, now, 45, 60, ["1h"], 400)
    assert (full.rejected_from, full.rejected_to) == (None, now - timedelta(days=400))
    assert pass_ranges(PruneMarks(), now, 45, 60, ["1h"]).full


def test_a_pass_prunes_the_rejected_rows_that_turned_old_since_the_last_one(world: World) -> None:
    rows = rejected_history(world, "cus_gone")  # aged 410 days
    ids = [r.identifier for r in rows]
    # The one 300 days old: rejected 30 minutes short of the retention at the first pass.
    young = rows[3].window_start - timedelta(days=300)
    move_back(world.engine, "cus_gone", {young}, timedelta(days=100, minutes=-30))
    prune_aggregates(world.engine, world.settings, datetime.now(UTC))
    windows = [m.window for m in world.catalogue]

    def prune_at(now: datetime) -> int | None:
        return prune_ledger_pass(
            world.engine,
            now,
            RETENTION,
            WINDOW_RETENTION,
            windows,
            1000,
            rejected_retention_days=REJECTED_RETENTION,
        )

    first = datetime.now(UTC)
    assert prune_at(first) == 3  # a full pass: all but the young one and the head
    assert _rejected(world) == {ids[3], ids[4]}
    later = first + timedelta(hours=1)
    next_pass = pass_ranges(
        load_marks(world.engine), later, RETENTION, WINDOW_RETENTION, windows, REJECTED_RETENTION
    )
    assert not next_pass.full
    assert next_pass.rejected_from == first - timedelta(days=REJECTED_RETENTION)
    with world.engine.connect() as connection:  # the head is not read again
        read = connection.execute(select(ledger.c.identifier).where(next_pass.condition()))
        assert set(read.scalars()) == {ids[3]}

    assert prune_at(later) == 1
    assert _rejected(world) == {ids[4]}


def _rejected(world: World) -> set[str]:
    return {r.identifier for r in rows_for(world.engine, "cus_gone", "tokens")}
