"""The usage query on real PostgreSQL and SQLite, over windows the real batch apply wrote."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from aggregators.batch import BatchApplier, Message
from aggregators.usage_query import MAX_WINDOWS, Usage, query_usage
from meterstream.errors import InvalidQueryError
from meterstream.events import UsageEvent, encode_event
from meterstream.meters import load_catalogue
from meterstream.metrics import AggregatorMetrics
from tests.conftest import EXAMPLE_METERS

CATALOGUE = load_catalogue(EXAMPLE_METERS)
NOW = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)
HOUR = datetime(2026, 11, 10, 9, 0, tzinfo=UTC)
DAY = datetime(2026, 11, 10, tzinfo=UTC)
OCTOBER = datetime(2026, 10, 1, tzinfo=UTC)
NOVEMBER = datetime(2026, 11, 1, tzinfo=UTC)
DECEMBER = datetime(2026, 12, 1, tzinfo=UTC)


def _apply(engine: Engine, events: list[tuple[str, str, Any, datetime, dict[str, str]]]) -> None:
    applier = BatchApplier(
        engine, CATALOGUE, AggregatorMetrics(), horizon_days=35, clock=lambda: NOW
    )
    messages = [
        Message(
            "usage",
            0,
            offset,
            encode_event(UsageEvent(f"e{offset}", "svc", customer, meter, value, at, props)),
        )
        for offset, (customer, meter, value, at, props) in enumerate(events)
    ]
    assert applier.apply(messages).rejected == []


def _query(engine: Engine, meter: str, start: datetime, end: datetime, window: Any) -> Usage:
    return query_usage(
        engine,
        CATALOGUE,
        customer="c1",
        meter=meter,
        start=start,
        end=end,
        window=window,
        now=NOW,
        retention_days=60,
    )


def _values(usage: Usage) -> list[tuple[datetime, datetime, Decimal, int]]:
    return [(w.start, w.end, w.value, w.events) for w in usage.windows]


def test_sums_and_counts_roll_up_exactly(migrated_engine: Engine) -> None:
    big = Decimal("999999999999999.999999999999")  # the most digits an event may carry
    minute = timedelta(minutes=1)
    _apply(
        migrated_engine,
        [
            ("c1", "tokens", big, HOUR + minute, {}),
            ("c1", "tokens", big, HOUR + 2 * minute, {}),
            ("c1", "tokens", Decimal("0.000000000001"), HOUR + timedelta(hours=1), {}),
            ("c2", "tokens", Decimal(5), HOUR, {}),  # another customer: never counted here
            ("c1", "api_calls", 1, HOUR + minute, {}),
            ("c1", "api_calls", 1, HOUR + minute + timedelta(seconds=5), {}),
            ("c1", "api_calls", 1, HOUR + 3 * minute, {}),
        ],
    )
    hours = _query(migrated_engine, "tokens", DAY, DAY + timedelta(days=1), "own")
    assert hours.window == "1h"
    assert _values(hours) == [
        (HOUR, HOUR + timedelta(hours=1), 2 * big, 2),
        (HOUR + timedelta(hours=1), HOUR + timedelta(hours=2), Decimal("0.000000000001"), 1),
    ]
    assert [w.revision for w in hours.windows] == [1, 1]
    [total] = _query(migrated_engine, "tokens", DAY, DAY + timedelta(days=1), "total").windows
    assert total.value == Decimal("1999999999999999.999999999999")
    assert (total.start, total.end, total.events, total.revision) == (
        DAY,
        DAY + timedelta(days=1),
        3,
        2,
    )
    minutes = _query(migrated_engine, "api_calls", HOUR, HOUR + timedelta(hours=1), "own")
    assert [(w.start, w.value) for w in minutes.windows] == [
        (HOUR + minute, Decimal(2)),
        (HOUR + 3 * minute, Decimal(1)),
    ]
    rolled = _query(migrated_engine, "api_calls", DAY, DAY + timedelta(days=1), "1h")
    assert _values(rolled) == [(HOUR, HOUR + timedelta(hours=1), Decimal(3), 3)]
    # Nothing stored in the range: no windows, not an error.
    assert _query(migrated_engine, "tokens", NOVEMBER, DAY, "1d").windows == []


def test_max_min_and_last_roll_up_by_their_own_rule(migrated_engine: Engine) -> None:
    october = datetime(2026, 10, 20, tzinfo=UTC)
    november = datetime(2026, 11, 3, tzinfo=UTC)
    _apply(
        migrated_engine,
        [
            ("c1", "peak_connections", 40, october, {}),
            ("c1", "peak_connections", 25, november, {}),
            ("c1", "min_replicas", 2, october, {}),
            ("c1", "min_replicas", 3, november, {}),
            # seats (last, 1d): the latest event of the range wins, not the largest value.
            ("c1", "seats", 9, november, {}),
            ("c1", "seats", 4, november + timedelta(days=2), {}),
            ("c1", "seats", 7, november + timedelta(days=1), {}),
        ],
    )

    def total(meter: str, start: datetime, end: datetime) -> Decimal:
        [window] = _query(migrated_engine, meter, start, end, "total").windows
        return window.value

    assert total("peak_connections", OCTOBER, DECEMBER) == 40
    assert total("min_replicas", OCTOBER, DECEMBER) == 2
    assert total("seats", NOVEMBER, DAY) == 4
    per_month = _query(migrated_engine, "peak_connections", OCTOBER, DECEMBER, "own")
    assert [w.value for w in per_month.windows] == [40, 25]


def test_unique_counts_of_several_months_are_refused_not_added(migrated_engine: Engine) -> None:
    _apply(
        migrated_engine,
        [
            ("c1", "active_users", 1, datetime(2026, 10, 20, tzinfo=UTC), {"user_id": "u1"}),
            ("c1", "active_users", 1, datetime(2026, 11, 2, tzinfo=UTC), {"user_id": "u1"}),
            ("c1", "active_users", 1, datetime(2026, 11, 3, tzinfo=UTC), {"user_id": "u2"}),
        ],
    )
    with pytest.raises(InvalidQueryError, match="cannot be added") as refused:
        _query(migrated_engine, "active_users", OCTOBER, DECEMBER, "total")
    assert refused.value.parameter == "window"
    [november] = _query(migrated_engine, "active_users", NOVEMBER, DECEMBER, "total").windows
    assert november.value == 2
    months = _query(migrated_engine, "active_users", OCTOBER, DECEMBER, "own")
    assert [w.value for w in months.windows] == [1, 2]


@pytest.mark.parametrize(
    ("meter", "start", "end", "window", "parameter"),
    [
        ("gpu_seconds", DAY, DAY + timedelta(days=1), "own", "meter"),
        ("tokens", DAY, DAY, "own", "to"),
        ("tokens", DAY + timedelta(minutes=30), DAY + timedelta(days=1), "own", "from"),
        ("api_calls", DAY, DAY + timedelta(minutes=90), "1h", "to"),
        ("peak_connections", NOVEMBER, DAY, "total", "to"),
        ("peak_connections", NOVEMBER, DECEMBER, "1d", "window"),
        ("seats", NOVEMBER, DECEMBER, "1h", "window"),
        ("api_calls", DAY - timedelta(minutes=MAX_WINDOWS + 60), DAY, "own", "to"),
        ("tokens", DAY - timedelta(days=61), DAY, "1d", "from"),
        ("tokens", DAY.replace(tzinfo=None), DAY + timedelta(days=1), "own", "from"),
    ],
)
def test_questions_without_an_exact_answer_are_refused_naming_the_parameter(
    migrated_engine: Engine,
    meter: str,
    start: datetime,
    end: datetime,
    window: Any,
    parameter: str,
) -> None:
    with pytest.raises(InvalidQueryError) as refused:
        _query(migrated_engine, meter, start, end, window)
    assert refused.value.parameter == parameter


_TIMES = st.one_of(
    # Off the boundaries around the stored usage, and anywhere a datetime can be.
    st.integers(-24 * 70 * 60, 24 * 40 * 60).map(lambda m: DAY + timedelta(minutes=m)),
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=14))])),
    st.datetimes(),  # naive
)


_MONTHS = [datetime(2026, m, 1, tzinfo=UTC) for m in (9, 10, 11, 12)]


@st.composite
def _aligned(draw: st.DrawFn, meter: str, window: str) -> tuple[datetime, datetime]:
    """A range on the boundaries of ``window`` (or of the meter's own), near the usage."""
    found = CATALOGUE.get(meter)
    unit = window if window in ("1h", "1d") else (found.window if found else "1h")
    if unit == "1mo":
        first = draw(st.integers(0, len(_MONTHS) - 2))
        return _MONTHS[first], _MONTHS[draw(st.integers(first + 1, len(_MONTHS) - 1))]
    size = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}[unit]
    start = DAY - draw(st.integers(0, 20)) * timedelta(days=1)
    return start, start + draw(st.integers(1, 24 * 60 if unit == "1m" else 24 * 20)) * size


@st.composite
def _questions(draw: st.DrawFn) -> tuple[str, datetime, datetime, str]:
    meter = draw(st.sampled_from([*sorted(CATALOGUE.meters), "nope", ""]))
    window = draw(st.sampled_from(["own", "1h", "1d", "total"]))
    if draw(st.integers(0, 3)) == 0:  # anything at all
        start, end = draw(_TIMES), draw(_TIMES)
    else:
        start, end = draw(_aligned(meter, window))
    return meter, start, end, window


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(question=_questions())
def test_any_question_gets_an_exact_answer_or_a_named_refusal(
    usage_engine: Engine, question: tuple[str, datetime, datetime, Any]
) -> None:
    meter, start, end, window = question
    try:
        asked = _query(usage_engine, meter, start, end, window)
    except InvalidQueryError as exc:
        assert exc.parameter in ("meter", "from", "to", "window", "customer")
        return
    own = _query(usage_engine, meter, start, end, "own")
    # A rolled-up answer holds exactly the stored windows' events; sums and counts agree.
    assert sum(w.events for w in asked.windows) == sum(w.events for w in own.windows)
    assert all(start <= w.start < w.end <= end for w in asked.windows)
    if asked.meter.aggregation in ("sum", "count"):
        assert sum(w.value for w in asked.windows) == sum(w.value for w in own.windows)


@pytest.fixture
def usage_engine(migrated_engine: Engine) -> Engine:
    """Usage of every meter over about two weeks, across a month's end."""
    meters = sorted(CATALOGUE.meters) * 6
    _apply(
        migrated_engine,
        [
            (
                "c1",
                meter,
                Decimal(i) / 8,
                NOW - timedelta(hours=7 * i + 1),
                {"user_id": f"u{i % 3}"},
            )
            for i, meter in enumerate(meters)
        ],
    )
    return migrated_engine


_DIMENSIONED = """
[meters.d_sum]
aggregation = "sum"
window = "1h"
dimensions = ["model"]

[meters.d_max]
aggregation = "max"
window = "1h"
dimensions = ["model"]

[meters.d_unique]
aggregation = "unique_count"
window = "1mo"
unique_property = "user_id"
dimensions = ["model"]
"""


def test_a_meter_with_dimensions_answers_its_combinations_combined(
    migrated_engine: Engine, tmp_path: Path
) -> None:
    # A row per combination in each window: the meter's own windows listed each combination's
    # row as a window of its own (two answers for one hour), and unique_count added distinct
    # counts of combinations (one user seen with two models counted twice).
    meters = tmp_path / "meters.toml"
    meters.write_text(_DIMENSIONED)
    catalogue = load_catalogue(meters)
    applier = BatchApplier(
        migrated_engine, catalogue, AggregatorMetrics(), horizon_days=35, clock=lambda: NOW
    )
    events = [
        ("d_sum", Decimal("1.5"), {"model": "a"}),
        ("d_sum", Decimal("2.25"), {"model": "b"}),
        ("d_max", Decimal(7), {"model": "a"}),
        ("d_max", Decimal(9), {"model": "b"}),
        ("d_unique", 1, {"model": "a", "user_id": "u1"}),
        ("d_unique", 1, {"model": "b", "user_id": "u1"}),
    ]
    messages = [
        Message(
            "usage",
            0,
            offset,
            encode_event(UsageEvent(f"d{offset}", "svc", "c1", meter, value, HOUR, props)),
        )
        for offset, (meter, value, props) in enumerate(events)
    ]
    assert applier.apply(messages).rejected == []

    def query(meter: str, start: datetime, end: datetime, window: Any) -> Usage:
        return query_usage(
            migrated_engine,
            catalogue,
            customer="c1",
            meter=meter,
            start=start,
            end=end,
            window=window,
            now=NOW,
            retention_days=60,
        )

    hour = (HOUR, HOUR + timedelta(hours=1))
    for window in ("own", "1h", "total"):
        start, end = hour
        assert _values(query("d_sum", start, end, window)) == [(*hour, Decimal("3.75"), 2)]
        assert _values(query("d_max", start, end, window)) == [(*hour, Decimal(9), 2)]
    # Without group_by, distinct counts of several combinations cannot be added.
    with pytest.raises(InvalidQueryError, match="group_by"):
        query("d_unique", NOVEMBER, DECEMBER, "own")
