"""GET /v1/usage of meters with dimensions, on a running ``meterstream serve`` (PostgreSQL and
SQLite): without ``group_by`` one exact total over all combinations (or a 400 where none is
exact), with ``group_by`` one series per group; and, with hypothesis, group sums that add up to
the ungrouped sum for sum and count meters."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from aggregators.batch import BatchApplier, Message
from aggregators.usage_query import query_usage
from meterstream.api_keys import create_key
from meterstream.db import build_engine, migrate
from meterstream.errors import InvalidQueryError
from meterstream.events import UsageEvent, encode_event
from meterstream.meters import Catalogue, load_catalogue
from meterstream.metrics import AggregatorMetrics
from meterstream.settings import Settings
from tests.aggregators.serving import served

SettingsFactory = Callable[..., Settings]

_METERS = """
[meters.g_sum]
aggregation = "sum"
window = "1h"
stripe_event_name = "g_sum"
dimensions = ["model", "region"]

[meters.g_count]
aggregation = "count"
window = "1h"
stripe_event_name = "g_count"
dimensions = ["model", "region"]

[meters.g_max]
aggregation = "max"
window = "1h"
stripe_event_name = "g_max"
dimensions = ["model", "region"]

[meters.g_last]
aggregation = "last"
window = "1h"
stripe_event_name = "g_last"
dimensions = ["model", "region"]

[meters.g_unique]
aggregation = "unique_count"
window = "1mo"
unique_property = "user_id"
stripe_event_name = "g_unique"
dimensions = ["model"]
"""


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _apply(engine: Engine, catalogue: Catalogue, events: list[UsageEvent]) -> None:
    applier = BatchApplier(engine, catalogue, AggregatorMetrics(), horizon_days=35)
    messages = [Message("usage", 0, i, encode_event(e)) for i, e in enumerate(events)]
    assert applier.apply(messages).rejected == []


@pytest.fixture
def catalogue_file(tmp_path: Path) -> Path:
    path = tmp_path / "meters.toml"
    path.write_text(_METERS)
    return path


def _event(
    event_id: str, meter: str, value: int | str, at: datetime, model: str, region: str, **more: str
) -> UsageEvent:
    properties = {"model": model, "region": region, **more}
    if meter == "g_unique":
        properties.pop("region")
    return UsageEvent(event_id, "svc", "c1", meter, Decimal(value), at, properties)


def test_usage_of_meters_with_dimensions_over_http(
    settings_factory: SettingsFactory, database_url: str, catalogue_file: Path, tmp_path: Path
) -> None:
    settings = settings_factory(database_url=database_url, meters_file=catalogue_file)
    catalogue = load_catalogue(catalogue_file)
    engine = build_engine(settings)
    migrate(engine)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    month = hour.replace(day=1, hour=0)
    late = hour + timedelta(minutes=50)
    events = []
    # Three combinations in the first hour, one in the second; per meter, the newest event
    # (for last) is m2/us in the first hour, and the largest value m1/eu.
    for meter in ("g_sum", "g_count", "g_max", "g_last"):
        events += [
            _event(f"{meter}-1", meter, 40, hour, "m1", "eu"),
            _event(f"{meter}-2", meter, "2.5", hour + timedelta(minutes=1), "m1", "us"),
            _event(f"{meter}-3", meter, 7, late, "m2", "us"),
            _event(f"{meter}-4", meter, 1, hour + timedelta(hours=1), "m1", "eu"),
        ]
    events += [
        _event("u1", "g_unique", 1, hour, "m1", "", user_id="ann"),
        _event("u2", "g_unique", 1, hour, "m2", "", user_id="ann"),
        _event("u3", "g_unique", 1, hour, "m2", "", user_id="bob"),
    ]
    _apply(engine, catalogue, events)
    key = create_key(engine, "k-read", "svc", "read")[1]
    engine.dispose()
    two_hours = {"customer": "c1", "from": _iso(hour), "to": _iso(hour + timedelta(hours=2))}

    with served(settings, tmp_path / "serve.log") as base:

        def get(**params: str) -> requests.Response:
            return requests.get(
                f"{base}/v1/usage",
                params=params,
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )

        def values(meter: str, **more: str) -> list[tuple[str, int]]:
            answer = get(meter=meter, **two_hours, **more)
            assert answer.status_code == 200, answer.text
            assert "groups" not in answer.json()
            return [(w["value"], w["events"]) for w in answer.json()["windows"]]

        # Without group_by: one window per hour, the exact total over its combinations.
        assert values("g_sum") == [("49.5", 3), ("1", 1)]
        assert values("g_count") == [("3", 3), ("1", 1)]
        assert values("g_max") == [("40", 3), ("1", 1)]
        assert values("g_last") == [("7", 3), ("1", 1)]
        assert values("g_sum", window="total") == [("50.5", 4)]
        assert values("g_max", window="total") == [("40", 4)]
        assert values("g_last", window="total") == [("1", 4)]
        # With group_by: one series per group, with its dimension values.
        by_model = get(meter="g_sum", **two_hours, group_by="model").json()
        assert "windows" not in by_model and by_model["group_by"] == ["model"]
        assert [
            (g["dimensions"], [(w["start"], w["value"]) for w in g["windows"]])
            for g in by_model["groups"]
        ] == [
            ({"model": "m1"}, [(_iso(hour), "42.5"), (_iso(hour + timedelta(hours=1)), "1")]),
            ({"model": "m2"}, [(_iso(hour), "7")]),
        ]
        both = get(meter="g_last", **two_hours, group_by="region, model", window="total").json()
        assert [(g["dimensions"], g["windows"][0]["value"]) for g in both["groups"]] == [
            ({"region": "eu", "model": "m1"}, "1"),
            ({"region": "us", "model": "m1"}, "2.5"),
            ({"region": "us", "model": "m2"}, "7"),
        ]
        # A distinct count over its only dimension; never added across models (ann is in two).
        month_range = {"customer": "c1", "from": _iso(month), "to": _iso(_next_month(month))}
        unique = get(meter="g_unique", **month_range, group_by="model").json()
        assert [(g["dimensions"], g["windows"][0]["value"]) for g in unique["groups"]] == [
            ({"model": "m1"}, "1"),
            ({"model": "m2"}, "2"),
        ]
        # The OpenAPI document (made from the code) describes the parameter and the groups.
        document = requests.get(f"{base}/openapi.json", timeout=30).json()
        parameters = document["paths"]["/v1/usage"]["get"]["parameters"]
        assert "group_by" in {p["name"] for p in parameters}
        assert "groups" in document["components"]["schemas"]["UsageAnswer"]["properties"]
        # Refusals: 400 naming group_by.
        for meter, group_by in (
            ("g_unique", None),
            ("g_sum", "tier"),
            ("g_sum", "model,model"),
            ("g_sum", "model,"),
            ("g_sum", ""),
        ):
            params = month_range if meter == "g_unique" else two_hours
            extra = {} if group_by is None else {"group_by": group_by}
            refused = get(meter=meter, **params, **extra)
            assert refused.status_code == 400, (meter, group_by, refused.text)
            assert refused.json()["error"].startswith("group_by: ")


def _next_month(month: datetime) -> datetime:
    return (month + timedelta(days=32)).replace(day=1)


_COMBINATIONS = st.tuples(st.sampled_from(["m1", "m2", "m3"]), st.sampled_from(["eu", "us"]))


@pytest.fixture
def applied_engine(
    migrated_engine: Engine, catalogue_file: Path
) -> Iterator[tuple[Engine, Catalogue]]:
    yield migrated_engine, load_catalogue(catalogue_file)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            _COMBINATIONS,
            st.integers(0, 5),  # the hour
            st.decimals(min_value=0, max_value=10**9, places=6, allow_nan=False),
        ),
        max_size=30,
    ),
    st.sampled_from([["model"], ["region"], ["region", "model"]]),
    st.sampled_from(["own", "1d", "total"]),
)
def test_groups_add_up_to_the_ungrouped_total(
    applied_engine: tuple[Engine, Catalogue],
    drawn: list[tuple[tuple[str, str], int, Decimal]],
    group_by: list[str],
    window: Any,
) -> None:
    engine, catalogue = applied_engine
    now = datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    customer = f"h-{uuid.uuid4().hex[:12]}"  # a fresh customer per example
    events = [
        UsageEvent(
            f"{customer}-{meter}-{i}",
            "svc",
            customer,
            meter,
            value,
            day + timedelta(hours=at),
            {"model": model, "region": region},
        )
        for i, ((model, region), at, value) in enumerate(drawn)
        for meter in ("g_sum", "g_count")
    ]
    if events:
        _apply(engine, catalogue, events)
    for meter in ("g_sum", "g_count"):
        query = {
            "customer": customer,
            "meter": meter,
            "start": day,
            "end": day + timedelta(days=1),
            "window": window,
            "now": now,
            "retention_days": 35,
        }
        whole = query_usage(engine, catalogue, **query)
        grouped = query_usage(engine, catalogue, **query, group_by=group_by)
        added: dict[datetime, tuple[Decimal, int]] = {}
        for group in grouped.groups:
            assert set(group.dimensions) == set(group_by)
            for w in group.windows:
                value, count = added.get(w.start, (Decimal(0), 0))
                added[w.start] = (value + w.value, count + w.events)
        assert added == {w.start: (w.value, w.events) for w in whole.windows}
        assert sum(w.events for w in whole.windows) == len(drawn)


def test_a_query_reading_more_stored_totals_than_its_limit_is_refused(
    applied_engine: tuple[Engine, Catalogue],
) -> None:
    engine, catalogue = applied_engine
    now = datetime.now(UTC)
    hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    _apply(
        engine,
        catalogue,
        [
            _event(f"r{i}", "g_sum", 1, hour, model, "eu")
            for i, model in enumerate(("m1", "m2", "m3"))
        ],
    )
    query: dict[str, Any] = {
        "customer": "c1",
        "meter": "g_sum",
        "start": hour,
        "end": hour + timedelta(hours=1),
        "window": "total",
        "now": now,
        "retention_days": 35,
    }
    # One window, three combinations: three stored rows.
    assert [w.value for w in query_usage(engine, catalogue, **query, max_rows=3).windows] == [3]
    with pytest.raises(InvalidQueryError) as refused:
        query_usage(engine, catalogue, **query, max_rows=2)
    assert refused.value.parameter == "to" and "more than 2 stored totals" in refused.value.reason
