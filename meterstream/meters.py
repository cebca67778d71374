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
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
_KEYS = {
    "aggregation",
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
    )


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
