"""PostgreSQL's fast path: each step of a batch is one statement over arrays (``unnest``).

The generic statements (one parameter per value, thousands per batch) cost more in building
and parsing SQL than in the database itself. These do the same work with a handful of array
parameters, so a batch is four round trips whatever its size. Each array travels as one text
literal that the server parses: psycopg adapting a list element by element cost about 3 us per
timestamp or bytea (profiled), more than everything else in a batch. The tests check both paths
against one reference.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection

from aggregators.aggregation import WindowKey
from meterstream.dimensions import combination_digest

_CLAIM = """
WITH input AS (
    SELECT event_day, decode(key, 'hex') AS key
    FROM unnest(%(days)s::date[], %(keys)s::text[]) AS t(event_day, key)
), elsewhere AS (
    -- a re-send re-stamped onto the neighbouring UTC day is the same event
    SELECT s.key FROM seen_events s
    JOIN input i ON s.key = i.key AND s.event_day IN (i.event_day - 1, i.event_day + 1)
)
INSERT INTO seen_events (event_day, key)
SELECT event_day, key FROM input WHERE key NOT IN (SELECT key FROM elsewhere)
ON CONFLICT DO NOTHING
RETURNING event_day, key
"""

# The merge of aggregation.merge(), in SQL, so one statement creates or updates each window:
# ON CONFLICT DO UPDATE locks the row and sees its latest committed version, so workers that
# share a window during a rebalance serialise on it. "proposed" is what the batch alone gives
# the window (its sum, count, new distinct values, max, min or newest value). Event ids compare
# in code-point order (COLLATE "C"), as Python compares them.
# updated_at moves only when the value changes, to this batch's time (strictly later than the
# last batch's), which tells RETURNING which windows changed. Each changed window is queued
# for the reporter (report_queue, see reporters/due.py) by the same statement, so in the same
# transaction, in key order like the windows themselves. Key order is Python's (code points,
# COLLATE "C"), as settle (reporters/due.py) and queue_combinations lock them: the database's
# own collation (en_US in the postgres image) orders "a_1" before "a1", and they deadlock.
_UPSERT = """
WITH upserted AS (
INSERT INTO window_totals AS w (customer_id, meter, window_start, combination,
                                combination_digest, window_end, value, events, revision,
                                last_event_time, last_event_id, first_applied_at, updated_at)
SELECT c, m, s, k, decode(d, 'hex'), e, proposed, n, 1, lt, lid, %(now)s, %(now)s
FROM unnest(%(c)s::text[], %(m)s::text[], %(s)s::timestamptz[], %(k)s::text[], %(d)s::text[],
            %(e)s::timestamptz[], %(proposed)s::numeric[], %(n)s::bigint[],
            %(lt)s::timestamptz[], %(lid)s::text[])
     AS u(c, m, s, k, d, e, proposed, n, lt, lid)
ORDER BY c COLLATE "C", m COLLATE "C", s, decode(d, 'hex')
ON CONFLICT (customer_id, meter, window_start, combination_digest) DO UPDATE SET
    value = {merged},
    revision = w.revision + CASE WHEN {merged} <> w.value THEN 1 ELSE 0 END,
    events = w.events + excluded.events,
    last_event_time = CASE WHEN {newer} THEN excluded.last_event_time ELSE w.last_event_time END,
    last_event_id = CASE WHEN {newer} THEN excluded.last_event_id ELSE w.last_event_id END,
    updated_at = CASE WHEN {merged} <> w.value THEN excluded.updated_at ELSE w.updated_at END
RETURNING customer_id, meter, window_start, combination, combination_digest, value, revision,
          updated_at = %(now)s AS changed
), queued AS (
    INSERT INTO report_queue (customer_id, meter, window_start, combination, combination_digest,
                              revision)
    SELECT customer_id, meter, window_start, combination, combination_digest, revision
    FROM upserted WHERE changed
    ORDER BY customer_id COLLATE "C", meter COLLATE "C", window_start, combination_digest
    ON CONFLICT (customer_id, meter, window_start, combination_digest)
    DO UPDATE SET revision = excluded.revision
)
SELECT customer_id, meter, window_start, combination, value, revision, changed FROM upserted
"""
_NEWER = (
    '(w.last_event_time IS NULL OR (excluded.last_event_time, excluded.last_event_id COLLATE "C") '
    '> (w.last_event_time, w.last_event_id COLLATE "C"))'
)
_MERGED = f"""(CASE
    WHEN w.meter = ANY(%(additive)s::text[]) THEN w.value + excluded.value
    WHEN w.meter = ANY(%(maximum)s::text[]) THEN GREATEST(w.value, excluded.value)
    WHEN w.meter = ANY(%(minimum)s::text[]) THEN LEAST(w.value, excluded.value)
    WHEN {_NEWER} THEN excluded.value
    ELSE w.value END)"""
_UPSERT = _UPSERT.format(merged=_MERGED, newer=_NEWER)

_DISTINCT = """
INSERT INTO unique_values (customer_id, meter, window_start, combination, combination_digest,
                           value_digest)
SELECT c, m, s, k, decode(d, 'hex'), decode(v, 'hex')
FROM unnest(%(c)s::text[], %(m)s::text[], %(s)s::timestamptz[], %(k)s::text[], %(d)s::text[],
            %(v)s::text[]) AS t(c, m, s, k, d, v)
ON CONFLICT DO NOTHING
RETURNING customer_id, meter, window_start, combination
"""


# Per window of the batch: how many combinations it stores (NULL k), and which of the batch's
# combinations it stores already (NULL n). Both are index lookups on the key, and the answer is
# the batch's size, not every stored combination of its windows.
_COMBINATIONS = """
WITH b AS (
    SELECT c, m, s, k, decode(d, 'hex') AS d
    FROM unnest(%(c)s::text[], %(m)s::text[], %(s)s::timestamptz[], %(k)s::text[],
                %(d)s::text[]) AS b(c, m, s, k, d)
), windows AS (SELECT DISTINCT c, m, s FROM b)
SELECT w.c, w.m, w.s, NULL::text AS k,
       (SELECT count(*) FROM window_totals t
        WHERE t.customer_id = w.c AND t.meter = w.m AND t.window_start = w.s) AS n
FROM windows w
UNION ALL
SELECT b.c, b.m, b.s, b.k, NULL
FROM b JOIN window_totals t ON t.customer_id = b.c AND t.meter = b.m AND t.window_start = b.s
                           AND t.combination_digest = b.d
"""


def stored_combinations(
    connection: Connection, pairs: Sequence[WindowKey]
) -> tuple[dict[tuple[str, str, datetime], int], set[WindowKey]]:
    """For the (customer, meter, window start, combination) ``pairs`` of a batch: how many
    combinations each window stores, and which of the pairs are stored already."""
    result = connection.exec_driver_sql(_COMBINATIONS, {**_columns(list(pairs))})
    counts: dict[tuple[str, str, datetime], int] = {}
    stored: set[WindowKey] = set()
    for c, m, s, k, n in result:
        if k is None:
            counts[(c, m, s.astimezone(UTC))] = int(n)
        else:
            stored.add((c, m, s.astimezone(UTC), k))
    return counts, stored


def claim_keys(connection: Connection, rows: list[tuple[date, bytes]]) -> set[tuple[date, bytes]]:
    """Insert the keys not seen on their day or the days around it; return those inserted."""
    result = connection.exec_driver_sql(
        _CLAIM,
        {
            "days": _plain_array(day.isoformat() for day, _ in rows),
            "keys": _plain_array(key.hex() for _, key in rows),
        },
    )
    return {(row[0], bytes(row[1])) for row in result}


def upsert_totals(
    connection: Connection,
    rows: Sequence[tuple[WindowKey, datetime, Decimal, int, datetime, str]],
    meters_by_kind: dict[str, list[str]],
    now: datetime,
) -> list[tuple[WindowKey, Decimal, int]]:
    """Create or merge each window: rows of (key, window end, proposed value, events, newest
    event time, newest event id). Returns (key, value, revision) of the windows whose value
    changed (or that were created)."""
    keys = [row[0] for row in rows]
    result = connection.exec_driver_sql(
        _UPSERT,
        {
            **_columns(keys),
            "e": _plain_array(row[1].isoformat() for row in rows),
            "proposed": _plain_array(format(row[2], "f") for row in rows),
            "n": _plain_array(str(row[3]) for row in rows),
            "lt": _plain_array(row[4].isoformat() for row in rows),
            "lid": _array(row[5] for row in rows),
            "additive": _array(meters_by_kind["additive"]),
            "maximum": _array(meters_by_kind["max"]),
            "minimum": _array(meters_by_kind["min"]),
            "now": now,
        },
    )
    return [
        ((row[0], row[1], row[2].astimezone(UTC), row[3]), Decimal(row[4]), row[5])
        for row in result
        if row[6]
    ]


def insert_distinct(connection: Connection, rows: list[tuple[WindowKey, bytes]]) -> list[WindowKey]:
    """Insert unique_count value digests; return the window of each one not seen before."""
    result = connection.exec_driver_sql(
        _DISTINCT,
        {**_columns([key for key, _ in rows]), "v": _plain_array(v.hex() for _, v in rows)},
    )
    return [(row[0], row[1], row[2].astimezone(UTC), row[3]) for row in result]


def _columns(keys: list[WindowKey]) -> dict[str, Any]:
    return {
        "c": _array(k[0] for k in keys),
        "m": _array(k[1] for k in keys),
        "s": _plain_array(k[2].isoformat() for k in keys),
        "k": _array(k[3] for k in keys),
        # An empty digest (no dimensions) is an empty string: quoted, as a plain array cannot.
        "d": _array(combination_digest(k[3]).hex() for k in keys),
    }


def _array(items: Iterable[str | None]) -> str:
    """A PostgreSQL array literal of text: every element quoted, NULL for None."""
    return "{" + ",".join(_element(item) for item in items) + "}"


def _plain_array(items: Iterable[str]) -> str:
    """An array literal of elements that never need quoting: digits, hex, ISO dates and times
    (no comma, brace, quote, backslash or white space, and never the word NULL)."""
    return "{" + ",".join(items) + "}"


def _element(item: str | None) -> str:
    if item is None:
        return "NULL"
    return '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
