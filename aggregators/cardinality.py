"""The cardinality limit: how many dimension combinations one customer's window may hold.

A dimension fed an unbounded value (a request id where a model name belongs) would otherwise
make a row per event, and a Stripe meter event per row. Each meter allows ``max_combinations``
(METERSTREAM_MAX_COMBINATIONS by default) per customer and window; an event of a further one
is refused with the reason ``too_many_combinations`` (dead-lettered and counted), never merged
into another combination. The combinations already stored always take more events.

The check asks, per window a batch touches, how many combinations it stores and which of the
batch's it has already (lookups on the key): an answer the size of the batch, whatever the
history. Two workers sharing a
window during a rebalance may each admit the last free place: the limit can be passed by the
combinations of one concurrent batch, never by a stream of them.

An event already counted (a re-send, a replay) takes no place, even under another
combination: :func:`claim_within_the_limit` checks the limit again without the duplicates
its claim found, so a new combination refused for their sake is counted after all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Connection, select, tuple_

from aggregators import postgres
from aggregators.intake import Accepted, Rejection
from aggregators.windows import window_bounds
from meterstream.events import UsageEvent
from meterstream.meters import Catalogue
from meterstream.schema import window_totals

M = TypeVar("M")
_Window = tuple[str, str, datetime]
# Bound the size of one IN (...) list of window keys.
_CHUNK = 1000


def claim_within_the_limit(
    connection: Connection,
    admitted: Sequence[tuple[M, Accepted]],
    catalogue: Catalogue,
    default_limit: int,
    claim: Callable[[Connection, Sequence[UsageEvent]], list[UsageEvent]],
) -> tuple[list[Accepted], list[UsageEvent], list[tuple[M, Rejection]]]:
    """(the events within their window's limit, those of them ``claim`` found new, in order;
    the refusals). Refused events are not claimed: counted when replayed with a higher limit.

    A duplicate among the admitted held a place before the claim told it apart: while one did
    and an event was refused, the limit is checked again without the duplicates (removing
    events only frees places, so every event admitted stays admitted). Each round removes a
    duplicate: a batch without any costs no second round."""
    accepted, refused = over_the_limit(connection, admitted, catalogue, default_limit)
    fresh = claim(connection, [a.event for a in accepted])
    claimed = {id(a.event) for a in accepted}
    while refused:
        duplicates = claimed - {id(event) for event in fresh}
        remaining = [(m, a) for m, a in admitted if id(a.event) not in duplicates]
        if len(remaining) == len(admitted):
            break
        admitted = remaining
        again, refused = over_the_limit(connection, admitted, catalogue, default_limit)
        newly = [a for a in again if id(a.event) not in claimed]
        if not newly:
            break
        claimed.update(id(a.event) for a in newly)
        accepted += newly
        fresh += claim(connection, [a.event for a in newly])
    return accepted, fresh, refused


def over_the_limit(
    connection: Connection,
    admitted: Sequence[tuple[M, Accepted]],
    catalogue: Catalogue,
    default_limit: int,
) -> tuple[list[Accepted], list[tuple[M, Rejection]]]:
    """Split ``admitted`` into the events within their window's limit and the refusals, in
    order. Within a batch, new combinations take the free places in arrival order."""
    pairs = {
        (*_window(accepted), accepted.combination): None
        for _, accepted in admitted
        if accepted.meter.dimensions
    }
    if not pairs:
        return [accepted for _, accepted in admitted], []
    counts, stored = _stored_combinations(connection, list(pairs))
    # Per window: the combinations known to be in it (stored, or admitted by this batch).
    known: dict[_Window, set[str]] = {}
    kept: list[Accepted] = []
    refused: list[tuple[M, Rejection]] = []
    for message, accepted in admitted:
        meter = accepted.meter
        if not meter.dimensions:
            kept.append(accepted)
            continue
        window = _window(accepted)
        combinations = known.setdefault(window, set())
        present = accepted.combination in combinations or (*window, accepted.combination) in stored
        if not present and counts.get(window, 0) < (meter.max_combinations or default_limit):
            counts[window] = counts.get(window, 0) + 1  # a new combination takes a place
            present = True
        if present:
            combinations.add(accepted.combination)
            kept.append(accepted)
            continue
        event = accepted.event
        refused.append(
            (
                message,
                Rejection(
                    "too_many_combinations",
                    f"meter {meter.name!r} holds {counts.get(window, 0)} combinations of "
                    f"{', '.join(meter.dimensions)} for customer {event.customer_id!r} in the "
                    f"window starting {window[2].isoformat()}, its limit (max_combinations in "
                    f"the catalogue, else METERSTREAM_MAX_COMBINATIONS); this event's "
                    f"{accepted.combination} is not one of them. Check the producer sends "
                    "bounded values, or raise the limit and replay the dead letters",
                    event.event_id,
                    event.customer_id,
                    event.meter,
                ),
            )
        )
    return kept, refused


def _window(accepted: Accepted) -> _Window:
    event = accepted.event
    start, _end = window_bounds(event.event_time, accepted.meter.window)
    return (event.customer_id, event.meter, start)


def _stored_combinations(
    connection: Connection, pairs: list[tuple[str, str, datetime, str]]
) -> tuple[dict[_Window, int], set[tuple[str, str, datetime, str]]]:
    """(stored combinations per window, the pairs already stored)."""
    if connection.dialect.name == "postgresql":
        return postgres.stored_combinations(connection, pairs)
    windows = list({pair[:3]: None for pair in pairs})
    counts: dict[_Window, int] = {}
    stored: set[tuple[str, str, datetime, str]] = set()
    c = window_totals.c
    key = tuple_(c.customer_id, c.meter, c.window_start)
    for first in range(0, len(windows), _CHUNK):
        query = select(c.customer_id, c.meter, c.window_start, c.combination).where(
            key.in_(windows[first : first + _CHUNK])
        )
        for row in connection.execute(query):
            window = (row.customer_id, row.meter, row.window_start)
            counts[window] = counts.get(window, 0) + 1
            stored.add((*window, row.combination))
    return counts, stored
