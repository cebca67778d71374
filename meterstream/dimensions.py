"""Dimensions: which combination of property values an event's total belongs to.

A meter with ``dimensions = ["model", "region"]`` keeps one total per customer, window and
combination. The combination is stored as a canonical key: the JSON object of the values with
sorted keys and no spaces (``{"model":"m1","region":"eu"}``), or ``''`` for a meter without
dimensions, so rows written before dimensions existed keep their meaning. Its 16-byte digest
is what the database's unique keys hold: a fixed size whatever the values' lengths.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from meterstream.errors import InvalidEventError, MissingDimensionError
from meterstream.event_checks import CONTROL_CHARACTERS
from meterstream.meters import MAX_DIMENSION_VALUE_CHARS, Meter

NO_COMBINATION = ""


def read_combination(
    meter: Meter, properties: Mapping[str, str], data: Mapping[str, Any]
) -> dict[str, str]:
    """The meter's dimension values of one event: from ``properties``, else a string or integer
    field of ``data``, else the catalogue's default. Raises InvalidEventError naming the field
    (``properties.<dimension>``) when a value is unfit, MissingDimensionError when one is
    missing."""
    values: dict[str, str] = {}
    for dimension in meter.dimensions:
        value: Any = properties.get(dimension)
        if value is None:
            value = data.get(dimension)
        if value is None:
            value = meter.default_for(dimension)
        if value is None:
            raise MissingDimensionError(
                f"properties.{dimension}",
                f"meter {meter.name!r} keeps totals by {', '.join(meter.dimensions)}; this "
                "dimension is missing (send it as a property, or give the meter a "
                "dimension_defaults value)",
            )
        values[dimension] = _dimension_value(dimension, value)
    return values


def _dimension_value(dimension: str, value: Any) -> str:
    if type(value) is int:  # an OpenMeter-style data field may hold a number (bool is refused)
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > MAX_DIMENSION_VALUE_CHARS:
        raise InvalidEventError(
            f"properties.{dimension}",
            f"a dimension value is a string of 1 to {MAX_DIMENSION_VALUE_CHARS} characters, "
            f"got {value!r:.80}",
        )
    if CONTROL_CHARACTERS.search(value):
        raise InvalidEventError(
            f"properties.{dimension}", f"must not contain control characters, got {value!r:.80}"
        )
    return value


def combination_key(values: Mapping[str, str]) -> str:
    """The canonical key of a combination; ``''`` when there are no dimensions."""
    if not values:
        return NO_COMBINATION
    return orjson.dumps(dict(values), option=orjson.OPT_SORT_KEYS).decode()


def combination_values(key: str) -> dict[str, str]:
    """The values of a combination key (the inverse of :func:`combination_key`)."""
    if key == NO_COMBINATION:
        return {}
    values = orjson.loads(key)
    if not isinstance(values, dict):
        raise ValueError(f"not a combination key: {key!r:.80}")
    return {str(k): str(v) for k, v in values.items()}


def combination_digest(key: str) -> bytes:
    """What the unique keys hold of a combination: 16 bytes of blake2b, or ``b''`` for none
    (the value rows written before dimensions existed have)."""
    if key == NO_COMBINATION:
        return b""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
