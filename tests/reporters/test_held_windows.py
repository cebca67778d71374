"""Held windows are set aside, not read every cycle, and stay out of the billing lag (#15, #19).

Before, a window held for an unlinked customer (or a negative correction) kept its queue row
and was read, joined and held again in every cycle, forever, and it pinned
meterstream_reporter_billing_lag_seconds at its age, so the lag alert fired and hid real lag.
Now the queue row is marked held: a cycle takes it back on a new revision, on a link, or on a
slow re-check; held usage has its own gauges and alert.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from meterstream.meters import Catalogue
from meterstream.schema import customer_links
from reporters.customers import link_customer
from reporters.due import take_due
from reporters.held_windows import set_aside
from reporters.rows import HELD_NO_CUSTOMER_LINK
from reporters.status import billing_lag_s
from tests.reporters.test_billing_safety import StepClock, reporter_with
from tests.reporters.test_reporter import STRIPE_METERS, World, hour_start, put_total

METERS = ["tokens", "storage", "api_calls", "peak"]
HELD = "meterstream_reporter_meter_events_held_total"


def _due_keys(world: World, recheck_before: datetime | None = None) -> set[tuple[str, str]]:
    return set(take_due(world.engine, METERS, recheck_before))


def test_a_held_window_is_not_read_again_until_its_window_changes_or_is_linked(
    world: World,
) -> None:
    assert set(STRIPE_METERS) >= {"tokens"}
    put_total(world.engine, "acme", "tokens", hour_start(3), "2")  # acme: no Stripe link
    first = world.cycle()
    assert first.held == {"no_customer_link": 1} and first.needs_a_person

    assert _due_keys(world) == set()  # before: read (and held) again every cycle
    second = world.cycle()
    assert second.held == {"no_customer_link": 1} and second.needs_a_person
    assert world.metric(HELD, reason="no_customer_link") == 1

    put_total(world.engine, "acme", "tokens", hour_start(3), "3")  # a new revision: read again
    assert _due_keys(world) == {("acme", "tokens")}
    world.cycle()
    assert _due_keys(world) == set()
    assert world.metric(HELD, reason="no_customer_link") == 2  # once per revision

    link_customer(world.engine, "acme", "cus_b", datetime.now(UTC))  # brings it back at once
    assert _due_keys(world) == {("acme", "tokens")}
    assert world.cycle().held == {}
    assert world.totals() == {("tokens", "cus_b"): 3}


def test_a_held_window_is_checked_again_on_a_slow_timer(world: World) -> None:
    clock = StepClock()
    put_total(world.engine, "acme", "tokens", hour_start(3), "2")
    reporter_with(world, clock).run_cycle()
    # A link written by hand, not through `meterstream customers link`: nothing tells the queue.
    now = datetime.now(UTC)
    with world.engine.begin() as connection:
        connection.execute(
            customer_links.insert().values(
                customer_id="acme", stripe_customer_id="cus_b", created_at=now, updated_at=now
            )
        )
    assert _due_keys(world, datetime.now(UTC) - timedelta(hours=1)) == set()

    clock.offset = timedelta(minutes=61)
    assert _due_keys(world, clock() - timedelta(hours=1)) == {("acme", "tokens")}
    result = reporter_with(world, clock).run_cycle()

    assert result.held == {}
    assert world.totals() == {("tokens", "cus_b"): 2}


def test_a_recheck_that_still_holds_is_not_counted_again(world: World) -> None:
    clock = StepClock()
    put_total(world.engine, "acme", "tokens", hour_start(3), "2")
    reporter_with(world, clock).run_cycle()
    clock.offset = timedelta(minutes=61)

    assert reporter_with(world, clock).run_cycle().held == {"no_customer_link": 1}

    assert world.metric(HELD, reason="no_customer_link") == 1
    assert _due_keys(world, clock() - timedelta(hours=1)) == set()  # checked again just now


def test_billing_lag_leaves_out_held_windows_and_held_keys(world: World) -> None:
    put_total(world.engine, "acme", "tokens", hour_start(3), "2")  # held: no link
    # Past 64-bit integers once scaled: the (cus_a, storage) pair is held, its window queued.
    put_total(world.engine, "cus_a", "storage", hour_start(4), "10000000000000000000")
    put_total(world.engine, "cus_b", "tokens", hour_start(2), "5")  # sent
    world.cycle()

    assert billing_lag_s(world.engine, world.catalogue, datetime.now(UTC)) == 0
    assert world.metric("meterstream_reporter_billing_lag_seconds") == 0
    assert world.metric("meterstream_reporter_held_windows", reason="no_customer_link") == 1
    assert world.metric("meterstream_reporter_held_keys", reason="value_out_of_range") == 1
    age = world.metric("meterstream_reporter_held_oldest_age_seconds")
    assert 0 <= age < 3600

    # Real lag still shows: a closed window Stripe does not take.
    world.emulator.faults.inject("http_500", count=None, path_prefix="/v1/billing/meter_events")
    put_total(world.engine, "cus_c", "tokens", hour_start(5), "1")
    world.cycle()
    assert world.metric("meterstream_reporter_billing_lag_seconds") >= 3 * 3600


def test_a_link_committed_during_the_cycle_is_not_met_by_a_hold(world: World) -> None:
    # Saw it fail before the fix: a cycle reads the links at its start; `customers link`
    # committed after that read (its release found nothing held yet), then the cycle held the
    # window for want of a link, and it waited an hour for the slow re-check.
    put_total(world.engine, "acme", "tokens", hour_start(3), "2")
    [window] = take_due(world.engine, METERS)[("acme", "tokens")]  # the cycle's read...
    link_customer(world.engine, "acme", "cus_b", datetime.now(UTC))  # ... then the link

    first = set_aside(world.engine, [(window, HELD_NO_CUSTOMER_LINK)], datetime.now(UTC))

    assert first == set()
    assert _due_keys(world) == {("acme", "tokens")}
    assert world.cycle().held == {}
    assert world.totals() == {("tokens", "cus_b"): 2}


def test_an_unknown_row_does_not_pin_the_billing_lag_and_has_its_own_gauge(world: World) -> None:
    # Saw it fail before the fix: a row reconcile cannot settle stays unknown for good, and
    # it held the billing lag at its age, so the lag alert fired for ever and hid real lag.
    clock = StepClock()
    put_total(world.engine, "cus_a", "tokens", hour_start(2), "5")
    world.emulator.faults.inject("drop_connection", count=3, path_prefix="/v1/billing/meter_events")
    reporter_with(world, clock).run_cycle()
    clock.offset = timedelta(hours=21)

    result = reporter_with(world, clock).run_cycle()

    assert result.unknown == 1
    assert billing_lag_s(world.engine, world.catalogue, clock()) == 0
    assert world.metric("meterstream_reporter_billing_lag_seconds") == 0
    assert world.metric("meterstream_reporter_ledger_unknown_rows") == 1
    # Real lag still shows beside it.
    world.emulator.faults.inject("http_500", count=None, path_prefix="/v1/billing/meter_events")
    put_total(world.engine, "cus_b", "tokens", hour_start(5), "1")
    reporter_with(world, clock).run_cycle()
    assert world.metric("meterstream_reporter_billing_lag_seconds") >= 21 * 3600


def test_billing_lag_takes_each_meters_own_grace(world: World) -> None:
    """The rows not final of every meter are read in one pass, each held to its own meter's
    grace: a window inside its meter's grace is not lag, one past another's is."""
    now = datetime.now(UTC)
    world.emulator.faults.inject("http_500", count=None, path_prefix="/v1/billing/meter_events")
    put_total(world.engine, "cus_b", "tokens", hour_start(3), "1")  # ended 2 to 3 h ago
    put_total(world.engine, "cus_c", "storage", hour_start(5), "1")  # ended 4 to 5 h ago
    world.cycle()  # both rows written, neither acknowledged
    meters = world.catalogue.meters
    lenient = {
        **meters,
        "storage": dataclasses.replace(meters["storage"], grace_s=5 * 3600),
        "tokens": dataclasses.replace(meters["tokens"], grace_s=60),
    }
    strict = {**lenient, "tokens": dataclasses.replace(meters["tokens"], grace_s=3 * 3600)}

    lag = billing_lag_s(world.engine, Catalogue(lenient), now)
    nothing_past_grace = billing_lag_s(world.engine, Catalogue(strict), now)

    assert 2 * 3600 <= lag < 3 * 3600  # tokens' window, not storage's older one
    assert nothing_past_grace == 0
