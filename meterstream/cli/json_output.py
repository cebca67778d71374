"""``--json``: what a command prints for scripts, one JSON document.

Exact values stay exact: a ``Decimal`` is a string (``"12.500"``, never a float, never exponent
notation); times are ISO-8601 in UTC with ``Z``; integers, counts and seconds stay numbers.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from meterstream.events import format_value


def utc_text(moment: datetime) -> str:
    """``moment`` as ISO-8601 UTC with ``Z``; a naive time (SQLite gives those back) is UTC."""
    aware = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.isoformat().replace("+00:00", "Z")


def _convert(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format_value(value)
    if isinstance(value, datetime):
        return utc_text(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} has no JSON form: {value!r}")


def json_document(value: Any) -> str:
    """One JSON document for ``value`` (dicts, lists, tuples, dataclasses, str, int, float, bool,
    None, Decimal, datetime); dict keys that are not strings (partition numbers) become strings."""
    # The standard library, not orjson: orjson refuses integers beyond 64 bits, and a count of
    # Stripe units has no such bound.
    return json.dumps(
        value, default=_convert, sort_keys=True, separators=(",", ":"), allow_nan=False
    )
