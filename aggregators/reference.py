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
from meterstream.events import UsageEvent
from meterstream.meters import Catalogue

Totals = dict[tuple[str, str, datetime], tuple[Decimal, int]]


def reference_totals(events: list[UsageEvent], catalogue: Catalogue) -> Totals:
    """(customer, meter, window_start) -> (value, events), each (source, id, customer, meter)
    counted once."""
    unique: dict[tuple[str, str, str, str], UsageEvent] = {}
    for event in events:
        unique.setdefault((event.source, event.event_id, event.customer_id, event.meter), event)
    groups: dict[tuple[str, str, datetime], list[UsageEvent]] = defaultdict(list)
    for event in unique.values():
        meter = catalogue.meters[event.meter]
        start, _end = window_bounds(event.event_time, meter.window)
        groups[(event.customer_id, event.meter, start)].append(event)
    totals: Totals = {}
    for key, group in groups.items():
        meter = catalogue.meters[key[1]]
        values = [e.value for e in group]
        if meter.aggregation == "sum":
            value = sum(values, Decimal(0))
        elif meter.aggregation == "count":
            value = Decimal(len(group))
        elif meter.aggregation == "max":
            value = max(values)
        elif meter.aggregation == "min":
            value = min(values)
        elif meter.aggregation == "last":
            value = max(group, key=lambda e: (e.event_time, e.event_id)).value
        else:
            prop = meter.unique_property or ""
            value = Decimal(len({e.properties[prop] for e in group}))
        totals[key] = (value, len(group))
    return totals
