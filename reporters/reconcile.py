"""Compare the database, the ledger and what Stripe counted (meter event summaries).

One line per (Stripe customer, meter), and per combination of dimension values for a meter
with dimensions (Stripe's summaries grouped by them, each combination compared with its own
ledger rows and windows: its carry is its own). Stripe's summaries are per Stripe customer,
and several application customers may be linked to one. Three quantities:

- **Stripe**: the meter event summary over [since, end), minute-aligned (Stripe's rule), where
  ``end`` is ``settle_minutes`` ago: Stripe counts asynchronously, so newer events may not be
  in its summaries yet.
- **ledger**: what Stripe acknowledged (sent, or accepted by the v2 stream) with a timestamp in
  [since, end): a sum meter adds the values; a ``last`` meter takes the newest.
- **database**: a sum meter's floor(exact total of every window x unit_scale), over all time
  (the carry makes units global; windows pruned by retention count through the ledger's running
  total), against the units acknowledged; a ``last`` meter's newest
  window's current value, against the newest ledger row. Each difference is listed with its
  reason: held (unlinked customer, negative correction, revision went back), rejected
  (timestamped or rejected since ``since``), unknown, or in flight (pending or due, normal
  until the next cycle).

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
streams) and the database side's reads (reporters/reconcile_database.py), which read the
rejected rows of the range and those rejected since, not all of them. Keys with nothing in
the range and nothing in hand are not listed, unless Stripe has usage for them. Stripe is asked
once per (Stripe customer, meter) (paged; grouped by dimension for a meter with them), plus
once per ``unknown`` row's minute.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import Engine, select

from meterstream.meters import Catalogue
from meterstream.schema import ledger as ledger_table
from reporters import ledger
from reporters.customers import load_links
from reporters.ledger import ACKNOWLEDGED
from reporters.meters_check import StripeMeter
from reporters.reconcile_database import UNLINKED, Side, StripeKey, database_side
from reporters.restore import restore_hold
from reporters.settle import FetchSummary, minute_floor, settle_rows
from reporters.summaries import SummarySource

__all__ = [
    "UNLINKED",
    "FetchSummary",
    "Line",
    "Reconciliation",
    "SummarySource",
    "reconcile",
    "settle_rows",
]

_RESTORED = (
    "nothing settled or confirmed: the ledger was restored (sending is held), so it may lack "
    "rows Stripe holds; compare the lines below, then meterstream report --accept-restore"
)
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
    # The combination of dimension values (meterstream.dimensions' key), '' without dimensions.
    combination: str = ""

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
            f"{mark}: {self.stripe_customer_id} {self.meter}"
            + (f" {self.combination}" if self.combination else "")
            + f" ({', '.join(self.customer_ids)}): "
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
    fetch_summary: SummarySource,
    since: datetime,
    now: datetime,
    settle_minutes: int = 5,
    workers: int = 8,
) -> Reconciliation:
    """Settle unknown rows, then one line per (Stripe customer, meter, combination) with rows
    in the range, work in hand or usage in Stripe; confirms the accepted rows of lines Stripe
    agrees with. ``workers``: summary calls in flight at once (``fetch_summary`` must be
    thread-safe)."""
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
    in_range_keys = {
        (customer_id, key[1], key[2])
        for key, entry in ranges.items()
        for customer_id in entry.customer_ids
    }
    database = database_side(engine, catalogue, stripe_meters, in_range_keys, links, start)
    keys = ranges.keys() | database.keys()
    asked = sorted({(key[0], key[1]) for key in keys if key[0] != UNLINKED})

    def ask(pair: tuple[str, str]) -> dict[str, Decimal]:
        meter_id, dimensions = stripe_meters[pair[1]].id, catalogue.meters[pair[1]].dimensions
        start_s, end_s = int(start.timestamp()), int(end.timestamp())
        if dimensions:
            return fetch_summary.grouped(meter_id, pair[0], start_s, end_s, dimensions)
        return {"": fetch_summary(meter_id, pair[0], start_s, end_s)}

    # A call waits on Stripe far longer than the work around it: several in flight, each
    # paced by the gateway like the reporter's own (an error of any one is raised here).
    with ThreadPoolExecutor(max(1, min(workers, len(asked))), "reconcile") as pool:
        stripe_values = dict(zip(asked, pool.map(ask, asked), strict=True))
    # A combination Stripe has usage for and the database does not is drift too.
    keys |= {(*pair, k) for pair, found in stripe_values.items() for k, v in found.items() if v}
    lines = []
    for stripe_key in sorted(keys):
        stripe_customer_id, meter_name, combination = stripe_key
        in_range = ranges.get(stripe_key, _Range())
        pair = (stripe_customer_id, meter_name)
        stripe_value = (
            stripe_values[pair].get(combination, Decimal(0)) if pair in stripe_values else None
        )
        formula = catalogue.meters[meter_name].stripe_formula
        ledger_value = in_range.total if formula == "sum" else in_range.newest_value
        # A row that may be in Stripe but is not counted (unknown, or called with no answer
        # yet) could make up for an accepted row Stripe dropped: equal totals prove nothing.
        certain = not (restored or in_range.uncertain)
        if stripe_value is not None and stripe_value == ledger_value and certain:
            for identifier in in_range.accepted:
                if ledger.confirm_accepted(engine, identifier, now):
                    settled.append(f"confirmed {identifier}: in Stripe's summaries")
        side = database.get(stripe_key, Side())
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
                combination,
            )
        )
    return Reconciliation(lines, settled, start, end)


@dataclass
class _Range:
    """One (Stripe customer, meter, combination)'s acknowledged rows timestamped in the
    range."""

    customer_ids: set[str] = field(default_factory=set)
    total: int = 0  # a sum meter: their values added up
    newest: tuple[datetime, int] | None = None  # a last meter: (timestamp, sequence) ...
    newest_value: int = 0  # ... and value of the newest
    accepted: list[str] = field(default_factory=list)  # identifiers, to confirm
    uncertain: bool = False  # a row Stripe may hold but the ledger does not count


def _ledger_in_range(
    engine: Engine, stripe_meters: Mapping[str, StripeMeter], start: datetime, end: datetime
) -> dict[StripeKey, _Range]:
    """Per (Stripe customer, meter, combination), its rows timestamped in [start, end): one
    range read of ledger_by_time, streamed, so memory holds one entry per key, not the rows."""
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
        c.combination,
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
            combination,
            first_attempt_at,
        ) in found:
            entry = ranges.setdefault((stripe_customer_id, meter, combination), _Range())
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
