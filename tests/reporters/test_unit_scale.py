"""A meter's unit_scale cannot change under its ledger: the reporter refuses to start, saying
what to do, instead of re-pricing the whole history in the next event (in both directions).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select, update

from meterstream.errors import ConfigError
from meterstream.schema import ledger, meter_scales
from reporters.ledger import all_rows
from tests.reporters.test_key_holds import with_catalogue
from tests.reporters.test_reporter import CATALOGUE, World, hour_start, put_total

TOKENS_AT_1000 = CATALOGUE.replace(
    'stripe_event_name = "tokens"\n', 'stripe_event_name = "tokens"\nunit_scale = "1000"\n'
)
STORAGE_AT_1 = CATALOGUE.replace('unit_scale = "1000"', 'unit_scale = "1"')


def test_rows_record_the_scale_they_were_computed_with(world: World) -> None:
    put_total(world.engine, "cus_a", "tokens", hour_start(2), "5")
    put_total(world.engine, "cus_a", "storage", hour_start(2), "2.5")
    world.cycle()
    scales = {row.meter: row.unit_scale for row in all_rows(world.engine)}
    assert scales == {"tokens": 1, "storage": 1000}


@pytest.mark.parametrize(
    ("meter", "event_name", "changed", "old", "new"),
    [
        ("tokens", "tokens", TOKENS_AT_1000, "1", "1000"),  # would bill the history again x1000
        ("storage", "storage_mb", STORAGE_AT_1, "1000", "1"),  # would credit the history
    ],
    ids=["1_to_1000", "1000_to_1"],
)
def test_a_changed_unit_scale_is_refused_at_start_saying_what_to_do(
    world: World, tmp_path: Path, meter: str, event_name: str, changed: str, old: str, new: str
) -> None:
    put_total(world.engine, "cus_a", meter, hour_start(3), "5000")
    world.cycle()
    billed = world.totals()
    put_total(world.engine, "cus_a", meter, hour_start(2), "3")

    with pytest.raises(ConfigError) as refused:
        with_catalogue(world, changed, tmp_path).reporter()

    message = str(refused.value)
    assert f"meter {meter!r}: unit_scale is {new}" in message
    assert f"computed at {old}" in message
    assert "Put the unit_scale back" in message and "new meter" in message
    assert world.totals() == billed  # nothing re-priced
    world.cycle()  # the scale put back: new usage goes out at it
    assert world.totals()[(event_name, "cus_a")] == billed[(event_name, "cus_a")] + 3 * int(old)


def test_a_ledger_from_before_scales_were_recorded_is_taken_at_the_current_scale(
    world: World,
) -> None:
    put_total(world.engine, "cus_a", "storage", hour_start(3), "2")
    world.cycle()
    with world.engine.begin() as connection:  # as migration 0006 leaves an older ledger
        connection.execute(update(ledger).values(unit_scale=None))
        connection.execute(update(meter_scales).values(unit_scale=None))

    world.reporter()  # starts

    with world.engine.connect() as connection:
        rows = connection.execute(select(meter_scales.c.meter, meter_scales.c.unit_scale)).all()
    recorded = {meter: scale for meter, scale in rows}
    assert recorded["storage"] == 1000


def test_a_scale_edited_with_the_upgrade_is_refused_from_the_rows_running_totals(
    world: World, tmp_path: Path
) -> None:
    put_total(world.engine, "cus_a", "tokens", hour_start(3), "2.5")
    world.cycle()
    with world.engine.begin() as connection:  # a ledger from before scales were recorded
        connection.execute(update(ledger).values(unit_scale=None))
        connection.execute(update(meter_scales).values(unit_scale=None))
    billed = world.totals()

    with pytest.raises(ConfigError, match="computed at another scale"):
        with_catalogue(world, TOKENS_AT_1000, tmp_path).reporter()

    assert world.totals() == billed  # nothing re-priced
