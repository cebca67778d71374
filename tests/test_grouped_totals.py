"""Totals grouped by some of a meter's dimensions, read back exactly (the function the usage
API calls, and ``meterstream totals --group-by``), against a reference computed from the events
themselves; unique_count refuses to be merged across combinations."""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine

from aggregators.windows import window_bounds
from meterstream.errors import InvalidQueryError
from meterstream.events import UsageEvent
from meterstream.grouped_totals import grouped_totals
from tests.aggregators.test_dimensions import (
    CATALOGUE,
    NOW,
    _applier,
    _message,
    _random_events,
)
from tests.cli.commands import meterstream


def _expected(events: list[UsageEvent], meter: str) -> dict[tuple[str, object, str], Decimal]:
    """(customer, window_start, model) -> total, from the distinct events directly."""
    aggregation = CATALOGUE.meters[meter].aggregation
    groups: dict[tuple[str, object, str], list[UsageEvent]] = defaultdict(list)
    for event in {(e.source, e.event_id): e for e in reversed(events)}.values():
        if event.meter == meter:
            start, _end = window_bounds(event.event_time, CATALOGUE.meters[meter].window)
            groups[(event.customer_id, start, event.properties["model"])].append(event)
    result = {}
    for key, group in groups.items():
        values = [e.value for e in group]
        result[key] = {
            "sum": sum(values, Decimal(0)),
            "count": Decimal(len(values)),
            "max": max(values),
            "min": min(values),
            "last": max(group, key=lambda e: (e.event_time, e.event_id)).value,
        }[aggregation]
    return result


@pytest.fixture
def applied(migrated_engine: Engine) -> list[UsageEvent]:
    rng = random.Random(4)
    events = _random_events(rng, 600)
    stream = events + rng.sample(events, 100)
    rng.shuffle(stream)
    target = _applier(migrated_engine)
    for start in range(0, len(stream), 500):
        target.apply([_message(e, start + i) for i, e in enumerate(stream[start : start + 500])])
    return events


@pytest.mark.parametrize("meter", ["d_sum", "d_count", "d_max", "d_min", "d_last"])
def test_grouping_by_one_dimension_merges_combinations_exactly(
    migrated_engine: Engine, applied: list[UsageEvent], meter: str
) -> None:
    with migrated_engine.connect() as connection:
        rows = grouped_totals(
            connection, CATALOGUE.meters[meter], since=None, until=None, group_by=["model"]
        )
    found = {(r.customer_id, r.window_start, r.group["model"]): r.value for r in rows}
    assert found == _expected(applied, meter)


def test_a_bounded_read_for_one_customer_returns_only_its_windows(
    migrated_engine: Engine, applied: list[UsageEvent]
) -> None:
    since = NOW.replace(minute=0) - (NOW - NOW.replace(hour=0, minute=0))
    with migrated_engine.connect() as connection:
        rows = grouped_totals(
            connection,
            CATALOGUE.meters["d_sum"],
            since=since,
            until=NOW,
            group_by=["region", "model"],
            customer_id="c,3",
        )
    assert rows
    assert all(r.customer_id == "c,3" and since <= r.window_start < NOW for r in rows)
    assert all(list(r.group) == ["region", "model"] for r in rows)


@pytest.mark.parametrize(
    ("meter", "group_by", "parameter", "says"),
    [
        ("d_sum", ["tier"], "group_by", "has no dimension 'tier'"),
        ("d_sum", ["model", "model"], "group_by", "twice"),
        ("d_unique", ["model"], "group_by", "group by all of them"),
        ("plain", ["model"], "group_by", "its dimensions: none"),
    ],
)
def test_a_question_the_totals_cannot_answer_exactly_is_refused(
    migrated_engine: Engine, meter: str, group_by: list[str], parameter: str, says: str
) -> None:
    with migrated_engine.connect() as connection, pytest.raises(InvalidQueryError) as caught:
        grouped_totals(
            connection, CATALOGUE.meters[meter], since=None, until=None, group_by=group_by
        )
    assert caught.value.parameter == parameter
    assert says in caught.value.reason


def test_the_totals_command_groups_by_model(
    migrated_engine: Engine, applied: list[UsageEvent], database_url: str, tmp_path: Path
) -> None:
    catalogue = tmp_path / "meters.toml"
    catalogue.write_text(
        '[meters.d_sum]\naggregation = "sum"\nwindow = "1h"\nvalue_property = "tokens"\n'
        'dimensions = ["model", "region"]\ndimension_defaults = { region = "global" }\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    env |= {"METERSTREAM_DATABASE_URL": database_url, "METERSTREAM_METERS_FILE": str(catalogue)}
    done = meterstream(env, "totals", "--meter", "d_sum", "--group-by", "model", "--json")
    assert done.returncode == 0, done.stderr
    found = {
        (r["customer"], r["window_start"], r["dimensions"]["model"]): Decimal(r["value"])
        for r in json.loads(done.stdout)
    }
    expected = {
        (c, s.isoformat().replace("+00:00", "Z"), m): v  # type: ignore[attr-defined]
        for (c, s, m), v in _expected(applied, "d_sum").items()
    }
    assert found == expected
    refused = meterstream(env, "totals", "--meter", "d_sum", "--group-by", "tier")
    assert refused.returncode == 2
    assert "group_by: meter 'd_sum' has no dimension 'tier'" in refused.stderr


def test_sums_of_wide_totals_are_merged_without_rounding(migrated_engine: Engine) -> None:
    # Two combinations of about 6e15 with 12 decimals each: their sum has 29 digits, one more
    # than Decimal's default context keeps.
    value = Decimal("999999999999999.999999999999")
    at = NOW - timedelta(hours=1)
    events = [
        UsageEvent(
            f"w{region}{i}", "svc", "wide", "d_sum", value, at, {"model": "m", "region": region}
        )
        for region in ("eu", "us")
        for i in range(6)
    ]
    _applier(migrated_engine).apply([_message(e, i) for i, e in enumerate(events)])
    with migrated_engine.connect() as connection:
        rows = grouped_totals(
            connection,
            CATALOGUE.meters["d_sum"],
            since=None,
            until=None,
            group_by=["model"],
            customer_id="wide",
        )
    # 12 times the value, written out (multiplying in the default context would round too).
    assert [r.value for r in rows] == [Decimal("11999999999999999.999999999988")]
