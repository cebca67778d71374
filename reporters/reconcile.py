"""Compare the database, the ledger and what Stripe counted (meter event summaries).

One line per (Stripe customer, meter): Stripe's summaries are per Stripe customer, and several
application customers may be linked to one. Three quantities:

- **Stripe**: the meter event summary over [since, end), minute-aligned (Stripe's rule), where
  ``end`` is ``settle_minutes`` ago: Stripe counts asynchronously, so newer events may not be
  in its summaries yet.
- **ledger**: what Stripe acknowledged (sent, or accepted by the v2 stream) with a timestamp in
  [since, end): a sum meter adds the values; a ``last`` meter takes the newest.
- **database**: a sum meter's floor(exact total of every window x unit_scale), over all time
  (the carry makes units global; windows pruned by retention count through the ledger's running
  total), against the units acknowledged; a ``last`` meter's newest
  window's current value, against the newest ledger row. Each difference is listed with its
  reason: held (unlinked customer, negative correction, revision went back), rejected, unknown,
  or in flight (pending or due, normal until the next cycle).

A line drifts when Stripe differs from the ledger, or when usage in the database is held,
rejected or unknown. (customer, meter) pairs with database rows but no Stripe customer are
listed as such.

While a restore holds sending (reporters/restore.py) nothing is settled or confirmed: the
ledger may lack rows Stripe holds. Otherwise, before comparing, :func:`settle_rows`
(reporters/settle.py) decides ``unknown`` rows (resend
window expired) from their minute's summary, and a line whose Stripe value matches the ledger
confirms its ``accepted`` rows (v2 stream, not confirmed), unless a row of the line's range
that Stripe may hold is not counted (``unknown``, or ``pending`` and called): its value could
stand in for an accepted row Stripe dropped.

What it reads grows with the range and the work in hand, never with history: the ledger rows
timestamped in [since, end) (one range read through ledger_by_time, aggregated per key as it
streams), the rows not final (ledger_by_status), the report queue, and per (customer, meter)
found there its newest row, its due windows' reported revisions and, for a ``last`` meter, its
newest window (each one index lookup). Pairs with nothing in the range and nothing in hand are
not listed. Stripe is asked once per (Stripe customer, meter) (paged), plus once per ``unknown``
row's minute.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import Connection, Engine, String, and_, column, func, select, values

from meterstream.meters import Catalogue
from meterstream.schema import ledger as ledger_table
from meterstream.schema import window_totals
from reporters import ledger
from reporters.carry import exact_sum, whole_units
from reporters.customers import load_links, stripe_customer_for
from reporters.due import DueWindow, due_windows
from reporters.ledger import (
    ACKNOWLEDGED,
    LedgerRow,
    latest_window_row,
    reported_window_value,
    rows_with_status,
)
from reporters.ledger.model import row_from
from reporters.meters_check import StripeMeter
from reporters.restore import restore_hold
from reporters.settle import FetchSummary, minute_floor, settle_rows

__all__ = ["UNLINKED", "FetchSummary", "Line", "Reconciliation", "reconcile", "settle_rows"]

UNLINKED = "(unlinked)"
_RESTORED = (
    "nothing settled or confirmed: the ledger was restored (sending is held), so it may lack "
    "rows Stripe holds; compare the lines below, then meterstream report --accept-restore"
)
AppKey = tuple[str, str]  # (customer_id, meter)
StripeKey = tuple[str, str]  # (stripe_customer_id, meter)
# Rows read per fetch of the range: memory stays per key, whatever the range holds.
_ROWS_PER_FETCH = 10_000


@dataclass(frozen=True, slots=True)
class Line:
    stripe_customer_id: str
    meter: str
    customer_ids: tuple[str, ...]
    stripe_value: Decimal | None  # None: no Stripe customer to ask
    ledger_value: int
    database_value: int
    not_billed: tuple[str, ...] = ()  # database usage held, rejected or unknown, with reason
    in_flight: tuple[str, ...] = ()

    @property
    def drift(self) -> bool:
        stripe_differs = self.stripe_value is not None and self.stripe_value != self.ledger_value
        return stripe_differs or bool(self.not_billed)

    def __str__(self) -> str:
        mark = "DRIFT" if self.drift else "ok"
        stripe = (
            "no Stripe customer" if self.stripe_value is None else f"Stripe {self.stripe_value}"
        )
        text = (
            f"{mark}: {self.stripe_customer_id} {self.meter} ({', '.join(self.customer_ids)}): "
            f"{stripe}, ledger acknowledged {self.ledger_value}, database {self.database_value}"
        )
        if self.not_billed:
            text += "; not billed: " + ", ".join(self.not_billed)
        if self.in_flight:
            text += "; in flight: " + ", ".join(self.in_flight)
        return text


@dataclass
class Reconciliation:
    lines: list[Line]
    settled: list[str] = field(default_factory=list)  # what settle_rows decided, for people
    start: datetime | None = None
    end: datetime | None = None

    @property
    def drifting(self) -> int:
        return sum(line.drift for line in self.lines)


def reconcile(
    engine: Engine,
    catalogue: Catalogue,
    stripe_meters: Mapping[str, StripeMeter],
    fetch_summary: FetchSummary,
    since: datetime,
    now: datetime,
    settle_minutes: int = 5,
    workers: int = 8,
) -> Reconciliation:
    """Settle unknown rows, then one line per (Stripe customer, meter) with rows in the range
    or work in hand; confirms the accepted rows of lines Stripe agrees with. ``workers``:
    summary calls in flight at once (``fetch_summary`` must be thread-safe)."""
    if settle_minutes < 0:
        raise ValueError(f"settle_minutes must be >= 0, got {settle_minutes}")
    start = minute_floor(since)
    end = minute_floor(now - timedelta(minutes=settle_minutes))
    # A restored ledger lacks rows Stripe holds: a minute's rows no longer tell it all, so
    # settling (or confirming from equal totals) could mark sent what Stripe never had.
    restored = restore_hold(engine) is not None
    settled = (
        [_RESTORED] if restored else settle_rows(engine, stripe_meters, fetch_summary, end, now)
    )
    ranges = _ledger_in_range(engine, stripe_meters, start, end)
    links = load_links(engine)
    database = _database_side(engine, catalogue, stripe_meters, ranges, links)
    stripe_keys = sorted(ranges.keys() | database.keys())
    asked = [key for key in stripe_keys if key[0] != UNLINKED]

    def ask(key: StripeKey) -> Decimal:
        meter_id = stripe_meters[key[1]].id
        return fetch_summary(meter_id, key[0], int(start.timestamp()), int(end.timestamp()))

    # A call waits on Stripe far longer than the work around it: several in flight, each
    # paced by the gateway like the reporter's own (an error of any one is raised here).
    with ThreadPoolExecutor(max(1, min(workers, len(asked))), "reconcile") as pool:
        stripe_values = dict(zip(asked, pool.map(ask, asked), strict=True))
    lines = []
    for stripe_key in stripe_keys:
        stripe_customer_id, meter_name = stripe_key
        in_range = ranges.get(stripe_key, _Range())
        stripe_value = stripe_values.get(stripe_key)
        formula = catalogue.meters[meter_name].stripe_formula
        ledger_value = in_range.total if formula == "sum" else in_range.newest_value
        # A row that may be in Stripe but is not counted (unknown, or called with no answer
        # yet) could make up for an accepted row Stripe dropped: equal totals prove nothing.
        certain = not (restored or in_range.uncertain)
        if stripe_value is not None and stripe_value == ledger_value and certain:
            for identifier in in_range.accepted:
                if ledger.confirm_accepted(engine, identifier, now):
                    settled.append(f"confirmed {identifier}: in Stripe's summaries")
        side = database.get(stripe_key, _Side())
        lines.append(
            Line(
                stripe_customer_id,
                meter_name,
                tuple(sorted(in_range.customer_ids | side.customer_ids)),
                stripe_value,
                ledger_value,
                side.value,
                tuple(side.not_billed),
                tuple(side.in_flight),
            )
        )
    return Reconciliation(lines, settled, start, end)


@dataclass
class _Range:
    """One (Stripe customer, meter)'s acknowledged rows timestamped in the range."""

    customer_ids: set[str] = field(default_factory=set)
    total: int = 0  # a sum meter: their values added up
    newest: tuple[datetime, int] | None = None  # a last meter: (timestamp, sequence) ...
    newest_value: int = 0  # ... and value of the newest
    accepted: list[str] = field(default_factory=list)  # identifiers, to confirm
    uncertain: bool = False  # a row Stripe may hold but the ledger does not count


def _ledger_in_range(
    engine: Engine, stripe_meters: Mapping[str, StripeMeter], start: datetime, end: datetime
) -> dict[StripeKey, _Range]:
    """Per (Stripe customer, meter), its rows timestamped in [start, end): one range read of
    ledger_by_time, streamed, so memory holds one entry per key, not the rows."""
    c = ledger_table.c
    query = select(
        c.customer_id,
        c.stripe_customer_id,
        c.meter,
        c.status,
        c.value,
        c.timestamp,
        c.sequence,
        c.identifier,
        c.first_attempt_at,
    ).where(c.timestamp >= start, c.timestamp < end, c.meter.in_(list(stripe_meters)))
    ranges: dict[StripeKey, _Range] = {}
    with engine.connect() as connection:
        found = connection.execution_options(yield_per=_ROWS_PER_FETCH).execute(query)
        for (
            customer_id,
            stripe_customer_id,
            meter,
            status,
            value,
            stamp,
            sequence,
            identifier,
            first_attempt_at,
        ) in found:
            entry = ranges.setdefault((stripe_customer_id, meter), _Range())
            entry.customer_ids.add(customer_id)
            if status == "unknown" or (status == "pending" and first_attempt_at is not None):
                entry.uncertain = True
            if status not in ACKNOWLEDGED:
                continue
            entry.total += value
            if entry.newest is None or (stamp, sequence) > entry.newest:
                entry.newest, entry.newest_value = (stamp, sequence), value
            if status == "accepted":
                entry.accepted.append(identifier)
    return ranges


@dataclass
class _Side:
    customer_ids: set[str] = field(default_factory=set)
    value: int = 0
    not_billed: list[str] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)


_OUTSTANDING: tuple[ledger.Status, ...] = ("rejected", "unknown", "pending")


def _database_side(
    engine: Engine,
    catalogue: Catalogue,
    stripe_meters: Mapping[str, StripeMeter],
    ranges: Mapping[StripeKey, _Range],
    links: Mapping[str, str],
) -> dict[StripeKey, _Side]:
    """Per (Stripe customer, meter): the database's units and why some are not in Stripe, for
    the (customer, meter) pairs with rows in the range, rows not final or due windows."""
    outstanding: dict[AppKey, list[LedgerRow]] = {}
    for status in _OUTSTANDING:
        for row in rows_with_status(engine, status):
            if row.meter in stripe_meters:
                outstanding.setdefault((row.customer_id, row.meter), []).append(row)
    due = due_windows(engine, stripe_meters, include_held=True)
    app_keys = set(outstanding) | set(due)
    for (_, meter_name), entry in ranges.items():
        app_keys.update((customer_id, meter_name) for customer_id in entry.customer_ids)
    sides: dict[StripeKey, _Side] = {}
    with engine.connect() as connection:
        heads = _heads(connection, app_keys)
        for customer_id, meter_name in sorted(app_keys):
            head = heads.get((customer_id, meter_name))
            stripe_customer_id = stripe_customer_for(customer_id, links) or (
                head.stripe_customer_id if head else UNLINKED
            )
            side = sides.setdefault((stripe_customer_id, meter_name), _Side())
            side.customer_ids.add(customer_id)
            _add_key(
                connection,
                side,
                catalogue,
                (customer_id, meter_name),
                head,
                outstanding.get((customer_id, meter_name), []),
                due.get((customer_id, meter_name), []),
                linked=stripe_customer_for(customer_id, links) is not None,
            )
    return sides


_HEADS_PER_QUERY = 1_000
_newer = ledger_table.alias("newer")


def _heads(connection: Connection, keys: Collection[AppKey]) -> dict[AppKey, LedgerRow]:
    """The newest row of each (customer, meter) of ``keys``: one backward step of
    ledger_sequence per key, a thousand keys per query (one query per key cost 3 ms each)."""
    heads: dict[AppKey, LedgerRow] = {}
    ordered = sorted(keys)
    for first in range(0, len(ordered), _HEADS_PER_QUERY):
        chunk = ordered[first : first + _HEADS_PER_QUERY]
        wanted = values(column("c", String), column("m", String), name="wanted").data(chunk).cte()
        newest = (
            select(func.max(_newer.c.sequence))
            .where(_newer.c.customer_id == wanted.c.c, _newer.c.meter == wanted.c.m)
            .scalar_subquery()
        )
        c = ledger_table.c
        found = connection.execute(
            select(ledger_table).select_from(
                wanted.join(
                    ledger_table,
                    and_(c.customer_id == wanted.c.c, c.meter == wanted.c.m, c.sequence == newest),
                )
            )
        ).mappings()
        for mapping in found:
            row = row_from(mapping)
            heads[(row.customer_id, row.meter)] = row
    return heads


def _add_key(
    connection: Connection,
    side: _Side,
    catalogue: Catalogue,
    key: AppKey,
    head: LedgerRow | None,
    own: list[LedgerRow],
    unreported: list[DueWindow],
    *,
    linked: bool,
) -> None:
    """Add one (customer, meter)'s units and reasons to its Stripe customer's side."""
    customer_id, meter_name = key
    meter = catalogue.meters[meter_name]
    if meter.stripe_formula == "sum":
        units = whole_units(_exact_total(connection, key, head, unreported), meter.unit_scale)
    else:
        newest = connection.execute(
            select(window_totals.c.window_start, window_totals.c.value)
            .where(window_totals.c.customer_id == customer_id, window_totals.c.meter == meter_name)
            .order_by(window_totals.c.window_start.desc())
            .limit(1)
        ).first()
        if newest is not None:
            units = whole_units(newest.value, meter.unit_scale)
            row = latest_window_row(connection, customer_id, meter_name, newest.window_start)
        else:
            # Every window pruned (retention): the newest row left stands for the newest one.
            row = head
            units = 0 if head is None else whole_units(head.window_value, meter.unit_scale)
        own = [] if row is None else [row]
    side.value += units
    for status in _OUTSTANDING:
        of_status = [r for r in own if r.status == status]
        if of_status:
            target = side.in_flight if status == "pending" else side.not_billed
            target.append(f"{customer_id} {status} {sum(r.value for r in of_status)}")
    if unreported:
        reason = "held: no_customer_link" if not linked else "due or held (see meterstream status)"
        issued = head.units_total if head is not None and meter.stripe_formula == "sum" else 0
        gap = units - issued if meter.stripe_formula == "sum" else units
        target = side.not_billed if reason.startswith("held") else side.in_flight
        target.append(f"{customer_id} {reason}: {len(unreported)} window(s), {gap} unit(s)")


def _exact_total(
    connection: Connection, key: AppKey, head: LedgerRow | None, unreported: list[DueWindow]
) -> Decimal:
    """A sum meter's exact total over all time: what the ledger's newest row accounted, plus
    how much each due window differs from its newest ledger row.

    Every other window's newest revision is in the ledger (the report queue's invariant,
    reporters/due.py, checked by the backstop), so it adds nothing: the same as adding up every
    window, pruned ones included, without reading them.
    """
    parts = [Decimal(0) if head is None else head.accounted_total]
    for window in unreported:
        _, reported = reported_window_value(connection, key[0], key[1], window.window_start)
        # copy_negate, not a subtraction: exact whatever the default context's precision.
        parts += [window.window_value, reported.copy_negate()]
    return exact_sum(parts)
