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

Before comparing, :func:`settle_rows` uses the same summaries to decide two kinds of rows:
``unknown`` rows (resend window expired) and ``accepted`` rows (v2 stream, not confirmed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import Engine, select

from meterstream.meters import Catalogue
from meterstream.schema import window_totals
from reporters import ledger
from reporters.carry import exact_sum, whole_units
from reporters.customers import load_links, stripe_customer_for
from reporters.due import due_windows
from reporters.ledger import ACKNOWLEDGED, LedgerRow, all_rows
from reporters.meters_check import StripeMeter

# (stripe meter id, stripe customer id, start_s, end_s) -> Stripe's aggregated value
FetchSummary = Callable[[str, str, int, int], Decimal]
UNLINKED = "(unlinked)"
MINUTE = timedelta(minutes=1)


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


def minute_floor(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def reconcile(
    engine: Engine,
    catalogue: Catalogue,
    stripe_meters: Mapping[str, StripeMeter],
    fetch_summary: FetchSummary,
    since: datetime,
    now: datetime,
    settle_minutes: int = 5,
) -> Reconciliation:
    """Settle unknown and accepted rows, then one line per (Stripe customer, meter)."""
    if settle_minutes < 0:
        raise ValueError(f"settle_minutes must be >= 0, got {settle_minutes}")
    start = minute_floor(since)
    end = minute_floor(now - timedelta(minutes=settle_minutes))
    settled = settle_rows(engine, stripe_meters, fetch_summary, end, now)
    rows = [r for r in all_rows(engine) if r.meter in stripe_meters]
    links = load_links(engine)
    database = _database_side(engine, catalogue, stripe_meters, rows, links)
    groups: dict[tuple[str, str], list[LedgerRow]] = {}
    for row in rows:
        groups.setdefault((row.stripe_customer_id, row.meter), []).append(row)
    for key in database:
        groups.setdefault(key, [])
    lines = []
    for (stripe_customer_id, meter_name), group in sorted(groups.items()):
        formula = catalogue.meters[meter_name].stripe_formula
        in_range = [r for r in group if r.status in ACKNOWLEDGED and start <= r.timestamp < end]
        stripe_value = None
        if stripe_customer_id != UNLINKED:
            stripe_value = fetch_summary(
                stripe_meters[meter_name].id,
                stripe_customer_id,
                int(start.timestamp()),
                int(end.timestamp()),
            )
        if formula == "sum":
            ledger_value = sum(r.value for r in in_range)
        else:
            newest = max(in_range, key=lambda r: (r.timestamp, r.sequence), default=None)
            ledger_value = 0 if newest is None else newest.value
        if stripe_value is not None and stripe_value == ledger_value:
            for row in in_range:
                if row.status == "accepted" and ledger.confirm_accepted(
                    engine, row.identifier, now
                ):
                    settled.append(f"confirmed {row.identifier}: in Stripe's summaries")
        side = database.get((stripe_customer_id, meter_name), _Side())
        customer_ids = sorted({r.customer_id for r in group} | side.customer_ids)
        lines.append(
            Line(
                stripe_customer_id,
                meter_name,
                tuple(customer_ids),
                stripe_value,
                ledger_value,
                side.value,
                tuple(side.not_billed),
                tuple(side.in_flight),
            )
        )
    return Reconciliation(lines, settled, start, end)


@dataclass
class _Side:
    customer_ids: set[str] = field(default_factory=set)
    value: int = 0
    not_billed: list[str] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)


def _database_side(
    engine: Engine,
    catalogue: Catalogue,
    stripe_meters: Mapping[str, StripeMeter],
    rows: list[LedgerRow],
    links: Mapping[str, str],
) -> dict[tuple[str, str], _Side]:
    """Per (Stripe customer, meter): the database's units and why some are not in Stripe."""
    by_key: dict[tuple[str, str], list[LedgerRow]] = {}
    for row in rows:
        by_key.setdefault((row.customer_id, row.meter), []).append(row)
    with engine.connect() as connection:
        windows = connection.execute(
            select(
                window_totals.c.customer_id,
                window_totals.c.meter,
                window_totals.c.window_start,
                window_totals.c.value,
            ).where(window_totals.c.meter.in_(list(stripe_meters)))
        ).all()
    totals: dict[tuple[str, str], list[tuple[datetime, Decimal]]] = {}
    for customer_id, meter_name, window_start, value in windows:
        totals.setdefault((customer_id, meter_name), []).append((window_start, value))
    due = due_windows(engine, stripe_meters)
    sides: dict[tuple[str, str], _Side] = {}
    for customer_id, meter_name in sorted(totals.keys() | by_key.keys()):
        meter = catalogue.meters[meter_name]
        own = by_key.get((customer_id, meter_name), [])
        values = totals.get((customer_id, meter_name), [])
        stripe_customer_id = stripe_customer_for(customer_id, links) or (
            own[-1].stripe_customer_id if own else UNLINKED
        )
        side = sides.setdefault((stripe_customer_id, meter_name), _Side())
        side.customer_ids.add(customer_id)
        if meter.stripe_formula == "sum":
            units = whole_units(_exact_total(values, own), meter.unit_scale)
        elif values:
            units = whole_units(max(values)[1], meter.unit_scale)
            own = [r for r in own if r.window_start == max(values)[0]][-1:]
        else:
            # Every window pruned (retention): the newest row left stands for the newest one.
            own = [max(own, key=lambda r: (r.window_start, r.revision))]
            units = whole_units(own[0].window_value, meter.unit_scale)
        side.value += units
        for status in ("rejected", "unknown", "pending"):
            part = sum(r.value for r in own if r.status == status)
            if part or any(r.status == status for r in own):
                target = side.in_flight if status == "pending" else side.not_billed
                target.append(f"{customer_id} {status} {part}")
        unreported = due.get((customer_id, meter_name), [])
        if unreported:
            reason = (
                "held: no_customer_link"
                if stripe_customer_for(customer_id, links) is None
                else "due or held (see meterstream status)"
            )
            issued = own[-1].units_total if own and meter.stripe_formula == "sum" else 0
            gap = units - issued if meter.stripe_formula == "sum" else units
            target = side.not_billed if reason.startswith("held") else side.in_flight
            target.append(f"{customer_id} {reason}: {len(unreported)} window(s), {gap} unit(s)")
    return sides


def _exact_total(values: list[tuple[datetime, Decimal]], own: list[LedgerRow]) -> Decimal:
    """A sum meter's exact total over all time: what the ledger's newest row accounted, plus
    how much each window still in window_totals differs from its newest ledger row.

    The same as adding up every window while none is pruned (the running total is each reported
    window's newest total, added up); windows pruned (retention) are in it through the ledger.
    """
    if not own:
        return exact_sum(v for _, v in values)
    reported: dict[datetime, LedgerRow] = {}
    for row in own:
        if row.window_start not in reported or row.revision > reported[row.window_start].revision:
            reported[row.window_start] = row
    # copy_negate, not a subtraction: exact whatever the default context's precision.
    reported_values = [reported[s].window_value.copy_negate() for s, _ in values if s in reported]
    return exact_sum([own[-1].accounted_total, *(v for _, v in values), *reported_values])


def settle_rows(
    engine: Engine,
    stripe_meters: Mapping[str, StripeMeter],
    fetch_summary: FetchSummary,
    end: datetime,
    now: datetime,
) -> list[str]:
    """Decide ``unknown`` rows of sum meters from Stripe's summary of their minute.

    Stripe's summary for the row's minute equals the acknowledged rows of that minute plus the
    row: Stripe has it (``sent``). Equals them without it: Stripe never recorded it, so it is
    ``pending`` again (sent afresh next cycle). Anything else, another undecided row in the
    same minute, or a ``last`` meter: left ``unknown`` for a person. Returns what it did.
    """
    done: list[str] = []
    everything = [r for r in all_rows(engine) if r.meter in stripe_meters]
    for row in everything:
        if row.status != "unknown" or row.timestamp >= end:
            continue
        minute = minute_floor(row.timestamp)
        same_minute = [
            r
            for r in everything
            if r.stripe_customer_id == row.stripe_customer_id
            and r.meter == row.meter
            and minute <= r.timestamp < minute + MINUTE
            and r.identifier != row.identifier
        ]
        undecided = [r for r in same_minute if r.status in ("pending", "unknown", "accepted")]
        if stripe_meters[row.meter].formula != "sum":
            done.append(f"left {row.identifier} unknown: a last meter's summary cannot tell")
            continue
        if undecided:
            done.append(f"left {row.identifier} unknown: other undecided rows in its minute")
            continue
        known = sum(r.value for r in same_minute if r.status == "sent")
        stripe_value = fetch_summary(
            stripe_meters[row.meter].id,
            row.stripe_customer_id,
            int(minute.timestamp()),
            int((minute + MINUTE).timestamp()),
        )
        if stripe_value == known + row.value and row.value != 0:
            ledger.mark_acknowledged(engine, row.identifier, "sent", None, now, expected="unknown")
            done.append(f"{row.identifier}: Stripe has it; marked sent")
        elif stripe_value == known and row.value != 0:
            ledger.mark_pending_again(engine, row.identifier, now)
            done.append(f"{row.identifier}: not in Stripe; pending again, sent next cycle")
        else:
            done.append(
                f"left {row.identifier} unknown: Stripe's summary {stripe_value} for its minute "
                f"matches neither {known} nor {known + row.value}; a person must decide"
            )
    return done
