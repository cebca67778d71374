"""Retention of the aggregators' tables: what is past it goes, in small transactions; what is
inside stays. The rows are written by the real BatchApplier, at a clock in the past."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, delete, event, func, select

from aggregators.batch import BatchApplier, Message
from aggregators.retention import prune_aggregates
from meterstream.events import UsageEvent, encode_event
from meterstream.meters import load_catalogue
from meterstream.metrics import AggregatorMetrics
from meterstream.schema import rejected_events, report_queue, unique_values, window_totals
from meterstream.settings import load_settings
from tests.conftest import EXAMPLE_METERS

THEN = datetime(2026, 9, 10, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def write_history(engine: Engine) -> None:
    """At THEN: hourly windows 0 to 30 days old, a month of unique users, one refusal a day."""
    for days in range(0, 31):
        at = THEN - days * DAY
        applier = BatchApplier(
            engine,
            load_catalogue(EXAMPLE_METERS),
            AggregatorMetrics(),
            horizon_days=35,
            clock=lambda at=at: at,  # the clock of that day
        )
        events = [
            UsageEvent(f"t{days}", "s", "cus_a", "tokens", Decimal(1), at - timedelta(minutes=5)),
            UsageEvent(
                f"u{days}", "s", "cus_a", "active_users", Decimal(1), at, {"user_id": f"u{days}"}
            ),
        ]
        messages = [
            Message("usage", 0, 3 * days + i, encode_event(e)) for i, e in enumerate(events)
        ]
        messages.append(Message("usage", 0, 3 * days + 2, b"not json"))
        applier.apply(messages)
    reported(engine)


def reported(engine: Engine) -> None:
    """What the reporter leaves once the ledger has every window: an empty report queue."""
    with engine.begin() as connection:
        connection.execute(delete(report_queue))


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        return {
            table.name: connection.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (window_totals, unique_values, rejected_events)
        }


def test_rows_past_retention_go_and_rows_inside_stay(migrated_engine: Engine) -> None:
    write_history(migrated_engine)
    before = counts(migrated_engine)
    assert before["rejected_events"] == 31
    settings = load_settings(window_retention_days=60, rejected_retention_days=60)
    now = THEN + 45 * DAY  # hourly windows 45 to 75 days old, refusals as old
    metrics = AggregatorMetrics(CollectorRegistry())

    pruned = prune_aggregates(migrated_engine, settings, now, metrics)

    with migrated_engine.connect() as connection:
        oldest_window = connection.execute(select(func.min(window_totals.c.window_end))).scalar()
        oldest_refusal = connection.execute(
            select(func.min(rejected_events.c.rejected_at))
        ).scalar()
    assert oldest_window is not None and oldest_window >= now - 60 * DAY
    assert oldest_refusal is not None and oldest_refusal >= now - 60 * DAY
    # the hourly windows that ended 61 to 75 days ago, the refusals as old; not the months
    assert pruned["window_totals"] == 15
    assert pruned["rejected_events"] == 15
    assert counts(migrated_engine)["window_totals"] == before["window_totals"] - 15
    # The unique users of August: that month closed before the oldest event still admitted.
    assert pruned["unique_values"] > 0
    with migrated_engine.connect() as connection:
        months = set(connection.execute(select(unique_values.c.window_start)).scalars())
    assert months == {datetime(2026, 9, 1, tzinfo=UTC)}
    for table, rows in pruned.items():
        sample = metrics.registry.get_sample_value(
            "meterstream_aggregator_pruned_rows_total", {"table": table}
        )
        assert sample == rows

    assert prune_aggregates(migrated_engine, settings, now) == dict.fromkeys(pruned, 0)


def test_nothing_goes_while_everything_is_inside_retention(migrated_engine: Engine) -> None:
    write_history(migrated_engine)
    before = counts(migrated_engine)
    settings = load_settings(window_retention_days=60, rejected_retention_days=31)

    pruned = prune_aggregates(migrated_engine, settings, THEN)

    assert pruned == {"window_totals": 0, "unique_values": 0, "rejected_events": 0}
    assert counts(migrated_engine) == before


def test_pruning_in_batches_removes_everything_in_several_transactions(
    migrated_engine: Engine,
) -> None:
    write_history(migrated_engine)
    settings = load_settings(
        window_retention_days=37, rejected_retention_days=1, prune_batch_rows=3
    )
    commits: list[int] = []
    event.listen(migrated_engine, "commit", lambda _connection: commits.append(1))

    pruned = prune_aggregates(migrated_engine, settings, THEN + 37 * DAY + DAY)

    # every hourly window and August's month; September's month ends after the cutoff
    assert pruned["window_totals"] == 32
    assert pruned["rejected_events"] == 31
    # at least one transaction per 3 rows deleted
    deleted = sum(pruned.values())
    assert len(commits) >= deleted / 3
    assert counts(migrated_engine)["window_totals"] == 1
    assert counts(migrated_engine)["rejected_events"] == 0


def test_a_window_still_queued_for_the_reporter_is_kept_past_retention(
    migrated_engine: Engine,
) -> None:
    write_history(migrated_engine)
    with migrated_engine.begin() as connection:  # the oldest window: held, not in the ledger
        oldest = connection.execute(
            select(window_totals.c.customer_id, window_totals.c.meter, window_totals.c.window_start)
            .order_by(window_totals.c.window_end)
            .limit(1)
        ).one()
        connection.execute(report_queue.insert().values(**oldest._asdict(), revision=1))
    settings = load_settings(window_retention_days=37, rejected_retention_days=1)

    pruned = prune_aggregates(migrated_engine, settings, THEN + 38 * DAY)

    assert pruned["window_totals"] == 31  # every window past retention but the queued one
    with migrated_engine.connect() as connection:
        kept = connection.execute(
            select(window_totals.c.window_start).where(
                window_totals.c.window_start == oldest.window_start,
                window_totals.c.meter == oldest.meter,
            )
        ).all()
    assert len(kept) == 1
