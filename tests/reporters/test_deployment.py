"""The deployment id: two databases on one Stripe account never share a meter event identifier."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import update

from meterstream.db import build_engine, migrate
from meterstream.deployment import deployment_id_of, stored_deployment_id
from meterstream.meters import load_catalogue
from meterstream.schema import deployment
from meterstream.settings import load_settings
from reporters.ledger import all_rows
from tests.reporters.test_reporter import World, hour_start, put_total, world_settings


def test_two_deployments_report_the_same_window_and_revision_and_both_are_accepted(
    world: World, tmp_path: Path
) -> None:
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_settings = world_settings(
        world.emulator, f"sqlite:///{other_dir / 'other.db'}", other_dir
    )
    other_engine = build_engine(other_settings)
    try:
        migrate(other_engine)
        other = World(
            world.emulator, other_engine, other_settings, load_catalogue(other_settings.meters_file)
        )
        window = hour_start(2)
        put_total(world.engine, "cus_a", "tokens", window, "5")
        put_total(other.engine, "cus_a", "tokens", window, "7")

        world.cycle()
        other.cycle()

        [first] = all_rows(world.engine)
        [second] = all_rows(other.engine)
    finally:
        other_engine.dispose()
    assert (first.revision, second.revision) == (1, 1)
    assert (first.status, second.status) == ("sent", "sent")
    assert first.identifier != second.identifier
    assert sorted(e.value for e in world.emulator.state.events) == [5, 7]
    assert world.totals() == {("tokens", "cus_a"): 12}


def test_every_database_gets_its_own_id_and_the_setting_overrides_it(world: World) -> None:
    stored = stored_deployment_id(world.engine)
    migrate(world.engine)  # again: the id stays

    assert stored_deployment_id(world.engine) == stored
    assert deployment_id_of(world.settings, world.engine) == stored
    named = load_settings(database_url=world.settings.database_url, deployment_id="eu-prod-2")
    assert deployment_id_of(named, world.engine) == "eu-prod-2"


def test_rows_already_in_the_ledger_keep_their_identifiers(world: World) -> None:
    window = hour_start(2)
    put_total(world.engine, "cus_a", "tokens", window, "5")
    world.cycle()
    [before] = all_rows(world.engine)
    with world.engine.begin() as connection:
        connection.execute(update(deployment).values(deployment_id="renamed"))

    put_total(world.engine, "cus_a", "tokens", window, "8")
    world.cycle()

    first, second = all_rows(world.engine)
    assert first.identifier == before.identifier
    assert second.identifier.startswith("ms2_renamed_")
    assert world.totals() == {("tokens", "cus_a"): 8}
