"""The six aggregations as pure arithmetic on exact decimals.

A batch of new (already deduplicated) events is folded into one :class:`Partial` per window; a
partial is then merged into the stored total. Keeping this free of I/O lets the tests check it
against a plain reference, and keeps the database work to a few bulk statements per batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from meterstream.meters import Aggregation

WindowKey = tuple[str, str, datetime, str]
"""(customer_id, meter, window_start, combination): the combination is the canonical key of the
dimension values (meterstream.dimensions), '' for a meter without dimensions."""


def unique_digest(value: str) -> bytes:
    """The 16 bytes a unique_count keeps of a distinct value: a fixed size, so a long value
    never exceeds an index key's limit (PostgreSQL's btree takes about 2,700 bytes)."""
    return hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass(slots=True)
class Partial:
    """What one batch adds to one window; built from its first event, then :meth:`add`."""

    window_end: datetime
    total: Decimal
    maximum: Decimal
    minimum: Decimal
    # The newest event by (event time, event id): the id breaks ties, so arrival order never
    # changes the result.
    last_time: datetime
    last_id: str
    last_value: Decimal
    events: int = 1
    distinct: set[bytes] = field(default_factory=set)

    @classmethod
    def first(
        cls,
        window_end: datetime,
        value: Decimal,
        event_time: datetime,
        event_id: str,
        unique: bytes | None,
    ) -> Partial:
        partial = cls(window_end, value, value, value, event_time, event_id, value)
        if unique is not None:
            partial.distinct.add(unique)
        return partial

    def add(
        self, value: Decimal, event_time: datetime, event_id: str, unique: bytes | None
    ) -> None:
        self.events += 1
        self.total += value
        self.maximum = max(self.maximum, value)
        self.minimum = min(self.minimum, value)
        if (event_time, event_id) > (self.last_time, self.last_id):
            self.last_time, self.last_id, self.last_value = event_time, event_id, value
        if unique is not None:
            self.distinct.add(unique)


@dataclass(frozen=True, slots=True)
class Stored:
    """A window total as stored: the part of a row that merging reads and writes.

    ``revision`` 0 marks a window with no events applied yet.
    """

    value: Decimal
    events: int
    revision: int
    last_event_time: datetime | None = None
    last_event_id: str | None = None


EMPTY = Stored(Decimal(0), 0, 0)


def merge(aggregation: Aggregation, stored: Stored, partial: Partial, new_distinct: int) -> Stored:
    """The stored total after ``partial`` is applied.

    ``new_distinct`` is, for unique_count, how many of the partial's distinct values the window had
    not seen before (the database knows; the partial alone cannot). The revision grows when the
    value changes; a new window starts at revision 1.
    """
    newer = (
        stored.last_event_time is None
        or stored.last_event_id is None
        or (partial.last_time, partial.last_id) > (stored.last_event_time, stored.last_event_id)
    )
    last_time, last_id = (
        (partial.last_time, partial.last_id)
        if newer
        else (stored.last_event_time, stored.last_event_id)
    )
    value = _combine(aggregation, stored, partial, new_distinct, newer)
    changed = stored.revision == 0 or value != stored.value
    revision = stored.revision + 1 if changed else stored.revision
    return Stored(value, stored.events + partial.events, revision, last_time, last_id)


def _combine(
    aggregation: Aggregation, stored: Stored, partial: Partial, new_distinct: int, newer: bool
) -> Decimal:
    fresh = stored.revision == 0
    if aggregation == "sum":
        return stored.value + partial.total
    if aggregation == "count":
        return stored.value + partial.events
    if aggregation == "unique_count":
        return stored.value + new_distinct
    if aggregation == "max":
        return partial.maximum if fresh else max(stored.value, partial.maximum)
    if aggregation == "min":
        return partial.minimum if fresh else min(stored.value, partial.minimum)
    return partial.last_value if fresh or newer else stored.value
