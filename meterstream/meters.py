"""The meter catalogue: which meters exist and how each aggregates, windows and reports.

A TOML file with one table per meter::

    [meters.api_calls]
    aggregation = "sum"            # sum | count | max | min | last | unique_count
    window = "1m"                  # tumbling event-time window: 1m, 1h, 1d or 1mo (calendar month)
    stripe_event_name = "api_calls"
    unit_scale = "1"               # Stripe units per unit of value (Stripe takes whole numbers)
    allow_negative = false         # may a value (and so a correction sent to Stripe) be negative?
    grace_s = 60                   # how long after a window ends before it is reported as closed
    unique_property = "user_id"    # unique_count only: the property whose distinct values count
    value_property = "tokens"      # read the value from this field of the event's ``data``
    dimensions = ["model", "region"]          # totals per combination of these values
    dimension_defaults = { region = "global" } # used when an event lacks the dimension
    max_combinations = 100         # distinct combinations per customer and window (else the
                                   # METERSTREAM_MAX_COMBINATIONS default)

A dimension's value is read from the event's ``properties``, else from a string (or integer)
field of its ``data``, else from ``dimension_defaults``; an event with none of these is refused.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, get_args

from meterstream.errors import CatalogueError, ConfigError

Aggregation = Literal["sum", "count", "max", "min", "last", "unique_count"]
Window = Literal["1m", "1h", "1d", "1mo"]
StripeFormula = Literal["sum", "last"]

AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
WINDOWS: tuple[str, ...] = get_args(Window)
# The example catalogue ships inside the package (examples/meters.toml links to it), so the demo
# and readers find it outside a checkout too.
EXAMPLE_CATALOGUE = Path(__file__).resolve().parent / "catalogues" / "example.toml"
# The example with its tokens-by-model meter enabled: what `meterstream demo` runs.
DEMO_CATALOGUE = EXAMPLE_CATALOGUE.with_name("demo.toml")
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
# Stripe refuses events with too many dimensions (meter_event_dimension_count_too_high); each
# dimension also multiplies the rows a window can hold.
MAX_DIMENSIONS = 8
MAX_DIMENSION_NAME_CHARS = 64
MAX_COMBINATIONS_LIMIT = 10_000
# Each value is a Stripe payload value and part of a key stored per window: keep it short.
MAX_DIMENSION_VALUE_CHARS = 200
# Names the event format uses itself: a dimension or value field of that name would be ambiguous.
_RESERVED_FIELDS = frozenset({"value", "properties"})
_FIELD = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_KEYS = {
    "aggregation",
    "value_property",
    "dimensions",
    "dimension_defaults",
    "max_combinations",
    "window",
    "stripe_event_name",
    "unique_property",
    "unit_scale",
    "allow_negative",
    "grace_s",
    "description",
}


@dataclass(frozen=True, slots=True)
class Meter:
    """One meter of the catalogue. ``unit_scale`` converts an exact value to Stripe's units."""

    name: str
    aggregation: Aggregation
    window: Window
    stripe_event_name: str
    unique_property: str | None = None
    unit_scale: Decimal = Decimal(1)
    allow_negative: bool = False
    grace_s: int = 60
    description: str = ""
    value_property: str | None = None
    dimensions: tuple[str, ...] = ()
    # (dimension, value) pairs: a tuple keeps the meter hashable and immutable.
    dimension_defaults: tuple[tuple[str, str], ...] = ()
    # None: the METERSTREAM_MAX_COMBINATIONS default applies.
    max_combinations: int | None = None

    @property
    def value_key(self) -> str:
        """The field of the event's ``data`` that holds the value."""
        return self.value_property or "value"

    def default_for(self, dimension: str) -> str | None:
        """The catalogue's default value of ``dimension``, or None when it has none."""
        for name, value in self.dimension_defaults:
            if name == dimension:
                return value
        return None

    @property
    def stripe_formula(self) -> StripeFormula:
        """Additive aggregations are reported as differences to a Stripe ``sum`` meter; the others
        as the current value to a Stripe ``last`` meter."""
        return "sum" if self.aggregation in ("sum", "count", "unique_count") else "last"


@dataclass(frozen=True, slots=True)
class Catalogue:
    """All meters by name."""

    meters: dict[str, Meter]

    def get(self, name: str) -> Meter | None:
        return self.meters.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.meters

    def __iter__(self) -> Any:
        return iter(self.meters.values())

    def __len__(self) -> int:
        return len(self.meters)


def load_catalogue(path: Path) -> Catalogue:
    """Read and check the catalogue at ``path`` (METERSTREAM_METERS_FILE).

    Raises ConfigError when the file is missing or not TOML, CatalogueError naming the meter, the
    key and the reason when a meter is wrong.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"METERSTREAM_METERS_FILE={path}: cannot read the meter catalogue ({exc.strerror}); "
            f"point it at a TOML file like {EXAMPLE_CATALOGUE}"
        ) from exc
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"METERSTREAM_METERS_FILE={path}: not valid TOML: {exc}") from exc
    return parse_catalogue(document)


def parse_catalogue(document: dict[str, Any]) -> Catalogue:
    """Check a parsed catalogue document; see :func:`load_catalogue`."""
    tables = document.get("meters")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError("meter catalogue: expected at least one [meters.<name>] table")
    meters: dict[str, Meter] = {}
    event_names: dict[str, str] = {}
    for name, table in tables.items():
        meter = _parse_meter(name, table)
        other = event_names.get(meter.stripe_event_name)
        if other is not None:
            raise CatalogueError(
                name,
                "stripe_event_name",
                f"{meter.stripe_event_name!r} is already used by {other!r}",
            )
        event_names[meter.stripe_event_name] = name
        meters[name] = meter
    return Catalogue(meters)


def _parse_meter(name: str, table: Any) -> Meter:
    if not _NAME.match(name):
        raise CatalogueError(name, "name", "use 1 to 100 letters, digits, '_', '.', ':' or '-'")
    if not isinstance(table, dict):
        raise CatalogueError(name, "meters", "expected a table of keys")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise CatalogueError(
            name, unknown[0], f"unknown key; known keys: {', '.join(sorted(_KEYS))}"
        )
    aggregation = _choice(name, table, "aggregation", AGGREGATIONS, None)
    window = _choice(name, table, "window", WINDOWS, None)
    stripe_event_name = _string(name, table, "stripe_event_name", name)
    if len(stripe_event_name) > 100:
        raise CatalogueError(name, "stripe_event_name", "Stripe allows at most 100 characters")
    unique_property = table.get("unique_property")
    if aggregation == "unique_count":
        unique_property = _string(name, table, "unique_property", None)
        # Stripe sums what we send; distinct counts only add up within one billing month.
        if window != "1mo":
            raise CatalogueError(
                name, "window", 'unique_count counts distinct values per month: use window = "1mo"'
            )
    elif unique_property is not None:
        raise CatalogueError(name, "unique_property", "only a unique_count meter takes it")
    return Meter(
        name=name,
        aggregation=aggregation,  # type: ignore[arg-type]  # checked against AGGREGATIONS
        window=window,  # type: ignore[arg-type]  # checked against WINDOWS
        stripe_event_name=stripe_event_name,
        unique_property=unique_property,
        unit_scale=_unit_scale(name, table.get("unit_scale", "1")),
        allow_negative=_boolean(name, table, "allow_negative", False),
        grace_s=_grace(name, table.get("grace_s", 60)),
        description=_string(name, table, "description", ""),
        **_dimension_fields(name, table, unique_property),
    )


def _dimension_fields(name: str, table: dict[str, Any], unique_property: str | None) -> Any:
    """value_property, dimensions, dimension_defaults and max_combinations, checked."""
    value_property = table.get("value_property")
    if value_property is not None:
        _check_field(name, "value_property", value_property)
    raw = table.get("dimensions", [])
    if not isinstance(raw, list) or len(raw) > MAX_DIMENSIONS:
        raise CatalogueError(
            name, "dimensions", f"expected a list of at most {MAX_DIMENSIONS} names, got {raw!r}"
        )
    for dimension in raw:
        _check_field(name, "dimensions", dimension)
    if len(set(raw)) != len(raw):
        raise CatalogueError(name, "dimensions", f"names must not repeat, got {raw!r}")
    if value_property is not None and value_property in raw:
        raise CatalogueError(
            name, "dimensions", f"{value_property!r} is the value_property; it cannot group too"
        )
    if unique_property is not None and unique_property in raw:
        raise CatalogueError(
            name, "dimensions", f"{unique_property!r} is the unique_property; it cannot group too"
        )
    defaults = _dimension_defaults(name, table, raw)
    limit = table.get("max_combinations")
    if limit is not None:
        _check_max_combinations(name, limit, raw)
    return {
        "value_property": value_property,
        "dimensions": tuple(raw),
        "dimension_defaults": tuple(sorted(defaults.items())),
        "max_combinations": limit,
    }


def _dimension_defaults(name: str, table: dict[str, Any], dimensions: list[str]) -> dict[str, str]:
    defaults = table.get("dimension_defaults", {})
    if not isinstance(defaults, dict):
        raise CatalogueError(name, "dimension_defaults", "expected a table of dimension = value")
    for dimension, value in defaults.items():
        if dimension not in dimensions:
            raise CatalogueError(
                name, "dimension_defaults", f"{dimension!r} is not one of dimensions {dimensions!r}"
            )
        if (
            not isinstance(value, str)
            or not 0 < len(value) <= MAX_DIMENSION_VALUE_CHARS
            or not value.isprintable()
        ):
            raise CatalogueError(
                name,
                f"dimension_defaults.{dimension}",
                f"expected a printable string of 1 to {MAX_DIMENSION_VALUE_CHARS} characters, "
                f"got {value!r:.80}",
            )
    return defaults


def _check_max_combinations(name: str, limit: Any, dimensions: list[str]) -> None:
    if (
        isinstance(limit, bool)
        or not isinstance(limit, int)
        or not 1 <= limit <= MAX_COMBINATIONS_LIMIT
    ):
        raise CatalogueError(
            name, "max_combinations", f"expected 1 to {MAX_COMBINATIONS_LIMIT}, got {limit!r}"
        )
    if not dimensions:
        raise CatalogueError(name, "max_combinations", "only a meter with dimensions takes it")


def _check_field(name: str, key: str, field_name: Any) -> None:
    if not isinstance(field_name, str) or not _FIELD.match(field_name):
        raise CatalogueError(
            name,
            key,
            f"a field name is 1 to {MAX_DIMENSION_NAME_CHARS} letters, digits, '_', '.', ':' "
            f"or '-', got {field_name!r:.80}",
        )
    if field_name in _RESERVED_FIELDS:
        raise CatalogueError(name, key, f"{field_name!r} is reserved by the event format")


def _choice(
    name: str, table: dict[str, Any], key: str, allowed: tuple[str, ...], default: str | None
) -> str:
    value = table.get(key, default)
    if value not in allowed:
        shown = "missing" if value is None else f"got {value!r}"
        raise CatalogueError(name, key, f"{shown}; expected one of {', '.join(allowed)}")
    return str(value)


def _string(name: str, table: dict[str, Any], key: str, default: str | None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or (default is None and not value):
        raise CatalogueError(name, key, f"expected a non-empty string, got {value!r}")
    return value


def _boolean(name: str, table: dict[str, Any], key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise CatalogueError(name, key, f"expected true or false, got {value!r}")
    return value


def _unit_scale(name: str, raw: Any) -> Decimal:
    # A float in TOML (0.001) is already inexact; insist on a string or an integer.
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise CatalogueError(name, "unit_scale", f'write it as a string like "1000", got {raw!r}')
    try:
        scale = Decimal(raw)
    except InvalidOperation:
        raise CatalogueError(name, "unit_scale", f"not a decimal number: {raw!r}") from None
    if not scale.is_finite() or scale <= 0:
        raise CatalogueError(name, "unit_scale", f"must be a positive number, got {raw!r}")
    return scale


def _grace(name: str, raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 86_400 * 7:
        raise CatalogueError(
            name, "grace_s", f"expected whole seconds from 0 to 604800, got {raw!r}"
        )
    return raw
