"""The stream's stamps (reporters/stream_stamps.py): every row written stamped is either
called or has its stamp taken back, and a lane takes back only the stamps it holds. Found by a
review of the first version (each test failed on it)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.exc import IntegrityError, OperationalError

from meterstream.report_queue import queue_windows
from meterstream.schema import ledger as ledger_table
from meterstream.schema import window_totals
from reporters import bookkeeping, ledger
from reporters.bookkeeping import CycleResult, CycleWork
from reporters.due import take_due
from reporters.ledger import all_rows
from reporters.stream_stamps import LaneStamps
from reporters.stream_writers import STREAM_CHUNKS_AHEAD
from tests.reporters.test_billing_safety import StepClock, reporter_with
from tests.reporters.test_ledger import pending_row
from tests.reporters.test_reporter import World, hour_start, put_total
from tests.reporters.test_stream import FailingSecondCall, stream_reporter

# -- 1. a writer that fails after its rows are committed --------------------------------------


def test_rows_written_stamped_go_to_their_calls_when_setting_aside_a_held_window_fails(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk's rows are committed (stamped), then setting aside its held window (an
    unlinked customer) fails. The rows written go on to their calls all the same: before, the
    chunk was dropped, so cus_a's row kept a stamp without its call and, 21 h later, was made
    ``unknown`` instead of being sent."""
    # app_b (unlinked: held) and cus_a..cus_g: the ramp puts app_b and cus_a in one piece.
    put_total(world.engine, "app_b", "tokens", hour_start(2), "5")
    for customer in "abcdefg":
        if customer not in "abc":  # the world has cus_a, cus_b, cus_c
            world.emulator.state.create_customer(customer_id=f"cus_{customer}")
        put_total(world.engine, f"cus_{customer}", "tokens", hour_start(2), "5")
    failing = {"left": 1}
    real = bookkeeping.set_aside_and_count

    def fails_once(*args: Any, **kwargs: Any) -> None:
        if failing["left"]:
            failing["left"] -= 1
            raise OperationalError("UPDATE report_queue", None, Exception("connection lost"))
        real(*args, **kwargs)

    monkeypatch.setattr(bookkeeping, "set_aside_and_count", fails_once)
    reporter = reporter_with(world, StepClock(), stripe_stream=True)
    reporter.run_cycle()

    assert failing["left"] == 0
    rows = all_rows(world.engine)
    sent = {event.identifier for event in world.emulator.state.events}
    assert {row.customer_id for row in rows} == {f"cus_{c}" for c in "abcdefg"}
    assert all(row.status == "accepted" and row.identifier in sent for row in rows)


# -- 2. a take-back of more rows than a statement has parameters -----------------------------


def many_due(engine: Engine, count: int) -> None:
    """``count`` customers with one due window of tokens each, in one transaction."""
    now = datetime.now(UTC)
    start = hour_start(2)
    customers = [f"cus_{n:06d}" for n in range(count)]
    with engine.begin() as connection:
        connection.execute(
            window_totals.insert(),
            [
                {
                    "customer_id": customer,
                    "meter": "tokens",
                    "window_start": start,
                    "window_end": start + timedelta(hours=1),
                    "value": Decimal(2),
                    "events": 1,
                    "revision": 1,
                    "last_event_time": start + timedelta(minutes=10),
                    "last_event_id": "e1",
                    "first_applied_at": now,
                    "updated_at": now,
                }
                for customer in customers
            ],
        )
        queue_windows(connection, [(c, "tokens", start, 1) for c in customers])


def test_taking_back_more_stamps_than_one_statement_can_bind(pg_world: World) -> None:
    """LaneStamps.take_back_rest of 70,000 rows: one UPDATE ... IN with a parameter a row
    passed PostgreSQL's 65,535 and failed (logged), leaving them all stamped."""
    world = pg_world
    many_due(world.engine, 70_000)
    reporter = reporter_with(world, StepClock(), stripe_stream=True)
    book = reporter._book
    work_keys = [(f"cus_{n:06d}", "tokens") for n in range(70_000)]
    due = take_due(world.engine, book.stripe_meters, datetime.now(UTC) - timedelta(hours=1))
    result = CycleResult()
    written = []
    for start in range(0, len(work_keys), 400):  # the stream's chunks
        chunk = work_keys[start : start + 400]
        queues = book.rows_to_send(chunk, CycleWork(due, {}, {}), result, stamped=True)
        written += [row for key in chunk for row in queues[key]]
    assert len(written) == 70_000 and all(r.attempts == 1 for r in written)

    LaneStamps(book).take_back_rest(written)

    assert [r for r in all_rows(world.engine) if r.attempts] == []


# -- 3. the crash window: writers went on writing stamped rows once their lane had ended -----


def test_rows_stamped_and_not_called_stay_within_the_chunks_ahead(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash leaves stamped at most the rows of the chunks a lane has in hand (queued,
    being written, being sent and the next group's: STREAM_CHUNKS_AHEAD + 3). The lane
    ends at its first call (500 three times); its writer then writes the rest unstamped.
    Before, it went on writing every chunk stamped until the drain took them back: a crash
    meanwhile left the whole backlog stamped (all 4,000 rows written, 100 of them called)."""
    many_due(world.engine, 4_000)  # ten chunks of 400
    seen: list[int] = []
    real = bookkeeping.Bookkeeper.rows_to_send

    def counted(book: bookkeeping.Bookkeeper, *args: Any, **kwargs: Any) -> Any:
        written = real(book, *args, **kwargs)
        seen.append(
            sum(1 for row in all_rows(world.engine) if row.status == "pending" and row.attempts)
        )
        return written

    monkeypatch.setattr(bookkeeping.Bookkeeper, "rows_to_send", counted)
    transport = FailingSecondCall(failing=0)
    with stream_reporter(world, transport) as reporter:  # one lane
        reporter.run_cycle()

    called = 100  # the first call's rows (answered 500): their stamps rightly stay
    assert len(seen) >= 10
    assert max(seen) <= called + (STREAM_CHUNKS_AHEAD + 3) * 400, seen
    assert len([row for row in all_rows(world.engine) if row.attempts]) == called


# -- 4. a take-back of a row this lane never stamped ------------------------------------------


def test_a_group_taken_back_leaves_alone_the_rows_its_stamp_did_not_stamp(world: World) -> None:
    """A row read pending at the cycle's start is no longer pending when its group is stamped
    (made unknown meanwhile), so the lane neither stamps nor calls it. Reconcile then makes
    it pending again, and another reporter stamps and calls it (Stripe may have it). The lane
    then ends (a stop) and takes back its group's stamps: _call_group/_take_back pass every
    row of the group, stamped here or not, and undo_attempts takes back the other reporter's
    stamp, first attempt included (attempts 1 -> 0)."""
    row = dataclasses.replace(pending_row(1), attempts=0, first_attempt_at=None)
    with world.engine.begin() as connection:
        ledger.insert_rows(connection, [row])
    book = reporter_with(world, StepClock(), stripe_stream=True)._book
    with world.engine.begin() as connection:  # another reporter's check: unknown
        connection.execute(
            update(ledger_table)
            .where(ledger_table.c.identifier == row.identifier)
            .values(status="unknown")
        )
    stamps = LaneStamps(book)
    assert stamps.stamp([row]) == set()  # not pending: not stamped, not called here
    now = datetime.now(UTC)
    assert ledger.mark_pending_again(world.engine, row.identifier, now)  # reconcile
    ledger.start_attempts(world.engine, [row.identifier], now)  # another reporter's call

    stamps.unstamp([row])  # the lane stops: its group's stamps taken back

    [found] = all_rows(world.engine)
    assert (found.attempts, found.first_attempt_at) == (1, now)  # before: (0, None)


# -- 5. a one-by-one write that fails part-way ------------------------------------------------


def test_rows_written_one_by_one_before_a_failure_go_to_their_calls(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk's bulk write is refused (IntegrityError: another writer, say), so it is written
    window by window; the second window's write fails (a lost connection). The row written
    before it is committed, stamped: it goes on to its call instead of being dropped with
    the chunk (then it kept its stamp without a call). The window that failed waits for the
    next cycle, which sends it."""
    customers = [f"cus_{c}" for c in "abcdefgh"]  # one lane: pieces of two keys
    for customer in customers:
        if customer not in ("cus_a", "cus_b", "cus_c"):
            world.emulator.state.create_customer(customer_id=customer)
        put_total(world.engine, customer, "tokens", hour_start(2), "5")
    writes = {"count": 0}
    real_write_row = bookkeeping.write_row

    def refused(*_args: Any, **_kwargs: Any) -> Any:
        raise IntegrityError("COPY ledger", None, Exception("duplicate key"))

    def second_fails(*args: Any, **kwargs: Any) -> Any:
        writes["count"] += 1
        if writes["count"] == 2:
            raise OperationalError("SELECT ledger", None, Exception("connection lost"))
        return real_write_row(*args, **kwargs)

    monkeypatch.setattr(bookkeeping, "write_rows", refused)
    monkeypatch.setattr(bookkeeping, "write_row", second_fails)
    reporter = reporter_with(world, StepClock(), stripe_stream=True)
    reporter.sender.lanes = 1  # type: ignore[attr-defined]  # the test's pieces

    reporter.run_cycle()

    rows = all_rows(world.engine)
    sent = {event.identifier for event in world.emulator.state.events}
    assert {row.customer_id for row in rows} == set(customers) - {"cus_b"}
    assert all(row.status == "accepted" and row.identifier in sent for row in rows)

    reporter.run_cycle()

    assert {row.customer_id for row in all_rows(world.engine)} == set(customers)


# -- 6. a take-back whose commit's answer is lost ---------------------------------------------


def test_a_take_back_whose_commit_is_lost_is_not_taken_back_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row read pending was called in an earlier cycle (attempts 1: Stripe may have it).
    This cycle's group stamps it (2); a stop comes before its call and the lane takes that
    stamp back: the UPDATE commits but the connection drops before the COMMIT's answer. Taken
    back again when the lane ended (a second review found), it lost the earlier call's stamp
    too (attempts 0, no first attempt): resent after 20 h or rejected as never sent."""
    row = pending_row(1)  # attempts 1, first_attempt_at set: an earlier cycle's call
    with world.engine.begin() as connection:
        ledger.insert_rows(connection, [row])
    stamps = LaneStamps(reporter_with(world, StepClock(), stripe_stream=True)._book)
    assert stamps.stamp([row]) == {row.identifier}
    undo = ledger.undo_attempts
    lost = {"left": 1}

    def commit_answer_lost(*args: Any, **kwargs: Any) -> None:
        undo(*args, **kwargs)  # committed
        if lost["left"]:
            lost["left"] -= 1
            raise OperationalError("COMMIT", None, Exception("server closed the connection"))

    monkeypatch.setattr(ledger, "undo_attempts", commit_answer_lost)
    stamps.unstamp([row])  # a stop before the call
    stamps.take_back_rest()  # the lane ends

    [found] = all_rows(world.engine)
    assert (found.attempts, found.first_attempt_at) == (1, row.first_attempt_at)


def test_a_take_back_of_more_rows_than_one_sqlite_statement_binds(world: World) -> None:
    """undo_attempts goes in pieces on SQLite (999 variables before 3.32), one transaction."""
    rows = [pending_row(n) for n in range(1, 2001)]
    with world.engine.begin() as connection:
        ledger.insert_rows(connection, rows)
    LaneStamps(reporter_with(world, StepClock(), stripe_stream=True)._book).take_back_rest(rows)
    assert [row for row in all_rows(world.engine) if row.attempts] == []


# -- 7. a key held while writing one by one ---------------------------------------------------


def test_a_key_held_while_writing_one_by_one_holds_its_later_windows_too(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written window by window (the bulk write refused: another writer, say), a key whose
    older window fails on its own (a value past 64 bits) holds its later windows with it, as
    the bulk write does: sending the later one first would bill out of order (a review found
    it sent)."""
    put_total(world.engine, "cus_a", "storage", hour_start(3), "10000000000000000000")
    put_total(world.engine, "cus_a", "storage", hour_start(2), "5")
    put_total(world.engine, "cus_b", "tokens", hour_start(2), "4")

    def refused(*_args: Any, **_kwargs: Any) -> Any:
        raise IntegrityError("COPY ledger", None, Exception("duplicate key"))

    monkeypatch.setattr(bookkeeping, "write_rows", refused)
    result = reporter_with(world, StepClock(), stripe_stream=True).run_cycle()

    assert [(row.customer_id, row.meter) for row in all_rows(world.engine)] == [("cus_b", "tokens")]
    assert result.held_keys[("cus_a", "storage")][0] == "value_out_of_range"
