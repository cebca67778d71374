"""Ledger retention: rows nothing reads again go; what the next report, reconcile and the status
read stays, so the next cycle after pruning sends exactly what it would have sent without it.

History is reported at today's clock, then moved back in time (the ledger rows and the windows
together, in Python so that SQLite's stored text moves too), which is what the same history
looks like 50 or 70 days later.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, event, func, select

from aggregators.retention import prune_aggregates
from meterstream.schema import ledger, window_totals
from reporters.due import count_due_windows
from reporters.ledger import rows_for
from reporters.retention import prune_ledger
from reporters.status import billing_lag_s
from tests.reporters.test_reporter import World, _reconcile, hour_start, put_total

OLD = timedelta(days=50)  # past the ledger's retention (45), inside the windows' (60)
OLDER = timedelta(days=70)  # past both: the aggregators prune these windows
_TIMES = ("window_start", "window_end", "timestamp", "created_at", "updated_at", "sent_at")


def move_back(engine: Engine, customer_id: str, starts: set[datetime], by: timedelta) -> None:
    """Move the windows ``starts`` of ``customer_id`` (totals and ledger rows) ``by`` back."""
    with engine.begin() as connection:
        for row in connection.execute(
            select(ledger).where(ledger.c.customer_id == customer_id)
        ).mappings():
            if row["window_start"] not in starts:
                continue
            moved = {name: row[name] - by for name in _TIMES if row[name] is not None}
            connection.execute(
                ledger.update().where(ledger.c.identifier == row["identifier"]).values(**moved)
            )
        wt = window_totals.c
        for row in connection.execute(
            select(window_totals).where(wt.customer_id == customer_id)
        ).mappings():
            if row["window_start"] not in starts:
                continue
            names = ("window_start", "window_end", "first_applied_at", "updated_at")
            key = (
                (wt.customer_id == customer_id)
                & (wt.meter == row["meter"])
                & (wt.window_start == row["window_start"])
            )
            connection.execute(
                window_totals.update().where(key).values(**{n: row[n] - by for n in names})
            )


def history(world: World, customer_id: str) -> None:
    """Fractions carried, revisions of one window, two meters; then aged: three windows 50
    days back, two 70 days back (those the aggregators prune)."""
    windows = [hour_start(h) for h in (9, 8, 7, 6, 5)]
    values = ("0.4", "1.3", "0.45", "2.2", "0.7")
    for step, (window, value) in enumerate(zip(windows, values, strict=True)):
        put_total(world.engine, customer_id, "tokens", window, value)
        put_total(world.engine, customer_id, "storage", window, f"0.00{step + 3}4")
        world.cycle()
    put_total(world.engine, customer_id, "tokens", windows[2], "0.95")  # a second revision
    world.cycle()
    # The head of (customer, tokens): a window the aggregators prune, not the newest window.
    put_total(world.engine, customer_id, "tokens", windows[0], "0.55")
    world.cycle()
    move_back(world.engine, customer_id, set(windows[:2]), OLDER)
    move_back(world.engine, customer_id, set(windows[2:]), OLD)


def next_report(world: World, customer_id: str) -> list[Any]:
    """New usage, one cycle: the rows it wrote and the values Stripe received."""
    before = len(world.emulator.state.events)
    first = {m: len(rows_for(world.engine, customer_id, m)) for m in ("tokens", "storage")}
    put_total(world.engine, customer_id, "tokens", hour_start(1), "0.35")
    put_total(world.engine, customer_id, "storage", hour_start(1), "0.0017")
    result = world.cycle()
    # A window the aggregators pruned is not due, nor held as "revision went back".
    assert result.held == {}
    written = [
        (r.meter, r.revision, r.window_value, r.accounted_total, r.units_total, r.value, r.status)
        for m in ("tokens", "storage")
        for r in rows_for(world.engine, customer_id, m)[first[m] :]
    ]
    sent = [(e.event_name, e.value) for e in world.emulator.state.events[before:]]
    return [written, sent]


def read_side(world: World, customer_id: str) -> list[Any]:
    """What the reporter, the status and reconcile read besides the next report."""
    # Reconcile lists the pairs with rows in its range: reach back past the aged windows.
    lines = [
        (line.meter, line.database_value, line.not_billed, line.in_flight)
        for line in _reconcile(world, since=OLD + timedelta(days=1))
        if customer_id in line.customer_ids
    ]
    return [
        count_due_windows(world.engine, ["tokens", "storage"]),
        billing_lag_s(world.engine, world.catalogue, datetime.now(UTC)),
        lines,
    ]


def test_next_report_after_pruning_sends_exactly_what_it_would_have_sent(world: World) -> None:
    # Without pruning the ledger (cus_a), then the same history pruned (cus_b).
    history(world, "cus_a")
    prune_aggregates(world.engine, world.settings, datetime.now(UTC))
    unpruned = next_report(world, "cus_a")

    history(world, "cus_b")
    seen_before = read_side(world, "cus_b")
    assert seen_before[2]  # reconcile has lines for cus_b to compare
    prune_aggregates(world.engine, world.settings, datetime.now(UTC))
    rows_before = len(rows_for(world.engine, "cus_b", "tokens"))
    pruned = world.reporter().prune_ledger()

    assert pruned > 0
    assert len(rows_for(world.engine, "cus_b", "tokens")) < rows_before
    assert read_side(world, "cus_b") == seen_before
    assert world.metric("meterstream_reporter_pruned_rows_total", table="ledger") == pruned
    assert next_report(world, "cus_b") == unpruned
    assert unpruned[1]  # it did send something: the carried fractions made whole units


def test_prune_keeps_heads_non_final_rows_and_newest_rows_of_kept_windows(world: World) -> None:
    history(world, "cus_a")
    prune_aggregates(world.engine, world.settings, datetime.now(UTC))
    rows = rows_for(world.engine, "cus_a", "tokens")
    # Saw it fail before the fix: a pending row already called (it turns unknown at its next
    # check) did not keep them, so reconcile could later read a sum without a pruned sent row
    # of the minute and mark a row sent that Stripe never had.
    with world.engine.begin() as connection:
        connection.execute(
            ledger.update()
            .where(ledger.c.identifier == rows[1].identifier)
            .values(status="pending", attempts=1, first_attempt_at=rows[1].created_at)
        )
    prune_ledger(world.engine, datetime.now(UTC), 45, 1000)
    assert {r.identifier for r in rows_for(world.engine, "cus_a", "tokens")} == {
        r.identifier for r in rows
    }
    with world.engine.begin() as connection:
        connection.execute(
            ledger.update()
            .where(ledger.c.identifier == rows[1].identifier)
            .values(
                status=rows[1].status,
                attempts=rows[1].attempts,
                first_attempt_at=rows[1].first_attempt_at,
            )
        )

    # An aged row that would go if it were final stays in every other status.
    for status in ("unknown", "pending", "accepted", "rejected", "sent"):
        with world.engine.begin() as connection:
            connection.execute(
                ledger.update()
                .where(ledger.c.identifier == rows[1].identifier)
                .values(status=status)
            )
        if status != "sent":
            prune_ledger(world.engine, datetime.now(UTC), 45, 1000)
            left = {r.identifier for r in rows_for(world.engine, "cus_a", "tokens")}
            assert rows[1].identifier in left, status
            if status == "unknown":
                # reconcile decides it from the sent rows of its minute: they all stay.
                assert left == {r.identifier for r in rows}
    prune_ledger(world.engine, datetime.now(UTC), 45, 1000)

    kept = rows_for(world.engine, "cus_a", "tokens")
    with world.engine.connect() as connection:
        present = set(
            connection.execute(
                select(window_totals.c.window_start).where(
                    window_totals.c.customer_id == "cus_a", window_totals.c.meter == "tokens"
                )
            ).scalars()
        )
    # The head, and the newest revision of each of the three windows still in window_totals.
    assert kept[-1].identifier == rows[-1].identifier
    assert kept[-1].window_start not in present
    assert {r.window_start for r in kept[:-1]} == present
    assert all(
        r.revision == max(x.revision for x in rows if x.window_start == r.window_start)
        for r in kept
    )


def test_rows_inside_the_retention_stay(world: World) -> None:
    put_total(world.engine, "cus_a", "tokens", hour_start(3), "1")
    world.cycle()
    put_total(world.engine, "cus_a", "tokens", hour_start(3), "2")
    world.cycle()
    put_total(world.engine, "cus_a", "tokens", hour_start(2), "3")
    world.cycle()
    before = rows_for(world.engine, "cus_a", "tokens")

    assert prune_ledger(world.engine, datetime.now(UTC), 45, 1000) == 0
    assert rows_for(world.engine, "cus_a", "tokens") == before


def test_pruning_in_batches_removes_everything_in_several_transactions(world: World) -> None:
    for customer_id in ("cus_a", "cus_b", "cus_c"):
        history(world, customer_id)
    prune_aggregates(world.engine, world.settings, datetime.now(UTC))
    now = datetime.now(UTC)
    in_one = [
        r.identifier
        for c in ("cus_a", "cus_b", "cus_c")
        for m in ("tokens", "storage")
        for r in rows_for(world.engine, c, m)
    ]
    commits: list[int] = []
    event.listen(world.engine, "commit", lambda _connection: commits.append(1))

    removed = prune_ledger(world.engine, now, 45, batch_rows=2)

    assert removed >= 6
    assert len(commits) >= removed // 2
    # Nothing prunable is left: a second pass with one big batch finds nothing.
    assert prune_ledger(world.engine, now, 45, batch_rows=1000) == 0
    with world.engine.connect() as connection:
        left = connection.execute(select(func.count()).select_from(ledger)).scalar_one()
    assert left == len(in_one) - removed


def test_a_held_window_outlives_the_windows_retention_until_the_ledger_has_it(
    world: World,
) -> None:
    put_total(world.engine, "acme", "tokens", hour_start(2), "7")  # acme: never linked
    assert world.cycle().held == {"no_customer_link": 1}

    later = datetime.now(UTC) + timedelta(days=61)
    pruned = prune_aggregates(world.engine, world.settings, later)

    assert pruned["window_totals"] == 0
    assert world.cycle().held == {"no_customer_link": 1}  # still held, still shown


REJECTED_RETENTION = 400
PAST_REJECTED = timedelta(days=REJECTED_RETENTION + 10)


def rejected_history(world: World, customer_id: str) -> list[Any]:
    """Rows Stripe refused (``customer_id`` unknown to it), oldest first: two revisions of one
    window, a second window, one 300 days old (inside the retention), the head. All but the
    300 days old one are aged past the rejected retention; their windows are still stored."""
    windows = [hour_start(h) for h in (9, 9, 8, 6, 7)]
    for value, window in zip(("1", "2", "3", "4", "5"), windows, strict=True):
        put_total(world.engine, customer_id, "tokens", window, value)
        world.cycle()
    rows = rows_for(world.engine, customer_id, "tokens")
    assert [r.status for r in rows] == ["rejected"] * 5
    move_back(world.engine, customer_id, {hour_start(h) for h in (9, 8, 7)}, PAST_REJECTED)
    move_back(world.engine, customer_id, {hour_start(6)}, timedelta(days=300))
    return rows


def _left(world: World, customer_id: str) -> list[str]:
    return [r.identifier for r in rows_for(world.engine, customer_id, "tokens")]


def test_rejected_rows_go_after_their_own_retention_under_every_other_rule(world: World) -> None:
    """Before, rejected rows were never pruned: the ledger grew with every refusal forever."""
    rows = rejected_history(world, "cus_gone")
    ids = [r.identifier for r in rows]
    now = datetime.now(UTC)

    # Without a rejected retention (and within it), every rejected row stays.
    assert prune_ledger(world.engine, now, 45, 1000) == 0
    assert prune_ledger(world.engine, now, 45, 1000, rejected_retention_days=500) == 0
    # Windows still stored: only the superseded revision goes, not the newest of a window.
    assert prune_ledger(world.engine, now, 45, 1000, rejected_retention_days=400) == 1
    assert _left(world, "cus_gone") == ids[1:]

    prune_aggregates(world.engine, world.settings, now)  # the old windows go
    # An unknown row of the same (Stripe customer, meter) keeps them all: reconcile decides it.
    with world.engine.begin() as connection:
        connection.execute(
            ledger.update().where(ledger.c.identifier == ids[3]).values(status="unknown")
        )
    assert prune_ledger(world.engine, now, 45, 1000, rejected_retention_days=400) == 0
    with world.engine.begin() as connection:
        connection.execute(
            ledger.update().where(ledger.c.identifier == ids[3]).values(status="rejected")
        )

    assert prune_ledger(world.engine, now, 45, 1000, rejected_retention_days=400) == 2
    # Left: the one inside the retention, and the head (its running totals carry).
    assert _left(world, "cus_gone") == [ids[3], ids[4]]


def test_the_reporter_prunes_rejected_rows_past_the_setting(world: World) -> None:
    ids = [r.identifier for r in rejected_history(world, "cus_gone")]
    prune_aggregates(world.engine, world.settings, datetime.now(UTC))
    # METERSTREAM_LEDGER_REJECTED_RETENTION_DAYS: 400 by default.
    assert world.reporter().prune_ledger() == 3
    assert _left(world, "cus_gone") == [ids[3], ids[4]]
