"""A straightforward reference for window totals, to check the aggregators against.

Deliberately independent of the batch and merge code (aggregation.py, totals.py, postgres.py):
it keeps every event and computes each window from scratch. The tests and ``meterstream demo``
compare the database with it.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from decimal import Decimal

from aggregators.windows import window_bounds
from meterstream.dimensions import combination_key, read_combination
from meterstream.events import UsageEvent
from meterstream.meters import Catalogue, Meter

Totals = dict[tuple[str, str, datetime], tuple[Decimal, int]]
CombinationTotals = dict[tuple[str, str, datetime, str], tuple[Decimal, int]]


def reference_totals(events: list[UsageEvent], catalogue: Catalogue) -> Totals:
    """(customer, meter, window_start) -> (value, events), each (source, id, customer, meter)
    counted once. For meters without dimensions; see :func:`reference_combination_totals`."""
    totals: Totals = {}
    for (customer, meter, start, combination), total in reference_combination_totals(
        events, catalogue
    ).items():
        if combination:
            raise ValueError(f"meter {meter!r} has dimensions: use reference_combination_totals")
        totals[(customer, meter, start)] = total
    return totals


def reference_combination_totals(
    events: list[UsageEvent], catalogue: Catalogue
) -> CombinationTotals:
    """(customer, meter, window_start, combination) -> (value, events), each (source, id,
    customer, meter) counted once, under the combination of its first occurrence."""
    unique: dict[tuple[str, str, str, str], UsageEvent] = {}
    for event in events:
        unique.setdefault((event.source, event.event_id, event.customer_id, event.meter), event)
    groups: dict[tuple[str, str, datetime, str], list[UsageEvent]] = defaultdict(list)
    for event in unique.values():
        meter = catalogue.meters[event.meter]
        start, _end = window_bounds(event.event_time, meter.window)
        combination = combination_key(read_combination(meter, event.properties, event.data))
        groups[(event.customer_id, event.meter, start, combination)].append(event)
    return {
        key: (_value(catalogue.meters[key[1]], group), len(group)) for key, group in groups.items()
    }


def _value(meter: Meter, group: list[UsageEvent]) -> Decimal:
    values = [e.value for e in group]
    if meter.aggregation == "sum":
        return sum(values, Decimal(0))
    if meter.aggregation == "count":
        return Decimal(len(group))
    if meter.aggregation == "max":
        return max(values)
    if meter.aggregation == "min":
        return min(values)
    if meter.aggregation == "last":
        return max(group, key=lambda e: (e.event_time, e.event_id)).value
    prop = meter.unique_property or ""
    return Decimal(len({e.properties[prop] for e in group}))
