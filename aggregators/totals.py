"""Window totals in the database: apply one batch's partials in a few bulk statements.

Every window whose revision changes is queued for the reporter (``report_queue``) in the same
transaction: the reporter reads what changed instead of comparing all history.

Rows are created (as empty placeholders) and then locked in key order before they are read, so
two workers touching the same window during a rebalance serialise instead of losing an update.
SQLite takes its write lock at BEGIN (see meterstream.db), which serialises writers the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import Connection, bindparam, case, select, tuple_, update

from aggregators import postgres
from aggregators.aggregation import EMPTY, Partial, Stored, WindowKey, merge
from aggregators.sql import insert_ignoring_conflicts
from meterstream.dimensions import combination_digest
from meterstream.meters import Catalogue
from meterstream.report_queue import queue_combinations
from meterstream.schema import unique_values, window_totals

# Bound the size of one IN (...) list of row keys.
_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class ChangedWindow:
    key: WindowKey
    value: Decimal
    revision: int


def apply_partials(
    connection: Connection,
    partials: Mapping[WindowKey, Partial],
    catalogue: Catalogue,
    now: datetime,
) -> list[ChangedWindow]:
    """Merge ``partials`` into ``window_totals``; return the windows whose row changed."""
    if not partials:
        return []
    keys = sorted(partials)
    new_distinct = _record_distinct_values(connection, partials, catalogue)
    if connection.dialect.name == "postgresql":
        return _upsert_on_postgres(connection, keys, partials, new_distinct, catalogue, now)
    stored = _create_lock_and_read(connection, keys, partials, now)
    merged: dict[WindowKey, Stored] = {}
    changed = []
    for key in keys:
        meter = catalogue.meters[key[1]]
        before = stored.get(key, EMPTY)
        after = merge(meter.aggregation, before, partials[key], new_distinct[key])
        merged[key] = after
        if after.revision != before.revision:
            changed.append(ChangedWindow(key, after.value, after.revision))
    _write_totals(connection, merged, now)
    # In this transaction, so the reporter learns of every change it commits (reporters/due.py).
    queue_combinations(connection, ((*c.key, c.revision) for c in changed))
    return changed


def _upsert_on_postgres(
    connection: Connection,
    keys: list[WindowKey],
    partials: Mapping[WindowKey, Partial],
    new_distinct: Counter[WindowKey],
    catalogue: Catalogue,
    now: datetime,
) -> list[ChangedWindow]:
    rows = []
    for key in keys:
        partial = partials[key]
        aggregation = catalogue.meters[key[1]].aggregation
        # What the batch alone gives this window (aggregation.merge on an empty window).
        proposed = merge(aggregation, EMPTY, partial, new_distinct[key]).value
        rows.append(
            (key, partial.window_end, proposed, partial.events, partial.last_time, partial.last_id)
        )
    kinds: dict[str, list[str]] = {"additive": [], "max": [], "min": []}
    for meter in catalogue:
        if meter.aggregation in ("sum", "count", "unique_count"):
            kinds["additive"].append(meter.name)
        elif meter.aggregation in ("max", "min"):
            kinds[meter.aggregation].append(meter.name)
    changed = postgres.upsert_totals(connection, rows, kinds, now)
    return [ChangedWindow(key, value, revision) for key, value, revision in changed]


def _create_lock_and_read(
    connection: Connection,
    keys: list[WindowKey],
    partials: Mapping[WindowKey, Partial],
    now: datetime,
) -> dict[WindowKey, Stored]:
    connection.execute(
        insert_ignoring_conflicts(connection, window_totals),
        [
            {
                "customer_id": key[0],
                "meter": key[1],
                "window_start": key[2],
                "combination": key[3],
                "combination_digest": combination_digest(key[3]),
                "window_end": partials[key].window_end,
                "value": Decimal(0),
                "events": 0,
                "revision": 0,
                "first_applied_at": now,
                "updated_at": now,
            }
            for key in keys
        ],
    )
    return _lock_and_read(connection, keys)


def _write_totals(connection: Connection, totals: dict[WindowKey, Stored], now: datetime) -> None:
    connection.execute(
        update(window_totals)
        .where(
            window_totals.c.customer_id == bindparam("k_customer"),
            window_totals.c.meter == bindparam("k_meter"),
            window_totals.c.window_start == bindparam("k_start"),
            window_totals.c.combination_digest == bindparam("k_digest"),
        )
        .values(
            value=bindparam("value"),
            events=bindparam("events"),
            revision=bindparam("revision"),
            last_event_time=bindparam("last_event_time"),
            last_event_id=bindparam("last_event_id"),
            updated_at=case(
                (window_totals.c.revision != bindparam("revision"), bindparam("updated_at")),
                else_=window_totals.c.updated_at,
            ),
        ),
        [
            {
                "k_customer": key[0],
                "k_meter": key[1],
                "k_start": key[2],
                "k_digest": combination_digest(key[3]),
                "value": after.value,
                "events": after.events,
                "revision": after.revision,
                "last_event_time": after.last_event_time,
                "last_event_id": after.last_event_id,
                "updated_at": now,
            }
            for key, after in totals.items()
        ],
    )


def _lock_and_read(connection: Connection, keys: list[WindowKey]) -> dict[WindowKey, Stored]:
    columns = window_totals.c
    pk = tuple_(
        columns.customer_id, columns.meter, columns.window_start, columns.combination_digest
    )
    digests = [(*key[:3], combination_digest(key[3])) for key in keys]
    stored: dict[WindowKey, Stored] = {}
    for start in range(0, len(keys), _CHUNK):
        query = (
            select(
                columns.customer_id,
                columns.meter,
                columns.window_start,
                columns.combination,
                columns.value,
                columns.events,
                columns.revision,
                columns.last_event_time,
                columns.last_event_id,
            )
            .where(pk.in_(digests[start : start + _CHUNK]))
            .order_by(*pk.clauses)
        )
        if connection.dialect.name == "postgresql":
            query = query.with_for_update()
        for row in connection.execute(query):
            stored[(row.customer_id, row.meter, row.window_start, row.combination)] = Stored(
                row.value, row.events, row.revision, row.last_event_time, row.last_event_id
            )
    return stored


def _record_distinct_values(
    connection: Connection, partials: Mapping[WindowKey, Partial], catalogue: Catalogue
) -> Counter[WindowKey]:
    """Insert unique_count value digests; count, per window, the ones it had not seen before."""
    rows = [
        (key, value)
        for key, partial in partials.items()
        if catalogue.meters[key[1]].aggregation == "unique_count"
        for value in sorted(partial.distinct)
    ]
    fresh: Counter[WindowKey] = Counter()
    if not rows:
        return fresh
    if connection.dialect.name == "postgresql":
        fresh.update(postgres.insert_distinct(connection, rows))
        return fresh
    statement = insert_ignoring_conflicts(connection, unique_values).returning(
        unique_values.c.customer_id, unique_values.c.meter, unique_values.c.window_start
    )
    statement = statement.returning(unique_values.c.combination)
    parameters = [
        {
            "customer_id": key[0],
            "meter": key[1],
            "window_start": key[2],
            "combination": key[3],
            "combination_digest": combination_digest(key[3]),
            "value_digest": value,
        }
        for key, value in rows
    ]
    for row in connection.execute(statement, parameters):
        fresh[(row.customer_id, row.meter, row.window_start, row.combination)] += 1
    return fresh
