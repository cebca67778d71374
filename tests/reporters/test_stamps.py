"""A stamp (attempts + 1, first_attempt_at) means "this call was made, Stripe may have it":
rows never called are never stamped, so they can never turn ``unknown`` after 20 h.

A key revoked or a stop requested mid-cycle leaves the rows not yet called pending and
unstamped, in v1 (one row a call) and on the v2 stream (one batch a call).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest

from meterstream.errors import StripeAuthError
from reporters import service
from reporters.bookkeeping import Bookkeeper
from reporters.cycle import Reporter
from reporters.ledger import LedgerRow, all_rows
from reporters.rows import TOO_OLD_CODE
from tests.reporters.test_billing_safety import StepClock, reporter_with
from tests.reporters.test_reporter import SECRET, World, hour_start, put_total
from tests.reporters.test_stream import AcceptedThenRateLimited

V1_PATH = "/v1/billing/meter_events"
STREAM_PATH = "/v2/billing/meter_event_stream"


@contextmanager
def cycle_in_thread(reporter: Reporter) -> Iterator[list[BaseException]]:
    """Run one cycle in a thread; yields the list its exception (if any) lands in."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            reporter.run_cycle()
        except BaseException as exc:  # the test looks at it
            raised.append(exc)

    thread = threading.Thread(target=run, name="cycle")
    thread.start()
    try:
        yield raised
    finally:
        thread.join(timeout=60)
        assert not thread.is_alive()


def three_customers(world: World) -> None:
    for customer in ("cus_a", "cus_b", "cus_c"):
        put_total(world.engine, customer, "tokens", hour_start(2), "5")


def stamped(rows: list[LedgerRow]) -> list[LedgerRow]:
    return [row for row in rows if row.attempts or row.first_attempt_at is not None]


def hold_first_call_then(world: World, path: str, act: Callable[[], None]) -> None:
    assert world.emulator.faults.wait_held(1, timeout_s=30)
    act()
    world.emulator.faults.release()


def test_v1_stop_mid_cycle_leaves_the_rows_not_called_unstamped(world: World) -> None:
    three_customers(world)
    world.emulator.faults.inject("hold", path_prefix=V1_PATH)
    reporter = world.reporter(stripe_rate=1000.0)

    with cycle_in_thread(reporter) as raised:
        hold_first_call_then(world, V1_PATH, world.stop.set)

    assert raised == []
    rows = all_rows(world.engine)
    assert len(world.emulator.state.events) == 1  # the call in hand went on and was answered
    [called] = stamped(rows)
    assert called.status == "sent"
    assert [row.status for row in rows if row is not called] == ["pending", "pending"]


def test_v1_stop_while_a_made_call_backs_off_keeps_its_stamp(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first v1 call reaches Stripe but its answer is lost; the SDK's retry is answered
    429, and a stop comes while the call backs off: Stripe has the event, so its row keeps
    its stamp (unknown after 20 h, never resent blindly); the rows never called have none."""
    three_customers(world)
    transport = AcceptedThenRateLimited(world.stop, V1_PATH)
    monkeypatch.setattr(service, "build_http_client", lambda *_: transport)
    reporter = world.reporter(stripe_rate=1000.0)

    reporter.run_cycle()

    rows = all_rows(world.engine)
    assert transport.tries == 2
    [held] = world.emulator.state.events
    [called] = stamped(rows)
    assert (called.identifier, called.status, called.attempts) == (held.identifier, "pending", 1)
    assert [row.status for row in rows if row is not called] == ["pending", "pending"]


def test_v1_key_revoked_mid_cycle_leaves_the_rows_not_called_unstamped(world: World) -> None:
    three_customers(world)
    world.emulator.faults.inject("hold", path_prefix=V1_PATH)
    reporter = world.reporter()

    with cycle_in_thread(reporter) as raised:
        hold_first_call_then(world, V1_PATH, lambda: world.emulator.state.revoke_key(SECRET))

    assert [type(exc) for exc in raised] == [StripeAuthError]
    rows = sorted(all_rows(world.engine), key=lambda row: row.customer_id)
    # cus_a's call was made and answered; cus_b's was made and refused (401: Stripe has
    # nothing, but a made call is stamped); cus_c's was never made.
    assert [(r.customer_id, r.status, r.attempts) for r in rows] == [
        ("cus_a", "sent", 1),
        ("cus_b", "pending", 1),
        ("cus_c", "pending", 0),
    ]
    assert rows[2].first_attempt_at is None


def test_stream_key_revoked_mid_cycle_leaves_the_next_batch_unstamped(world: World) -> None:
    """The first batch's call is in flight when the key is revoked; the next batch needs a
    new session (15 minutes passed), which Stripe refuses: that batch is never called, so it
    is not stamped."""
    for hours_ago in range(2, 37):  # 35 hours x 3 customers: 105 rows, two batches
        for customer in ("cus_a", "cus_b", "cus_c"):
            put_total(world.engine, customer, "tokens", hour_start(hours_ago), "1")
    clock = StepClock()
    world.emulator.faults.inject("hold", path_prefix=STREAM_PATH)
    reporter = reporter_with(world, clock, stripe_stream=True)
    reporter.sender.lanes = 1  # type: ignore[attr-defined]  # one lane: its batches in turn

    def revoke_and_let_the_session_age() -> None:
        world.emulator.state.revoke_key(SECRET)
        clock.offset = timedelta(minutes=15)

    with cycle_in_thread(reporter) as raised:
        hold_first_call_then(world, STREAM_PATH, revoke_and_let_the_session_age)

    assert [type(exc) for exc in raised] == [StripeAuthError]
    rows = all_rows(world.engine)
    assert len(rows) == 105
    accepted = [row for row in rows if row.status == "accepted"]
    assert len(accepted) == 100
    assert len(world.emulator.state.events) == 100
    assert stamped([row for row in rows if row.status == "pending"]) == []


def test_a_row_written_stamped_that_turns_too_old_before_its_call_is_rejected_not_unknown(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream writes its new rows stamped; one that turns too old for Stripe between its
    write and its call was never called: rejected (bill it by hand), not ``unknown`` (which
    would say Stripe may have it)."""
    put_total(world.engine, "cus_a", "tokens", hour_start(2), "5")  # its timestamp: 1 h 50 ago
    clock = StepClock()
    # Sendable when written: the send limit (horizon less an hour) 10 minutes before it.
    clock.offset = timedelta(days=world.settings.horizon_days) - timedelta(hours=3)
    reporter = reporter_with(world, clock, stripe_stream=True)
    checked = Bookkeeper.may_call

    def an_hour_later(book: Bookkeeper, *args: Any, **kwargs: Any) -> bool:
        clock.offset += timedelta(hours=1)
        return checked(book, *args, **kwargs)

    monkeypatch.setattr(Bookkeeper, "may_call", an_hour_later)

    reporter.run_cycle()

    [row] = all_rows(world.engine)
    assert (row.status, row.error_code) == ("rejected", TOO_OLD_CODE)
    assert not world.emulator.state.events
