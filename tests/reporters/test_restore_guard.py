"""The restore guard against the real broker: the mark survives the process, a ledger behind it
holds sending with a gauge and a recorded hold, accepting re-bases it under a new id."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, delete, select, text

from meterstream.db import MIGRATIONS, build_engine, migrate
from meterstream.deployment import stored_deployment_id
from meterstream.errors import ConfigError, RestoredLedgerError
from meterstream.schema import ledger
from meterstream.settings import load_settings
from reporters.ledger.bulk import count_written
from reporters.marks import KafkaMarks
from reporters.restore import RestoreGuard, accept_restore, ledger_rows, restore_hold
from tests.reporters.test_reporter import World, hour_start, put_total


def _guard(world: World, marks: KafkaMarks) -> RestoreGuard:
    return RestoreGuard(
        world.engine,
        marks,
        stored_deployment_id(world.engine),
        world.metrics,
        lambda: datetime.now(UTC),
        current_id=lambda: stored_deployment_id(world.engine),
    )


def test_a_ledger_behind_its_mark_is_held_until_the_restore_is_accepted(
    world: World, kafka_bootstrap: str
) -> None:
    marks = KafkaMarks(kafka_bootstrap, f"marks-{uuid.uuid4().hex[:12]}")
    for hours_ago in (3, 2):
        put_total(world.engine, "cus_a", "tokens", hour_start(hours_ago), "5")
    first = _guard(world, marks)
    assert first.check() == 0  # no mark yet: a new deployment
    world.cycle()
    first.publish()
    assert marks.read(stored_deployment_id(world.engine)) == 2

    # What a restore to before the second row looks like to the reporter.
    with world.engine.begin() as connection:
        newest = connection.execute(
            select(ledger.c.window_start).order_by(ledger.c.sequence.desc())
        )
        connection.execute(delete(ledger).where(ledger.c.window_start == newest.scalar()))
        # A restore takes the written-rows counter back with the rows.
        count_written(connection, -1)
    again = _guard(world, marks)  # a new process: reads the mark from the broker
    with pytest.raises(RestoredLedgerError) as held:
        again.check()

    assert (held.value.ledger_rows, held.value.mark_rows) == (1, 2)
    assert world.metric("meterstream_reporter_ledger_rows_behind_mark") == 1
    hold = restore_hold(world.engine)
    assert hold is not None and (hold.ledger_rows, hold.mark_rows) == (1, 2)

    old, new, rows = accept_restore(world.engine, marks, False, datetime.now(UTC))
    resumed = _guard(world, marks)
    # The process that found the hold still has the old id: it must stop, not send with it.
    with pytest.raises(ConfigError, match="restart the reporter"):
        again.check()

    assert (stored_deployment_id(world.engine), rows) == (new, 1) and new != old
    assert resumed.check() == 1
    assert world.metric("meterstream_reporter_ledger_rows_behind_mark") == 0
    assert restore_hold(world.engine) is None
    assert marks.read(old) == 2  # a restore of the older copy is still caught


def test_rows_pruned_by_retention_do_not_look_like_a_restore(
    world: World, kafka_bootstrap: str
) -> None:
    marks = KafkaMarks(kafka_bootstrap, f"marks-{uuid.uuid4().hex[:12]}")
    for hours_ago in (3, 2):
        put_total(world.engine, "cus_a", "tokens", hour_start(hours_ago), "5")
    guard = _guard(world, marks)
    guard.check()
    world.cycle()
    guard.publish()
    with world.engine.begin() as connection:
        oldest = connection.execute(select(ledger.c.window_start).order_by(ledger.c.sequence))
        connection.execute(delete(ledger).where(ledger.c.window_start == oldest.scalar()))

    assert _guard(world, marks).check() == 2  # rows written, not rows left
    assert world.metric("meterstream_reporter_ledger_rows_behind_mark") == 0


def test_the_written_rows_count_moves_into_slots_and_back_with_its_value(
    database_url: str,
) -> None:
    """Migration 0019 moves the count from deployment into the slot table and 0018 takes it
    back: nothing counted is lost either way (the restore guard compares with it)."""
    engine = build_engine(load_settings(database_url=database_url))
    try:
        migrate(engine, "0018")
        with engine.begin() as connection:
            connection.exec_driver_sql("UPDATE deployment SET ledger_rows_written = 41")
        migrate(engine)
        with engine.begin() as connection:
            count_written(connection, 1)
        with engine.begin() as connection:
            count_written(connection, 2)
        assert ledger_rows(engine) == 44

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0018")
        with engine.connect() as connection:
            kept = connection.exec_driver_sql("SELECT ledger_rows_written FROM deployment")
            assert kept.scalar() == 44
    finally:
        engine.dispose()


@pytest.mark.parametrize("revision", ["head", "0018"])
def test_a_count_committed_while_migration_0019_runs_is_kept(
    postgres_url: str, revision: str
) -> None:
    """A reporter still writing while 0019 runs (or is taken back): its insert's transaction
    has added 5 to the counter and commits while the migration waits on a lock. The copy
    must count those 5; if it read the counter before they were committed, they are lost,
    and a mark taken with them is ahead of the ledger for good (a restore hold)."""
    engine = build_engine(load_settings(database_url=postgres_url))
    try:
        migrate(engine, "0018" if revision == "head" else "head")
        with engine.begin() as connection:
            if revision == "head":
                connection.exec_driver_sql("UPDATE deployment SET ledger_rows_written = 41")
            else:
                count_written(connection, 41)
        failed: list[BaseException] = []

        def migrate_to_revision() -> None:
            try:
                if revision == "head":
                    migrate(engine)
                    return
                config = Config()
                config.set_main_option("script_location", str(MIGRATIONS))
                with engine.begin() as connection:
                    config.attributes["connection"] = connection
                    command.downgrade(config, revision)
            except BaseException as exc:
                failed.append(exc)

        with engine.connect() as writer:
            if revision == "head":  # the counter as a reporter before 0019 adds to it
                writer.exec_driver_sql(
                    "UPDATE deployment SET ledger_rows_written = ledger_rows_written + 5"
                )
            else:
                count_written(writer, 5)
            migration = threading.Thread(target=migrate_to_revision)
            migration.start()
            _wait_for_a_lock_wait(engine)
            writer.commit()
        migration.join()

        assert failed == []
        with engine.connect() as connection:
            if revision == "head":
                assert ledger_rows(engine) == 46
            else:
                kept = connection.exec_driver_sql("SELECT ledger_rows_written FROM deployment")
                assert kept.scalar() == 46
    finally:
        engine.dispose()


def _wait_for_a_lock_wait(engine: Engine) -> None:
    """Until a session of this database waits on a lock (the migration, on the writer's)."""
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    for _ in range(6_000):  # a bound, not a timing: the wait comes within milliseconds
        with engine.connect() as connection:
            if connection.execute(waiting).scalar():
                return
        time.sleep(0.01)
    raise AssertionError("the migration never waited on the writer's lock")
