"""The batch applier on real PostgreSQL and SQLite, checked against a plain reference."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
from sqlalchemy import Engine, func, select

from aggregators.batch import BatchApplier, Message
from aggregators.reference import Totals, reference_totals
from meterstream.events import UsageEvent, encode_event
from meterstream.meters import Catalogue, load_catalogue
from meterstream.metrics import AggregatorMetrics
from meterstream.schema import rejected_events, seen_events, window_totals
from tests.conftest import EXAMPLE_METERS

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
# Ids that need quoting in SQL array literals and CSV alike.
CUSTOMERS = [f"c{i}" for i in range(6)] + ["c,7", 'c"8', "c\\9", "{c10}", "NULL", " c 11 ", "ü12"]


def stored_totals(engine: Engine) -> Totals:
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                window_totals.c.customer_id,
                window_totals.c.meter,
                window_totals.c.window_start,
                window_totals.c.value,
                window_totals.c.events,
            )
        )
        return {(r.customer_id, r.meter, r.window_start): (r.value, r.events) for r in rows}


def random_events(rng: random.Random, count: int, catalogue: Catalogue) -> list[UsageEvent]:
    meters = sorted(catalogue.meters)
    events = []
    for i in range(count):
        meter = catalogue.meters[rng.choice(meters)]
        value = Decimal(rng.randint(0, 10**6)) / Decimal(10) ** rng.randint(0, 12)
        events.append(
            UsageEvent(
                event_id=f"e{i}",
                source="svc",
                customer_id=rng.choice(CUSTOMERS),
                meter=meter.name,
                value=value,
                event_time=NOW - timedelta(seconds=rng.randint(0, 3 * 86_400)),
                properties={"user_id": f"u{rng.randint(0, 20)}"},
            )
        )
    return events


def as_messages(events: list[UsageEvent], first_offset: int = 0) -> list[Message]:
    return [Message("usage", 0, first_offset + i, encode_event(e)) for i, e in enumerate(events)]


def applier(engine: Engine, catalogue: Catalogue) -> BatchApplier:
    return BatchApplier(engine, catalogue, AggregatorMetrics(), horizon_days=35, clock=lambda: NOW)


def test_every_aggregation_matches_the_reference_with_duplicates_and_disorder(
    migrated_engine: Engine,
) -> None:
    catalogue = load_catalogue(EXAMPLE_METERS)
    rng = random.Random(7)
    events = random_events(rng, 3_000, catalogue)
    # Duplicates within a batch, across batches, and the same id re-sent much later.
    stream = events + rng.sample(events, 600)
    rng.shuffle(stream)
    batches = [stream[i : i + 500] for i in range(0, len(stream), 500)]
    target = applier(migrated_engine, catalogue)
    applied = duplicates = 0
    for number, batch in enumerate(batches):
        result = target.apply(as_messages(batch, number * 500))
        applied += result.applied
        duplicates += result.duplicates
    assert (applied, duplicates) == (3_000, 600)
    assert stored_totals(migrated_engine) == reference_totals(events, catalogue)


def test_replaying_every_batch_changes_nothing(migrated_engine: Engine) -> None:
    catalogue = load_catalogue(EXAMPLE_METERS)
    events = random_events(random.Random(3), 1_000, catalogue)
    target = applier(migrated_engine, catalogue)
    target.apply(as_messages(events))
    before = stored_totals(migrated_engine)
    replay = target.apply(as_messages(events))
    assert (replay.applied, replay.duplicates, replay.changed) == (0, 1_000, [])
    assert stored_totals(migrated_engine) == before


def test_a_tenth_plus_a_fifth_is_three_tenths_and_many_cents_add_up(
    migrated_engine: Engine,
) -> None:
    catalogue = load_catalogue(EXAMPLE_METERS)
    event_time = NOW - timedelta(minutes=30)
    values = [Decimal("0.1"), Decimal("0.2")] + [Decimal("0.01")] * 10_000
    events = [
        UsageEvent(f"e{i}", "svc", "c", "tokens", v, event_time) for i, v in enumerate(values)
    ]
    applier(migrated_engine, catalogue).apply(as_messages(events))
    [(value, count)] = stored_totals(migrated_engine).values()
    assert value == Decimal("100.3")
    assert count == 10_002


def test_last_is_decided_by_event_time_then_id_not_by_arrival(migrated_engine: Engine) -> None:
    catalogue = load_catalogue(EXAMPLE_METERS)
    t = NOW - timedelta(hours=2)
    newest_a = UsageEvent("b", "svc", "c", "seats", Decimal(7), t)
    newest_b = UsageEvent("a", "svc", "c", "seats", Decimal(5), t)  # same time, smaller id
    older = UsageEvent("z", "svc", "c", "seats", Decimal(9), t - timedelta(minutes=1))
    target = applier(migrated_engine, catalogue)
    target.apply(as_messages([newest_a]))
    target.apply(as_messages([older, newest_b], 1))
    [(value, count)] = stored_totals(migrated_engine).values()
    assert (value, count) == (Decimal(7), 3)


def test_bad_messages_are_recorded_with_their_reason_and_good_ones_applied(
    migrated_engine: Engine,
) -> None:
    catalogue = load_catalogue(EXAMPLE_METERS)
    good = UsageEvent("ok", "svc", "c", "tokens", Decimal(5), NOW - timedelta(minutes=1))
    unknown = UsageEvent("u", "svc", "c", "nope", Decimal(5), NOW)
    old = UsageEvent("o", "svc", "c", "tokens", Decimal(5), NOW - timedelta(days=36))
    # Beyond METERSTREAM_FUTURE_TOLERANCE_S (600 s) ahead of the worker's clock.
    ahead = UsageEvent("f", "svc", "c", "tokens", Decimal(5), NOW + timedelta(minutes=11))
    negative = UsageEvent("n", "svc", "c", "tokens", Decimal(-5), NOW)
    messages = [
        Message("usage", 0, 0, b"{not json"),
        *as_messages([unknown, good, old, ahead, negative], 1),
        Message("usage", 0, 6, None),
    ]
    result = applier(migrated_engine, catalogue).apply(messages)
    assert result.applied == 1
    assert [r.rejection.reason for r in result.rejected] == [
        "unparseable",
        "unknown_meter",
        "beyond_horizon",
        "in_future",
        "invalid_value",
        "unparseable",
    ]
    with migrated_engine.connect() as connection:
        rows = connection.execute(
            select(
                rejected_events.c.offset, rejected_events.c.reason, rejected_events.c.detail
            ).order_by(rejected_events.c.offset)
        ).all()
    assert [(r.offset, r.reason) for r in rows] == [
        (0, "unparseable"),
        (1, "unknown_meter"),
        (3, "beyond_horizon"),
        (4, "in_future"),
        (5, "invalid_value"),
        (6, "unparseable"),
    ]
    assert "older than 35 days" in rows[2].detail
    assert stored_totals(migrated_engine) == {
        ("c", "tokens", datetime(2026, 11, 24, 11, 0, tzinfo=UTC)): (Decimal(5), 1)
    }


def test_revision_grows_only_when_the_value_changes(migrated_engine: Engine) -> None:
    catalogue = load_catalogue(EXAMPLE_METERS)
    t = NOW - timedelta(minutes=5)
    target = applier(migrated_engine, catalogue)
    first = target.apply(
        as_messages([UsageEvent("1", "s", "c", "peak_connections", Decimal(10), t)])
    )
    lower = target.apply(
        as_messages([UsageEvent("2", "s", "c", "peak_connections", Decimal(3), t)])
    )
    higher = target.apply(
        as_messages([UsageEvent("3", "s", "c", "peak_connections", Decimal(12), t)])
    )
    assert [c.revision for c in first.changed] == [1]
    assert lower.changed == []
    assert [(c.value, c.revision) for c in higher.changed] == [(Decimal(12), 2)]


def test_dedup_keys_past_the_horizon_are_pruned(migrated_engine: Engine) -> None:
    catalogue = load_catalogue(EXAMPLE_METERS)
    target = applier(migrated_engine, catalogue)
    events = [
        UsageEvent(f"e{d}", "s", "c", "tokens", Decimal(1), NOW - timedelta(days=d))
        for d in range(0, 35, 5)
    ]
    target.apply(as_messages(events))
    assert target.dedup.prune((NOW + timedelta(days=20)).date()) > 0
    with migrated_engine.connect() as connection:
        days = connection.execute(select(func.min(seen_events.c.event_day))).scalar_one()
    assert days >= (NOW + timedelta(days=20) - timedelta(days=36)).date()


def test_a_resend_restamped_across_midnight_counts_once(migrated_engine: Engine) -> None:
    catalogue = load_catalogue(EXAMPLE_METERS)
    midnight = datetime(2026, 11, 24, 0, 0, tzinfo=UTC)
    before = UsageEvent("x", "svc", "c", "tokens", Decimal(5), midnight - timedelta(seconds=1))
    after = UsageEvent("x", "svc", "c", "tokens", Decimal(5), midnight + timedelta(seconds=1))
    target = applier(migrated_engine, catalogue)
    assert target.apply(as_messages([before])).applied == 1
    again = target.apply(as_messages([after], 1))
    assert (again.applied, again.duplicates) == (0, 1)
    both = applier(migrated_engine, catalogue).apply(
        as_messages(
            [
                UsageEvent("y", "svc", "c", "tokens", Decimal(5), midnight + timedelta(seconds=5)),
                UsageEvent("y", "svc", "c", "tokens", Decimal(5), midnight - timedelta(seconds=5)),
            ],
            2,
        )
    )
    assert (both.applied, both.duplicates) == (1, 1)


def test_twenty_nine_digit_totals_are_not_rounded(migrated_engine: Engine) -> None:
    catalogue = load_catalogue(EXAMPLE_METERS)
    t = NOW - timedelta(minutes=3)
    # The largest value Stripe's 15 digits take, with 12 digits after the point: eleven of them
    # need 29 digits, one more than Python's default context keeps.
    values = [Decimal("999999999999999.999999999999")] * 11 + [Decimal("0.000000000011")]
    events = [UsageEvent(f"e{i}", "s", "c", "tokens", v, t) for i, v in enumerate(values)]
    applier(migrated_engine, catalogue).apply(as_messages(events))
    [(value, _count)] = stored_totals(migrated_engine).values()
    assert value == Decimal("11000000000000000.000000000000")


def foreign(doc: dict[str, object], offset: int) -> Message:
    return Message("usage", 0, offset, orjson.dumps(doc))


def test_foreign_messages_with_traps_are_dead_lettered_not_miscounted(
    migrated_engine: Engine,
) -> None:
    catalogue = load_catalogue(EXAMPLE_METERS)
    base = {
        "specversion": "1.0",
        "source": "go-service",
        "type": "tokens",
        "subject": "c",
        "time": (NOW - timedelta(minutes=1)).isoformat().replace("+00:00", "z"),
    }
    messages = [
        foreign({**base, "id": "no-value", "data": {"amount": "99"}}, 0),
        foreign({**base, "id": "bool", "data": {"value": True}}, 1),
        foreign({**base, "id": "float", "data": {"value": 1.5}}, 2),
        foreign({**base, "id": "nul", "subject": "c\x00", "data": {"value": "1"}}, 3),
        foreign({**base, "id": "long-type", "type": "m" * 101, "data": {"value": "1"}}, 4),
        foreign({**base, "id": "ok", "data": {"value": 7}}, 5),
    ]
    result = applier(migrated_engine, catalogue).apply(messages)
    assert [r.rejection.detail.split(":")[0] for r in result.rejected] == [
        "data.value",
        "data.value",
        "data.value",
        "customer",
        "type",
    ]
    assert result.applied == 1
    [(value, count)] = stored_totals(migrated_engine).values()
    assert (value, count) == (Decimal(7), 1)


def test_horizon_is_measured_from_when_the_event_was_produced(migrated_engine: Engine) -> None:
    catalogue = load_catalogue(EXAMPLE_METERS)
    old = UsageEvent("old", "s", "c", "tokens", Decimal(1), NOW - timedelta(days=34, hours=1))
    # Accepted by the SDK two hours ago (33 days 23 hours old then), processed only now.
    message = Message("usage", 0, 0, encode_event(old), NOW - timedelta(hours=2))
    assert applier(migrated_engine, catalogue).apply([message]).applied == 1
    # Four minutes ahead of its producer's clock is fine, however late it is processed.
    ahead = UsageEvent("ahead", "s", "c", "tokens", Decimal(1), NOW + timedelta(minutes=3))
    late = Message("usage", 0, 1, encode_event(ahead), NOW - timedelta(minutes=1))
    assert applier(migrated_engine, catalogue).apply([late]).applied == 1


def test_a_message_the_database_refuses_is_isolated_and_the_rest_applied(
    migrated_engine: Engine,
) -> None:
    with migrated_engine.begin() as connection:
        if migrated_engine.dialect.name == "postgresql":
            connection.exec_driver_sql(
                "ALTER TABLE window_totals ADD CONSTRAINT no_poison CHECK (customer_id <> 'poison')"
            )
        else:
            connection.exec_driver_sql(
                "CREATE TRIGGER no_poison BEFORE INSERT ON window_totals "
                "WHEN NEW.customer_id = 'poison' BEGIN SELECT RAISE(ABORT, 'no poison'); END"
            )
    catalogue = load_catalogue(EXAMPLE_METERS)
    t = NOW - timedelta(minutes=1)
    events = [UsageEvent(f"e{i}", "s", f"c{i}", "tokens", Decimal(1), t) for i in range(9)]
    events.insert(4, UsageEvent("bad", "s", "poison", "tokens", Decimal(1), t))
    result = applier(migrated_engine, catalogue).apply(as_messages(events))
    assert result.applied == 9
    [rejected] = result.rejected
    assert (rejected.message.offset, rejected.rejection.reason) == (4, "unstorable")
    assert len(stored_totals(migrated_engine)) == 9


def test_two_messages_at_one_offset_of_a_recreated_topic_are_both_kept(
    migrated_engine: Engine,
) -> None:
    catalogue = load_catalogue(EXAMPLE_METERS)
    target = applier(migrated_engine, catalogue)
    target.apply([Message("usage", 0, 0, b"first garbage")])
    target.apply([Message("usage", 0, 0, b"second garbage")])
    target.apply([Message("usage", 0, 0, b"first garbage")])  # a replay: kept once
    with migrated_engine.connect() as connection:
        raws = connection.execute(select(rejected_events.c.raw)).scalars().all()
    assert sorted(raws) == [b"first garbage", b"second garbage"]
