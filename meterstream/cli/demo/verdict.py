"""The demo's verdict: the database's exact totals beside what Stripe holds, per meter (and per
value of a meter's first dimension: the tokens per model)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal, localcontext
from functools import partial
from typing import Any

import stripe
from sqlalchemy import Engine, func, select

from meterstream.cli.demo.options import Echo
from meterstream.cli.demo.traffic import Traffic, stripe_meters_by_event_name
from meterstream.dimensions import combination_key, combination_values
from meterstream.meters import Catalogue, Meter
from meterstream.schema import ledger, window_totals


@dataclass(frozen=True)
class MeterRow:
    meter: str
    formula: str
    database: int
    stripe: int
    customers_differing: int


def database_facts(engine: Engine) -> dict[str, int]:
    """Windows aggregated, and ledger rows reported (sent or accepted) and carried."""
    with engine.connect() as connection:
        windows = connection.execute(
            select(func.count()).where(window_totals.c.revision > 0)
        ).scalar_one()
        by_status: dict[str, int] = {
            str(status): int(count)
            for status, count in connection.execute(
                select(ledger.c.status, func.count()).group_by(ledger.c.status)
            )
        }
    return {
        "windows": int(windows),
        "reported": by_status.get("sent", 0) + by_status.get("accepted", 0),
        "carried": by_status.get("carried", 0),
    }


def compare(
    client: stripe.StripeClient, catalogue: Catalogue, engine: Engine, customers: dict[str, str]
) -> list[MeterRow]:
    """Per meter: the database's exact totals in Stripe units beside Stripe's event summaries,
    compared per customer and combination of dimension values (Stripe's summaries grouped by
    them). A meter with dimensions gets a row per value of its first one too (the tokens per
    model), the database's and Stripe's side by side."""
    stripe_meters = {name: m.id for name, m in stripe_meters_by_event_name(client).items()}
    now = datetime.now(UTC)
    start = (now - timedelta(days=34)).replace(second=0, microsecond=0)
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=2)
    expected = _database_units(engine, catalogue)

    def stripe_units(meter: Meter, group_by: Sequence[str], stripe_id: str) -> dict[str, int]:
        return _stripe_units(
            client, stripe_meters[meter.stripe_event_name], stripe_id, start, end, group_by
        )

    rows = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for meter in catalogue:
            groupings = [meter.dimensions, meter.dimensions[:1]] if meter.dimensions else [()]
            for group_by in groupings:
                got = pool.map(partial(stripe_units, meter, group_by), customers.values())
                found = dict(zip(customers, got, strict=True))
                rows += _rows(meter, group_by, expected, found, by_value=group_by != groupings[0])
    return rows


def _stripe_units(
    client: stripe.StripeClient,
    meter_id: str,
    stripe_id: str,
    start: datetime,
    end: datetime,
    group_by: Sequence[str],
) -> dict[str, int]:
    """Stripe's units per combination of ``group_by``'s values ('' when not grouped)."""
    from reporters.pages import all_items

    def page(params: Any) -> Any:
        return client.v1.billing.meters.event_summaries.list(meter_id, params)

    params: dict[str, Any] = {
        "customer": stripe_id,
        "start_time": int(start.timestamp()),
        "end_time": int(end.timestamp()),
        "limit": 100,
    }
    if group_by:
        params["dimension_group_by_keys"] = list(group_by)
    totals: dict[str, Decimal] = {}
    for summary in all_items(page, params):
        named = getattr(summary, "dimensions", None)
        values = named.to_dict() if named is not None else {}
        key = combination_key({d: str(values.get(d, "")) for d in group_by})
        totals[key] = totals.get(key, Decimal(0)) + Decimal(str(summary.aggregated_value))
    return {key: int(value) for key, value in totals.items()}


def _rows(
    meter: Meter,
    group_by: Sequence[str],
    expected: Mapping[tuple[str, str], Mapping[str, int]],
    found: Mapping[str, Mapping[str, int]],
    *,
    by_value: bool,
) -> list[MeterRow]:
    """The meter's row (its combinations compared one by one), or with ``by_value`` a row per
    value of ``group_by``'s one dimension: the database's combinations added up per value."""
    database: dict[str, dict[str, int]] = {}  # grouping key -> customer -> units
    stripe_side: dict[str, dict[str, int]] = {}
    for app_id, stripe_units in found.items():
        for combination, units in expected.get((app_id, meter.name), {}).items():
            values = combination_values(combination)
            key = combination_key({d: values[d] for d in group_by})
            group = key if by_value else ""
            per_customer = database.setdefault(group, {})
            # Compared per combination: a sum over combinations could hide two differences.
            per_customer[f"{app_id}\x1f{key}"] = per_customer.get(f"{app_id}\x1f{key}", 0) + units
        for key, units in stripe_units.items():
            group = key if by_value else ""
            per_customer = stripe_side.setdefault(group, {})
            per_customer[f"{app_id}\x1f{key}"] = units
    rows = []
    for group in sorted(database.keys() | stripe_side.keys() | ({""} if not by_value else set())):
        want, got = database.get(group, {}), stripe_side.get(group, {})
        differing = {
            k.split("\x1f")[0] for k in want.keys() | got.keys() if want.get(k, 0) != got.get(k, 0)
        }
        name = meter.name
        if by_value:
            name = "  " + ", ".join(f"{d}={v}" for d, v in combination_values(group).items())
        rows.append(
            MeterRow(
                name, meter.stripe_formula, sum(want.values()), sum(got.values()), len(differing)
            )
        )
    return rows


def _database_units(engine: Engine, catalogue: Catalogue) -> dict[tuple[str, str], dict[str, int]]:
    """What Stripe should hold per (customer, meter), per combination of dimension values ('':
    none): for additive meters the floor of the exact total over all windows in Stripe units
    (each combination has its own carry); for last-formula meters the newest window's value."""
    c = window_totals.c
    with engine.connect() as connection:
        rows = connection.execute(
            select(c.customer_id, c.meter, c.combination, c.window_start, c.value)
            .where(c.revision > 0)
            .order_by(c.customer_id, c.meter, c.combination, c.window_start)
        ).all()
    exact: dict[tuple[str, str, str], Decimal] = {}
    with localcontext() as context:
        context.prec = 80
        for row in rows:
            meter = catalogue.meters[row.meter]
            key = (row.customer_id, row.meter, row.combination)
            if meter.stripe_formula == "sum":
                exact[key] = exact.get(key, Decimal(0)) + row.value * meter.unit_scale
            else:
                exact[key] = row.value * meter.unit_scale  # ordered: the newest window wins
        units: dict[tuple[str, str], dict[str, int]] = {}
        for (customer_id, meter_name, combination), value in exact.items():
            floor = int(value.to_integral_value(ROUND_FLOOR))
            units.setdefault((customer_id, meter_name), {})[combination] = floor
        return units


def print_table(echo: Echo, traffic: Traffic, facts: dict[str, Any], rows: list[MeterRow]) -> int:
    """Print what was sent, aggregated and reported, then the verdict; return the exit code."""
    skipped = facts["duplicates_skipped"]
    echo("")
    echo(
        f"events sent              {traffic.sent:>10,}  ({traffic.duplicates:,} re-sent "
        f"duplicates, {traffic.late:,} late by hours)"
    )
    echo(f"duplicates skipped       {'-' if skipped is None else f'{skipped:,}':>10}")
    echo(
        f"windows aggregated       {facts['windows']:>10,}  "
        + (
            "(each equal to the events sent, counted once)"
            if not facts["windows_wrong"]
            else f"({facts['windows_wrong']:,} DIFFER from the events sent)"
        )
    )
    echo(
        f"meter events reported    {facts['reported']:>10,}  ({facts['carried']:,} below one "
        f"Stripe unit, carried; {facts['cycles']} report cycle(s))"
    )
    echo("")
    echo(f"{'meter':<20} {'formula':<8} {'database':>14} {'Stripe':>14}  verdict")
    bad = 0
    for row in rows:
        verdict = (
            "match"
            if row.database == row.stripe
            else (f"DIFFER by {row.stripe - row.database:+,} ({row.customers_differing} customers)")
        )
        bad += row.customers_differing > 0
        echo(f"{row.meter:<20} {row.formula:<8} {row.database:>14,} {row.stripe:>14,}  {verdict}")
    echo("")
    if facts["windows_wrong"]:
        echo(f"VERDICT: {facts['windows_wrong']} window(s) differ from the events sent")
        return 1
    if bad:
        echo(f"VERDICT: {bad} meter(s) differ between the database and Stripe")
        return 1
    echo("VERDICT: the database and Stripe agree on every meter")
    return 0
