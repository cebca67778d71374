"""The demo's verdict: the database's exact totals beside what Stripe holds, per meter."""

from __future__ import annotations

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
    """Per meter: the database's exact totals in Stripe units beside Stripe's event summaries."""
    from reporters.pages import all_items

    stripe_meters = {name: m.id for name, m in stripe_meters_by_event_name(client).items()}
    now = datetime.now(UTC)
    start = (now - timedelta(days=34)).replace(second=0, microsecond=0)
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=2)
    expected = _database_units(engine, catalogue)

    def stripe_units(meter: Meter, stripe_id: str) -> int:
        meter_id = stripe_meters[meter.stripe_event_name]

        def page(params: Any) -> Any:
            return client.v1.billing.meters.event_summaries.list(meter_id, params)

        summaries = all_items(
            page,
            {
                "customer": stripe_id,
                "start_time": int(start.timestamp()),
                "end_time": int(end.timestamp()),
                "limit": 100,
            },
        )
        return int(sum(Decimal(str(s.aggregated_value)) for s in summaries))

    rows = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for meter in catalogue:
            got = pool.map(partial(stripe_units, meter), customers.values())
            database_total = stripe_total = differing = 0
            for app_id, units in zip(customers, got, strict=True):
                want = expected.get((app_id, meter.name), 0)
                database_total += want
                stripe_total += units
                differing += want != units
            rows.append(
                MeterRow(meter.name, meter.stripe_formula, database_total, stripe_total, differing)
            )
    return rows


def _database_units(engine: Engine, catalogue: Catalogue) -> dict[tuple[str, str], int]:
    """What Stripe should hold per (customer, meter): for additive meters the floor of the exact
    total over all windows in Stripe units; for last-formula meters the newest window's value."""
    c = window_totals.c
    with engine.connect() as connection:
        rows = connection.execute(
            select(c.customer_id, c.meter, c.window_start, c.value)
            .where(c.revision > 0)
            .order_by(c.customer_id, c.meter, c.window_start)
        ).all()
    exact: dict[tuple[str, str], Decimal] = {}
    with localcontext() as context:
        context.prec = 80
        for row in rows:
            meter = catalogue.meters[row.meter]
            key = (row.customer_id, row.meter)
            if meter.stripe_formula == "sum":
                exact[key] = exact.get(key, Decimal(0)) + row.value * meter.unit_scale
            else:
                exact[key] = row.value * meter.unit_scale  # ordered: the newest window wins
        return {key: int(value.to_integral_value(ROUND_FLOOR)) for key, value in exact.items()}


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
