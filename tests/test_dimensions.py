"""Dimensions in the catalogue, the SDK's rule and admission: a missing or unfit dimension is
refused with the field named; an event shaped by another system (OpenMeter) is read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregators.intake import Accepted, Clock, Rejection, admit
from meterstream.dimensions import (
    combination_digest,
    combination_key,
    combination_values,
    read_combination,
)
from meterstream.errors import CatalogueError, InvalidEventError, MissingDimensionError
from meterstream.meters import Catalogue, parse_catalogue

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
CLOCK = Clock(NOW, 600.0, 35)


def _catalogue(**tokens: Any) -> Catalogue:
    table = {
        "aggregation": "sum",
        "window": "1h",
        "value_property": "tokens",
        "dimensions": ["model", "region"],
        "dimension_defaults": {"region": "global"},
        "max_combinations": 20,
    }
    table.update(tokens)
    return parse_catalogue(
        {"meters": {"llm": table, "calls": {"aggregation": "count", "window": "1m"}}}
    )


def _event(data: dict[str, Any], **fields: Any) -> bytes:
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": "e1",
        "source": "openmeter",
        "type": "llm",
        "subject": "c1",
        "time": (NOW - timedelta(minutes=5)).isoformat(),
        "data": data,
    }
    doc.update(fields)
    return orjson.dumps(doc)


def test_the_catalogue_reads_dimensions_defaults_value_property_and_limit() -> None:
    meter = _catalogue().meters["llm"]
    assert meter.dimensions == ("model", "region")
    assert meter.default_for("region") == "global"
    assert meter.default_for("model") is None
    assert meter.value_key == "tokens"
    assert meter.max_combinations == 20
    plain = _catalogue().meters["calls"]
    assert (plain.dimensions, plain.value_key, plain.max_combinations) == ((), "value", None)


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        ({"dimensions": "model"}, "dimensions", "expected a list"),
        ({"dimensions": ["model", "model"]}, "dimensions", "must not repeat"),
        ({"dimensions": ["value"]}, "dimensions", "reserved"),
        ({"dimensions": ["a b"]}, "dimensions", "a field name is"),
        ({"dimensions": [f"d{i}" for i in range(9)]}, "dimensions", "at most 8"),
        ({"dimensions": ["tokens"]}, "dimensions", "is the value_property"),
        ({"value_property": "properties"}, "value_property", "reserved"),
        ({"dimension_defaults": {"tier": "x"}}, "dimension_defaults", "not one of dimensions"),
        ({"dimension_defaults": {"region": ""}}, "dimension_defaults.region", "printable"),
        ({"dimension_defaults": {"region": "a\x00"}}, "dimension_defaults.region", "printable"),
        ({"max_combinations": 0}, "max_combinations", "expected 1 to 10000"),
        ({"max_combinations": True}, "max_combinations", "expected 1 to 10000"),
        (
            {"dimensions": [], "dimension_defaults": {}, "max_combinations": 5},
            "max_combinations",
            "only a meter with dimensions",
        ),
    ],
)
def test_a_wrong_dimension_setting_names_the_meter_and_key(
    change: dict[str, Any], key: str, reason: str
) -> None:
    with pytest.raises(CatalogueError) as caught:
        _catalogue(**change)
    assert (caught.value.meter, caught.value.key) == ("llm", key)
    assert reason in caught.value.reason


def test_an_openmeter_shaped_event_is_read_from_its_data_fields() -> None:
    raw = _event({"tokens": 1520, "model": "m1", "region": "eu"})
    outcome = admit(raw, _catalogue(), clock=CLOCK, produced=None)
    assert isinstance(outcome, Accepted)
    assert outcome.event.value == 1520
    assert outcome.combination == '{"model":"m1","region":"eu"}'


def test_properties_win_over_data_fields_and_defaults_fill_the_gaps() -> None:
    raw = _event({"tokens": "7", "model": "m1", "properties": {"model": "m2"}})
    outcome = admit(raw, _catalogue(), clock=CLOCK, produced=None)
    assert isinstance(outcome, Accepted)
    assert combination_values(outcome.combination) == {"model": "m2", "region": "global"}


@pytest.mark.parametrize(
    ("data", "reason", "field"),
    [
        ({"tokens": 3}, "missing_dimension", "properties.model"),
        ({"tokens": 3, "model": None}, "missing_dimension", "properties.model"),
        ({"tokens": 3, "model": ""}, "invalid_event", "properties.model"),
        ({"tokens": 3, "model": True}, "invalid_event", "properties.model"),
        ({"tokens": 3, "model": 1.5}, "invalid_event", "properties.model"),
        ({"tokens": 3, "model": "x" * 201}, "invalid_event", "properties.model"),
        ({"tokens": 3, "model": ["m1"]}, "invalid_event", "properties.model"),
        ({"value": "3", "model": "m1"}, "unparseable", "data.tokens"),
        ({"tokens": 2.5, "model": "m1"}, "unparseable", "data.tokens"),
    ],
)
def test_a_missing_or_unfit_dimension_is_dead_lettered_with_its_reason(
    data: dict[str, Any], reason: str, field: str
) -> None:
    outcome = admit(_event(data), _catalogue(), clock=CLOCK, produced=None)
    assert isinstance(outcome, Rejection)
    assert outcome.reason == reason
    assert field in outcome.detail
    assert (outcome.event_id, outcome.meter) == (
        ("e1", "llm") if reason != "unparseable" else (None, None)
    )


def test_a_meter_without_dimensions_keeps_the_empty_combination() -> None:
    raw = _event({"value": "1", "model": "m1"}, type="calls")
    outcome = admit(raw, _catalogue(), clock=CLOCK, produced=None)
    assert isinstance(outcome, Accepted)
    assert outcome.combination == ""
    assert combination_digest("") == b""


def test_the_missing_dimension_error_names_the_field() -> None:
    meter = _catalogue().meters["llm"]
    with pytest.raises(MissingDimensionError) as caught:
        read_combination(meter, {"region": "eu"}, {})
    assert caught.value.field == "properties.model"
    assert "dimension_defaults" in caught.value.reason


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=220)
_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    _TEXT,
    st.lists(st.integers(0, 9), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(
    properties=st.dictionaries(st.sampled_from(["model", "region", "x"]), _TEXT, max_size=3),
    data=st.dictionaries(st.sampled_from(["model", "region", "tokens"]), _ANY, max_size=3),
)
def test_reading_a_combination_yields_a_canonical_key_or_names_the_field(
    properties: dict[str, str], data: dict[str, Any]
) -> None:
    meter = _catalogue().meters["llm"]
    try:
        values = read_combination(meter, properties, data)
    except InvalidEventError as exc:
        assert exc.field in ("properties.model", "properties.region")
        return
    assert list(values) == ["model", "region"]
    key = combination_key(values)
    assert combination_values(key) == values
    assert len(combination_digest(key)) == 16
    # The same values in another order give the same key.
    assert combination_key(dict(reversed(list(values.items())))) == key


@settings(max_examples=300, deadline=None)
@given(data=st.dictionaries(_TEXT, _ANY, max_size=5), meter=st.sampled_from(["llm", "calls", 3]))
def test_admission_never_raises_on_any_data_object(data: dict[str, Any], meter: Any) -> None:
    outcome = admit(_event(data, type=meter), _catalogue(), clock=CLOCK, produced=None)
    assert isinstance(outcome, Accepted | Rejection)
    if isinstance(outcome, Accepted) and outcome.meter.dimensions:
        assert set(combination_values(outcome.combination)) == {"model", "region"}
