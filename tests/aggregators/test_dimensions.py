"""Totals per customer, window and combination of dimension values, on real PostgreSQL and
SQLite: every aggregation matches the reference with duplicates, late events and disorder; a
missing dimension and a combination over the limit are dead-lettered with their reasons and
counted, never merged; rows written before migration 0012 keep counting."""

from __future__ import annotations

import itertools
import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, Engine, MetaData, Table, insert, select

from aggregators.batch import BatchApplier, Message
from aggregators.reference import CombinationTotals, reference_combination_totals
from meterstream.db import build_engine, migrate
from meterstream.events import UsageEvent, encode_event
from meterstream.meters import Catalogue, parse_catalogue
from meterstream.metrics import AggregatorMetrics
from meterstream.schema import rejected_events, report_queue, window_totals
from meterstream.settings import load_settings

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
MODELS = [f"m{i}" for i in range(4)]
REGIONS = ["eu", "us", 'q"uo,te']


def _meter(aggregation: str, window: str, **more: Any) -> dict[str, Any]:
    return {
        "aggregation": aggregation,
        "window": window,
        "dimensions": ["model", "region"],
        "dimension_defaults": {"region": "global"},
        **more,
    }


CATALOGUE = parse_catalogue(
    {
        "meters": {
            "d_sum": _meter("sum", "1h", value_property="tokens"),
            "d_count": _meter("count", "1h"),
            "d_max": _meter("max", "1d"),
            "d_min": _meter("min", "1d"),
            "d_last": _meter("last", "1h"),
            "d_unique": _meter("unique_count", "1mo", unique_property="user_id"),
            "plain": {"aggregation": "sum", "window": "1h"},
        }
    }
)


def _applier(engine: Engine, catalogue: Catalogue = CATALOGUE, limit: int = 100) -> BatchApplier:
    return BatchApplier(
        engine,
        catalogue,
        AggregatorMetrics(),
        horizon_days=35,
        max_combinations=limit,
        clock=lambda: NOW,
    )


def _stored(engine: Engine) -> CombinationTotals:
    c = window_totals.c
    with engine.connect() as connection:
        rows = connection.execute(
            select(c.customer_id, c.meter, c.window_start, c.combination, c.value, c.events)
        )
        return {
            (r.customer_id, r.meter, r.window_start, r.combination): (r.value, r.events)
            for r in rows
        }


def _random_events(rng: random.Random, count: int) -> list[UsageEvent]:
    meters = sorted(CATALOGUE.meters)
    events = []
    for i in range(count):
        meter = rng.choice(meters)
        properties = {"user_id": f"u{rng.randint(0, 9)}", "model": rng.choice(MODELS)}
        if rng.random() < 0.7:  # the others take the default region
            properties["region"] = rng.choice(REGIONS)
        events.append(
            UsageEvent(
                event_id=f"e{i}",
                source="svc",
                customer_id=rng.choice(["c1", "c2", "c,3"]),
                meter=meter,
                value=Decimal(rng.randint(0, 10**6)) / Decimal(10) ** rng.randint(0, 6),
                event_time=NOW - timedelta(seconds=rng.randint(0, 2 * 86_400)),
                properties=properties,
            )
        )
    return events


def _message(event: UsageEvent, offset: int) -> Message:
    raw = encode_event(event)
    meter = CATALOGUE.meters[event.meter]
    if meter.value_property:  # as an OpenMeter-shaped producer writes it
        doc = orjson.loads(raw)
        doc["data"][meter.value_property] = doc["data"].pop("value")
        raw = orjson.dumps(doc)
    return Message("usage", 0, offset, raw)


def _rejected(engine: Engine) -> list[tuple[int, str]]:
    c = rejected_events.c
    with engine.connect() as connection:
        return [(r.offset, r.reason) for r in connection.execute(select(c.offset, c.reason))]


def test_every_aggregation_per_combination_matches_the_reference(migrated_engine: Engine) -> None:
    rng = random.Random(18)
    events = _random_events(rng, 2_000)
    # Duplicates within and across batches, in disorder; the clock is at NOW, so most windows
    # closed long ago: their events arrive late.
    stream = events + rng.sample(events, 400)
    rng.shuffle(stream)
    target = _applier(migrated_engine)
    applied = duplicates = 0
    for start in range(0, len(stream), 300):
        batch = [_message(e, start + i) for i, e in enumerate(stream[start : start + 300])]
        result = target.apply(batch)
        assert result.rejected == []
        applied, duplicates = applied + result.applied, duplicates + result.duplicates
    assert (applied, duplicates) == (2_000, 400)
    expected = reference_combination_totals(events, CATALOGUE)
    assert _stored(migrated_engine) == expected
    assert any(key[3] == '{"model":"m0","region":"global"}' for key in expected)
    assert {key[3] for key in expected if key[1] == "plain"} == {""}
    with migrated_engine.connect() as connection:
        q = report_queue.c
        queued = {
            (r.customer_id, r.meter, r.window_start, r.combination)
            for r in connection.execute(
                select(q.customer_id, q.meter, q.window_start, q.combination)
            )
        }
    assert queued == set(expected)


def test_a_combination_over_the_limit_is_dead_lettered_and_counted_never_merged(
    migrated_engine: Engine,
) -> None:
    target = _applier(migrated_engine, limit=3)
    base = NOW - timedelta(minutes=30)

    def event(i: int, model: str, customer: str = "c1") -> UsageEvent:
        return UsageEvent(
            f"e{i}", "svc", customer, "d_count", Decimal(1), base, {"model": model, "region": "eu"}
        )

    first = [event(0, "m0"), event(1, "m1"), event(2, "m0")]
    assert target.apply([_message(e, i) for i, e in enumerate(first)]).rejected == []
    # m3 arrives first and takes the last place; m2 and m4 are over the limit, in this window
    # and for this customer only.
    second = [event(3, "m3"), event(4, "m2"), event(5, "m4"), event(6, "m1"), event(7, "m9", "c2")]
    result = target.apply([_message(e, 10 + i) for i, e in enumerate(second)])
    assert sorted(r.message.offset for r in result.rejected) == [11, 12]
    assert {r.rejection.reason for r in result.rejected} == {"too_many_combinations"}
    detail = result.rejected[0].rejection.detail
    assert "METERSTREAM_MAX_COMBINATIONS" in detail and "'c1'" in detail
    assert target.metrics.dead_lettered.labels("too_many_combinations")._value.get() == 2
    assert _rejected(migrated_engine) == [
        (11, "too_many_combinations"),
        (12, "too_many_combinations"),
    ]
    stored = _stored(migrated_engine)
    by_model = {orjson.loads(k[3])["model"]: v for k, v in stored.items() if k[0] == "c1"}
    assert by_model == {
        "m0": (Decimal(2), 2),
        "m1": (Decimal(2), 2),
        "m3": (Decimal(1), 1),
    }
    assert sum(v[1] for k, v in stored.items() if k[0] == "c2") == 1
    # Refused before its key was claimed: with a higher limit, the replay counts it once.
    wider = _applier(migrated_engine, limit=10)
    replayed = wider.apply([_message(second[1], 11), _message(second[1], 20)])
    assert (replayed.applied, replayed.duplicates, replayed.rejected) == (1, 1, [])


def test_a_resent_event_under_another_combination_takes_no_place_from_a_new_one(
    migrated_engine: Engine,
) -> None:
    # A producer resends an event already counted (its key was claimed) with another model: a
    # duplicate, counted nowhere. The free place of its window goes to the next new model.
    target = _applier(migrated_engine, limit=2)
    base = NOW - timedelta(minutes=30)

    def event(i: int, model: str) -> UsageEvent:
        return UsageEvent(f"e{i}", "svc", "c1", "d_count", Decimal(1), base, {"model": model})

    assert target.apply([_message(event(0, "m0"), 0)]).rejected == []
    result = target.apply([_message(event(0, "m1"), 1), _message(event(1, "m2"), 2)])
    assert (result.applied, result.duplicates, result.rejected) == (1, 1, [])
    stored = _stored(migrated_engine)
    assert sorted(orjson.loads(k[3])["model"] for k in stored) == ["m0", "m2"]


def test_the_catalogue_limit_wins_over_the_setting(migrated_engine: Engine) -> None:
    catalogue = parse_catalogue({"meters": {"d_count": _meter("count", "1h", max_combinations=1)}})
    target = _applier(migrated_engine, catalogue, limit=100)
    events = [
        UsageEvent(f"e{i}", "svc", "c1", "d_count", Decimal(1), NOW, {"model": m})
        for i, m in enumerate(["m0", "m1"])
    ]
    result = target.apply([Message("usage", 0, i, encode_event(e)) for i, e in enumerate(events)])
    assert [r.rejection.reason for r in result.rejected] == ["too_many_combinations"]


def test_a_missing_dimension_is_dead_lettered_and_the_rest_applied(migrated_engine: Engine) -> None:
    target = _applier(migrated_engine)
    good = UsageEvent("e0", "svc", "c1", "d_count", Decimal(1), NOW, {"model": "m0"})
    bad = UsageEvent("e1", "svc", "c1", "d_count", Decimal(1), NOW, {"region": "eu"})
    result = target.apply([_message(good, 0), _message(bad, 1)])
    assert result.applied == 1
    assert [(r.message.offset, r.rejection.reason) for r in result.rejected] == [
        (1, "missing_dimension")
    ]
    assert "properties.model" in result.rejected[0].rejection.detail
    assert _rejected(migrated_engine) == [(1, "missing_dimension")]


def test_a_window_stored_before_dimensions_existed_keeps_counting(database_url: str) -> None:
    engine = build_engine(load_settings(database_url=database_url))
    try:
        migrate(engine, "0009")
        start = NOW.replace(minute=0)
        old = {
            "customer_id": "c1",
            "meter": "plain",
            "window_start": start,
            "window_end": start + timedelta(hours=1),
            "value": Decimal(5),
            "events": 1,
            "revision": 1,
            "first_applied_at": NOW,
            "updated_at": NOW,
        }
        with engine.begin() as connection:
            connection.execute(insert(_old_table()), [old])
        migrate(engine)
        event = UsageEvent("e9", "svc", "c1", "plain", Decimal(2), NOW, {})
        result = _applier(engine).apply([_message(event, 0)])
        assert result.applied == 1
        assert _stored(engine) == {("c1", "plain", start, ""): (Decimal(7), 2)}
    finally:
        engine.dispose()


def _old_table() -> Table:
    """window_totals as migration 0009 left it (without the combination columns)."""
    columns = [
        Column(c.name, c.type, primary_key=c.primary_key)
        for c in window_totals.columns
        if not c.name.startswith("combination")
    ]
    return Table("window_totals", MetaData(), *columns)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    stream=st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 5), st.integers(0, 9)), min_size=1, max_size=40
    ),
    cuts=st.lists(st.integers(1, 40), max_size=4),
    limit=st.integers(1, 4),
)
def test_the_first_combinations_in_stream_order_are_kept_however_the_batches_fall(
    migrated_engine: Engine, stream: list[tuple[int, int, int]], cuts: list[int], limit: int
) -> None:
    """(hour, model, event) triples; a fresh customer per example keeps examples apart."""
    customer = f"c-{uuid.uuid4().hex[:8]}"
    events = [
        UsageEvent(
            f"e{i}-{n}",
            "svc",
            customer,
            "d_count",
            Decimal(1),
            NOW - timedelta(hours=hour),
            {"model": f"m{model}"},
        )
        for i, (hour, model, n) in enumerate(stream)
    ]
    target = _applier(migrated_engine, limit=limit)
    bounds = sorted({0, len(events), *(c for c in cuts if c < len(events))})
    refused = []
    for first, end in itertools.pairwise(bounds):
        batch = [_message(e, first + i) for i, e in enumerate(events[first:end])]
        refused += [r.message.offset for r in target.apply(batch).rejected]
    # The reference: per window, the first `limit` distinct models in stream order.
    allowed: dict[int, list[str]] = {}
    expected_refused = []
    for offset, (hour, model, _n) in enumerate(stream):
        models = allowed.setdefault(hour, [])
        if f"m{model}" not in models and len(models) == limit:
            expected_refused.append(offset)
        elif f"m{model}" not in models:
            models.append(f"m{model}")
    assert refused == expected_refused
    kept = [e for i, e in enumerate(events) if i not in set(expected_refused)]
    stored = {k: v for k, v in _stored(migrated_engine).items() if k[0] == customer}
    assert stored == reference_combination_totals(kept, CATALOGUE)
