"""Compare the ledger and the database with what Stripe counted (meter event summaries).

Per customer and meter, over [since, now) on minute boundaries (Stripe's rule):

- sum meters: Stripe's summed value must equal the units of the rows Stripe acknowledged
  (sent or accepted) with a timestamp in the range. Beside it, the database side over all
  time: floor(exact total * unit_scale) = acknowledged + pending + rejected + not yet reported
  (held or due); the carried fraction is what floor() dropped.
- last meters: Stripe's value (its newest event in the range) must equal the newest
  acknowledged row in the range.

Stripe counts asynchronously: compare ranges that ended some minutes ago.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import Engine, select

from meterstream.meters import Catalogue
from meterstream.schema import window_totals
from reporters.carry import exact_sum, whole_units
from reporters.ledger import ACKNOWLEDGED, LedgerRow, all_rows
from reporters.meters_check import StripeMeter

# (stripe meter id, stripe customer id, start_s, end_s) -> Stripe's aggregated value
FetchSummary = Callable[[str, str, int, int], Decimal]


@dataclass(frozen=True, slots=True)
class Line:
    customer_id: str
    meter: str
    stripe_customer_id: str
    stripe_value: Decimal
    ledger_value: int
    database: str

    @property
    def drift(self) -> bool:
        return self.stripe_value != self.ledger_value

    def __str__(self) -> str:
        mark = "DRIFT" if self.drift else "ok"
        return (
            f"{mark}: {self.customer_id} {self.meter} ({self.stripe_customer_id}): "
            f"Stripe {self.stripe_value}, ledger acknowledged {self.ledger_value}; {self.database}"
        )


def minute_floor(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def reconcile(
    engine: Engine,
    catalogue: Catalogue,
    stripe_meters: Mapping[str, StripeMeter],
    fetch_summary: FetchSummary,
    since: datetime,
    now: datetime,
) -> list[Line]:
    """One line per (customer, meter, Stripe customer) in the ledger; see the module doc."""
    start = minute_floor(since)
    end = minute_floor(now) + timedelta(minutes=1)
    groups: dict[tuple[str, str, str], list[LedgerRow]] = {}
    for row in all_rows(engine):
        if row.meter in stripe_meters:
            groups.setdefault((row.customer_id, row.meter, row.stripe_customer_id), []).append(row)
    lines = []
    for (customer_id, meter_name, stripe_customer_id), rows in sorted(groups.items()):
        meter = catalogue.meters[meter_name]
        in_range = [r for r in rows if r.status in ACKNOWLEDGED and start <= r.timestamp < end]
        stripe_value = fetch_summary(
            stripe_meters[meter_name].id,
            stripe_customer_id,
            int(start.timestamp()),
            int(end.timestamp()),
        )
        if meter.stripe_formula == "sum":
            ledger_value = sum(r.value for r in in_range)
            database = _sum_database_side(engine, customer_id, meter_name, meter.unit_scale, rows)
        else:
            newest = max(in_range, key=lambda r: (r.timestamp, r.sequence), default=None)
            ledger_value = 0 if newest is None else newest.value
            database = f"database newest window total {rows[-1].total}"
        lines.append(
            Line(customer_id, meter_name, stripe_customer_id, stripe_value, ledger_value, database)
        )
    return lines


def _sum_database_side(
    engine: Engine, customer_id: str, meter: str, unit_scale: Decimal, rows: list[LedgerRow]
) -> str:
    with engine.connect() as connection:
        totals = connection.execute(
            select(window_totals.c.value).where(
                window_totals.c.customer_id == customer_id, window_totals.c.meter == meter
            )
        ).scalars()
        exact = exact_sum(totals)
    units = whole_units(exact, unit_scale)
    by_status: dict[str, int] = {}
    for row in rows:
        by_status[row.status] = by_status.get(row.status, 0) + row.value
    acknowledged = sum(by_status.get(s, 0) for s in ACKNOWLEDGED)
    issued = rows[-1].units_total
    return (
        f"database (all time): floor({exact} x {unit_scale}) = {units} = acknowledged "
        f"{acknowledged} + pending {by_status.get('pending', 0)} + rejected "
        f"{by_status.get('rejected', 0)} + not yet reported (held or due) {units - issued}"
    )
