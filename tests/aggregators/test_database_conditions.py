"""What the database does under a running applier is the database's doing, never a message's:
a day partition dropped, a read-only failover, an unknown condition that fails every statement,
a restore that takes the database back in time. None of them may park good events or commit
past events the database lost."""

from __future__ import annotations

import logging
from datetime import timedelta
from decimal import Decimal

import psycopg
import pytest
from sqlalchemy import Engine, delete, func, insert, select, update
from sqlalchemy.exc import DBAPIError

from aggregators.offset_store import DatabaseWentBackError, start_offsets, stored_offsets
from aggregators.reference import reference_totals
from meterstream.events import UsageEvent
from meterstream.meters import load_catalogue
from meterstream.schema import applied_offsets, metadata, rejected_events
from tests.aggregators.test_batch import NOW, applier, as_messages, stored_totals
from tests.conftest import EXAMPLE_METERS, POSTGRES_ADMIN_URL

CATALOGUE = load_catalogue(EXAMPLE_METERS)


def _events(first: int, count: int) -> list[UsageEvent]:
    t = NOW - timedelta(minutes=1)
    return [
        UsageEvent(f"e{i}", "s", f"c{i % 3}", "tokens", Decimal(i + 1), t)
        for i in range(first, first + count)
    ]


def _rejected(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(rejected_events)).scalar_one()


def test_a_day_partition_dropped_under_the_applier_is_created_again(
    postgres_engine: Engine,
) -> None:
    same = applier(postgres_engine, CATALOGUE)
    assert same.apply(as_messages(_events(0, 1))).applied == 1
    day = (NOW - timedelta(minutes=1)).date()
    with postgres_engine.begin() as connection:
        connection.exec_driver_sql(f"DROP TABLE seen_events_{day:%Y%m%d}")
    result = same.apply(as_messages(_events(1, 3), first_offset=1))
    assert result.rejected == []
    assert result.applied == 3
    assert _rejected(postgres_engine) == 0


def test_a_read_only_database_fails_the_batch_and_parks_nothing(
    postgres_engine: Engine, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = postgres_url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    postgres_engine.dispose()  # new connections read the new default
    try:
        with (
            pytest.raises(DBAPIError) as caught,
            caplog.at_level(logging.WARNING, logger="aggregators.batch"),
        ):
            applier(postgres_engine, CATALOGUE).apply(as_messages(_events(0, 8)))
        assert caught.value.orig is not None
        assert getattr(caught.value.orig, "sqlstate", None) == "25006"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = off')
        postgres_engine.dispose()
    assert _rejected(postgres_engine) == 0
    # Retried as the database's failure, not bisected down to messages blamed one by one.
    assert not [r for r in caplog.records if "refused" in r.getMessage()]


_UNKNOWN_CONDITION = """
CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF {condition} THEN
    RAISE EXCEPTION 'a condition faults.py does not know' USING ERRCODE = 'P0001';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON window_totals
  FOR EACH ROW EXECUTE FUNCTION refuse();
"""


def test_a_condition_that_fails_every_message_alike_is_retried_not_dead_lettered(
    postgres_engine: Engine,
) -> None:
    with postgres_engine.begin() as connection:
        connection.exec_driver_sql(_UNKNOWN_CONDITION.format(condition="true"))
    with pytest.raises(DBAPIError):
        applier(postgres_engine, CATALOGUE).apply(as_messages(_events(0, 8)))
    assert _rejected(postgres_engine) == 0


def test_one_message_an_unknown_condition_refuses_is_still_isolated(
    postgres_engine: Engine,
) -> None:
    # The circuit breaker must not stall the worker on one message: its neighbours apply.
    with postgres_engine.begin() as connection:
        connection.exec_driver_sql(_UNKNOWN_CONDITION.format(condition="NEW.customer_id = 'x'"))
    events = _events(0, 7)
    events.insert(3, UsageEvent("bad", "s", "x", "tokens", Decimal(1), events[0].event_time))
    result = applier(postgres_engine, CATALOGUE).apply(as_messages(events))
    assert result.applied == 7
    assert [(r.message.offset, r.rejection.reason) for r in result.rejected] == [(3, "unstorable")]


def snapshot_rows(engine: Engine) -> dict[str, list[dict[str, object]]]:
    with engine.connect() as connection:
        return {
            table.name: [dict(row._mapping) for row in connection.execute(select(table))]
            for table in metadata.sorted_tables
        }


def restore_rows(engine: Engine, snapshot: dict[str, list[dict[str, object]]]) -> None:
    """What a restore from a backup does to the rows (partitions left as they are)."""
    with engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            connection.execute(delete(table))
        for table in metadata.sorted_tables:
            if snapshot[table.name]:
                connection.execute(insert(table), snapshot[table.name])


def test_a_database_restored_under_a_running_applier_is_refused_then_resumed_from_its_offset(
    migrated_engine: Engine,
) -> None:
    events = _events(0, 15)
    messages = as_messages(events)
    running = applier(migrated_engine, CATALOGUE)
    running.apply(messages[0:5])
    backup = snapshot_rows(migrated_engine)
    running.apply(messages[5:10])
    restore_rows(migrated_engine, backup)  # back to offset 5, keys and totals of 5..9 gone
    restored_totals = stored_totals(migrated_engine)

    with pytest.raises(DatabaseWentBackError):
        running.apply(messages[10:15])
    # Nothing committed: the offset did not jump past the gap, the totals did not move.
    assert stored_offsets(migrated_engine, "usage") == {0: 5}
    assert stored_totals(migrated_engine) == restored_totals
    # A fresh start (the worker exits on that error) seeks to the database's offset.
    assert start_offsets(stored_offsets(migrated_engine, "usage"), {0: 15}) == {0: 5}
    restarted = applier(migrated_engine, CATALOGUE)
    restarted.apply(messages[5:15])
    assert stored_totals(migrated_engine) == reference_totals(events, CATALOGUE)


def test_offsets_raised_by_another_worker_are_not_arestore_rows(migrated_engine: Engine) -> None:
    messages = as_messages(_events(0, 10))
    mine = applier(migrated_engine, CATALOGUE)
    mine.apply(messages[0:5])
    with migrated_engine.begin() as connection:  # another owner went further meanwhile
        connection.execute(update(applied_offsets).values(next_offset=8))
    assert mine.apply(messages[5:10]).applied == 5
    assert stored_offsets(migrated_engine, "usage") == {0: 10}


def test_a_batch_read_again_from_the_restored_offset_is_applied(migrated_engine: Engine) -> None:
    # The partition left this worker, the database was restored, the partition came back and
    # the worker seeked to the database's offset: nothing is skipped, nothing to refuse.
    events = _events(0, 15)
    messages = as_messages(events)
    running = applier(migrated_engine, CATALOGUE)
    running.apply(messages[0:5])
    backup = snapshot_rows(migrated_engine)
    running.apply(messages[5:10])
    restore_rows(migrated_engine, backup)
    running.apply(messages[5:15])
    assert stored_offsets(migrated_engine, "usage") == {0: 15}
    assert stored_totals(migrated_engine) == reference_totals(events, CATALOGUE)
