"""One (customer, meter) that fails never stops the others: it is held with a named reason
(metrics, ``meterstream status``), and every other key is sent as usual, in v1 and stream mode.

The failures come through real inputs: a meter removed from the catalogue while it still has
pending rows, a window whose value in Stripe units passes int64, and a unit_scale with more
digits than the exact carry arithmetic holds.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meterstream.meters import load_catalogue
from reporters.cycle import CycleResult
from reporters.ledger import all_rows, rows_for
from reporters.status import format_status, reporter_status
from tests.reporters.test_reporter import CATALOGUE, World, hour_start, put_total

MODES = pytest.mark.parametrize("stream", [False, True], ids=["v1", "stream"])


def with_catalogue(world: World, text: str, tmp_path: Path) -> World:
    """The same world read with another catalogue (the file the reporter is started with)."""
    path = tmp_path / "changed.toml"
    path.write_text(text, encoding="utf-8")
    settings = world.settings.model_copy(update={"meters_file": path})
    return dataclasses.replace(world, settings=settings, catalogue=load_catalogue(path))


def without_storage() -> str:
    start = CATALOGUE.index("[meters.storage]")
    end = CATALOGUE.index("[meters.api_calls]")
    return CATALOGUE[:start] + CATALOGUE[end:]


def acknowledged(stream: bool) -> str:
    return "accepted" if stream else "sent"


def assert_held_alone(world: World, result: CycleResult, key: tuple[str, str], reason: str) -> None:
    assert set(result.held_keys) == {key}
    assert result.held_keys[key][0] == reason
    assert result.needs_a_person
    assert world.metric("meterstream_reporter_key_failures_total", reason=reason) == 1
    assert world.metric("meterstream_reporter_held_keys", reason=reason) == 1
    shown = format_status(reporter_status(world.engine, world.catalogue, datetime.now(UTC)))
    assert f"{reason}: {key[0]} {key[1]}:" in shown


@MODES
def test_a_meter_removed_with_pending_rows_holds_only_its_keys(
    world: World, tmp_path: Path, stream: bool
) -> None:
    path = "/v2/billing/meter_event_stream" if stream else "/v1/billing/meter_events"
    put_total(world.engine, "cus_a", "storage", hour_start(3), "2")
    world.emulator.faults.inject("http_500", count=None, path_prefix=path)
    world.reporter(stripe_stream=stream).run_cycle()  # Stripe down: the row stays pending
    world.emulator.faults.clear()
    [before] = rows_for(world.engine, "cus_a", "storage")
    assert before.status == "pending"
    for customer in ("cus_a", "cus_b", "cus_c"):  # sorted after ("cus_a", "storage") too
        put_total(world.engine, customer, "tokens", hour_start(2), "5")
    removed = with_catalogue(world, without_storage(), tmp_path)

    result = removed.reporter(stripe_stream=stream).run_cycle()

    assert world.totals() == {("tokens", c): 5 for c in ("cus_a", "cus_b", "cus_c")}
    assert_held_alone(removed, result, ("cus_a", "storage"), "meter_not_in_catalogue")
    [after] = rows_for(world.engine, "cus_a", "storage")
    # Neither stamped nor called: its UNKNOWN_AFTER clock did not move.
    assert (after.status, after.attempts, after.first_attempt_at) == (
        "pending",
        before.attempts,
        before.first_attempt_at,
    )
    # A person puts the meter back: it goes out, and the hold is lifted.
    again = world.reporter(stripe_stream=stream).run_cycle()
    assert again.held_keys == {}
    assert world.totals()[("storage_mb", "cus_a")] == 2000
    assert world.metric("meterstream_reporter_held_keys", reason="meter_not_in_catalogue") == 0


@MODES
def test_a_value_past_int64_holds_only_its_key(world: World, stream: bool) -> None:
    # 10^19 MB at unit_scale 1000 is 10^22 Stripe units: past BIGINT and Stripe's integers.
    put_total(world.engine, "cus_a", "storage", hour_start(2), "10000000000000000000")
    put_total(world.engine, "cus_a", "storage", hour_start(3), "10000000000000000000")
    put_total(world.engine, "cus_a", "tokens", hour_start(2), "4")
    put_total(world.engine, "cus_b", "tokens", hour_start(2), "5")

    result = world.reporter(stripe_stream=stream).run_cycle()

    assert world.totals() == {("tokens", "cus_a"): 4, ("tokens", "cus_b"): 5}
    assert {r.status for r in all_rows(world.engine)} == {acknowledged(stream)}
    assert rows_for(world.engine, "cus_a", "storage") == []
    assert_held_alone(world, result, ("cus_a", "storage"), "value_out_of_range")
    assert "pass the 64-bit integers" in result.held_keys[("cus_a", "storage")][1]


@MODES
def test_a_value_that_cannot_be_computed_exactly_holds_only_its_key(
    world: World, tmp_path: Path, stream: bool
) -> None:
    # A unit_scale of 52 significant digits times a total of 30 passes the 60 digits the carry
    # arithmetic holds: rather than bill a rounded number, the key is held.
    long_scale = '"1000.000000000000000000000000000000000000000000000001"'
    changed = with_catalogue(
        world, CATALOGUE.replace('unit_scale = "1000"', f"unit_scale = {long_scale}"), tmp_path
    )
    put_total(world.engine, "cus_a", "storage", hour_start(2), "123456789012345678.123456789012")
    put_total(world.engine, "cus_b", "tokens", hour_start(2), "5")

    result = changed.reporter(stripe_stream=stream).run_cycle()

    assert world.totals() == {("tokens", "cus_b"): 5}
    assert rows_for(world.engine, "cus_a", "storage") == []
    assert_held_alone(changed, result, ("cus_a", "storage"), "value_not_exact")
