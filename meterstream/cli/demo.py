"""``meterstream demo``: the whole pipeline on embedded defaults, checked end to end.

Starts an embedded broker, an SQLite database and the local Stripe emulator (or uses the real
ones it is given), one aggregator worker and the reporter; sends realistic traffic through the
SDK (duplicates and late events included); then compares, per meter, the exact totals in the
database with what Stripe holds. Everything it starts, it stops.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal, localcontext
from functools import partial
from pathlib import Path
from typing import Any

import click
import stripe
from sqlalchemy import Engine, func, select

from aggregators.reference import Totals, reference_totals
from meterstream.db import build_engine, migrate
from meterstream.embedded import embedded_broker, free_port
from meterstream.events import UsageEvent
from meterstream.meters import Catalogue, Meter, load_catalogue
from meterstream.metrics import scrape
from meterstream.processes import start_meterstream, stop_process
from meterstream.schema import ledger, window_totals
from meterstream.settings import Settings, load_settings

Echo = Callable[[str], None]
_DEMO_KEY = "sk_test_meterstreamdemo"


@dataclass(frozen=True)
class DemoOptions:
    customers: int = 200
    events: int = 20_000
    duplicate_share: float = 0.05
    late_share: float = 0.05
    seed: int = 7
    bootstrap: str | None = None
    database_url: str | None = None
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None
    meters_file: Path = Path("examples/meters.toml")


@dataclass
class Traffic:
    sent: int = 0
    unique: int = 0
    duplicates: int = 0
    late: int = 0
    events: list[UsageEvent] = field(default_factory=list)


def run_demo(options: DemoOptions, echo: Echo = click.echo) -> int:
    """Run the demo; return 0 when the database and Stripe agree on every meter, else 1."""
    # A SIGTERM unwinds like Ctrl-C, so everything started below is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meterstream-")))
        topic = f"meterstream.cli.demo.{uuid.uuid4().hex[:8]}"
        bootstrap = options.bootstrap
        if bootstrap is None:
            broker = stack.enter_context(embedded_broker(topics={topic: 8}, log_dir=workdir))
            bootstrap = broker.bootstrap
            echo(f"embedded broker      {bootstrap} (pid {broker.pid})")
        api_base, key = options.stripe_api_base, options.stripe_api_key
        # Stripe's sandbox takes about 25 calls/s; the local emulator far more.
        stripe_rate = 25.0
        if key is None:
            from stripe_emulator import run_stripe_emulator

            emulator = stack.enter_context(run_stripe_emulator(rate_limit_per_s=None))
            api_base, key, stripe_rate = emulator.url, _DEMO_KEY, 1000.0
            echo(f"Stripe emulator      {api_base}")
        settings = load_settings(
            kafka_bootstrap=bootstrap,
            topic=topic,
            consumer_group=f"{topic}.aggregators",
            database_url=options.database_url or f"sqlite:///{workdir / 'meterstream.db'}",
            meters_file=options.meters_file.resolve(),
            stripe_api_key=key,
            stripe_api_base=api_base or "https://api.stripe.com",
            source="meterstream-demo",
            stripe_rate=stripe_rate,
            kafka_session_timeout_s=6.0,
            metrics_port=0,
        )
        echo(f"database             {settings.database_url.split('@')[-1]}")
        engine = build_engine(settings)
        stack.callback(engine.dispose)
        migrate(engine)
        catalogue = load_catalogue(settings.meters_file)
        client = stripe.StripeClient(
            key,
            base_addresses={
                "api": settings.stripe_api_base,
                "meter_events": settings.meter_events_base,
            },
            max_network_retries=2,
        )
        customers = _prepare_stripe(client, catalogue, engine, options.customers)
        metrics_port = free_port()
        worker = stack.enter_context(
            _process(settings, ["aggregate", "--loglevel", "error"], workdir, metrics_port)
        )
        echo("aggregator worker    started (joining the consumer group takes a few seconds)")
        traffic = _send_traffic(settings, catalogue, customers, options)
        stored = _wait_for_totals(engine, customers, traffic.unique, worker, workdir)
        # The database against an independent reference of what was sent: each event once.
        reference = reference_totals(traffic.events, catalogue)
        windows_wrong = sum(stored.get(key) != want for key, want in reference.items()) + len(
            set(stored) - set(reference)
        )
        reported = _report_until_done(settings, workdir, echo)
        rows = _compare(client, catalogue, engine, customers)
        facts = {
            **_database_facts(engine),
            "windows_wrong": windows_wrong,
            "cycles": reported,
            "duplicates_skipped": _scrape_counter(
                metrics_port, "meterstream_aggregator_duplicates_skipped_total"
            ),
        }
    return _print_table(echo, traffic, facts, rows)


def _database_facts(engine: Engine) -> dict[str, int]:
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


def _prepare_stripe(
    client: stripe.StripeClient, catalogue: Catalogue, engine: Engine, count: int
) -> dict[str, str]:
    """Create the Stripe meters the catalogue needs (if missing) and one Stripe customer per
    demo customer, linked in the database. Returns app customer id -> Stripe customer id."""
    from reporters.customers import link_customer

    existing = {m.event_name: m for m in client.v1.billing.meters.list({"limit": 100}).data}
    for meter in catalogue:
        if meter.stripe_event_name not in existing:
            client.v1.billing.meters.create(
                {
                    "display_name": meter.description or meter.name,
                    "event_name": meter.stripe_event_name,
                    "default_aggregation": {"formula": meter.stripe_formula},
                }
            )
    links = {}
    now = datetime.now(UTC)
    run = uuid.uuid4().hex[:6]  # a database reused across runs keeps each run's customers apart
    for number in range(count):
        app_id = f"customer-{run}-{number:04d}"
        created = client.v1.customers.create({"name": app_id})
        link_customer(engine, app_id, created.id, now)
        links[app_id] = created.id
    return links


def _send_traffic(
    settings: Settings, catalogue: Catalogue, customers: dict[str, str], options: DemoOptions
) -> Traffic:
    from ingest import UsageClient

    rng = random.Random(options.seed)  # noqa: S311 - made-up traffic, not secrets
    meters = list(catalogue)
    ids = list(customers)
    traffic = Traffic()
    now = datetime.now(UTC)
    with (
        UsageClient(settings, catalogue=catalogue) as client,
        click.progressbar(length=options.events, label="sending usage       ") as bar,
    ):
        for _ in range(options.events):
            if traffic.events and rng.random() < options.duplicate_share:
                # The same event again, as a producer retrying after a timeout would send it.
                again = rng.choice(traffic.events)
                client.record(
                    again.customer_id,
                    again.meter,
                    again.value,
                    timestamp=again.event_time,
                    event_id=again.event_id,
                    properties=again.properties,
                )
                traffic.duplicates += 1
            else:
                meter = rng.choice(meters)
                customer = rng.choice(ids)
                late = rng.random() < options.late_share
                moment = now - timedelta(hours=rng.uniform(2, 20) if late else rng.uniform(0, 0.05))
                value = _value(rng, meter)
                properties = {
                    "user_id": f"user-{rng.randint(1, 40)}",
                    "region": rng.choice(["eu", "us"]),
                }
                event_id = client.record(
                    customer, meter.name, value, timestamp=moment, properties=properties
                )
                traffic.events.append(
                    UsageEvent(
                        event_id,
                        settings.source,
                        customer,
                        meter.name,
                        Decimal(value),
                        moment,
                        properties,
                    )
                )
                traffic.unique += 1
                traffic.late += late
            traffic.sent += 1
            bar.update(1)
    return traffic


def _value(rng: random.Random, meter: Meter) -> Any:
    if meter.aggregation == "sum" and meter.unit_scale != 1:
        # GB-hours with three decimals, and now and then a credit.
        amount = Decimal(rng.randint(1, 5_000)) / 1000
        return -amount / 10 if meter.allow_negative and rng.random() < 0.05 else amount
    if meter.aggregation in ("max", "min", "last"):
        return rng.randint(1, 500)
    return rng.randint(1, 2_000)


def _stored_totals(engine: Engine, customers: dict[str, str]) -> Totals:
    c = window_totals.c
    query = select(c.customer_id, c.meter, c.window_start, c.value, c.events).where(
        c.revision > 0, c.customer_id.in_(list(customers))
    )
    with engine.connect() as connection:
        return {
            (r.customer_id, r.meter, r.window_start): (r.value, r.events)
            for r in connection.execute(query)
        }


def _wait_for_totals(
    engine: Engine,
    customers: dict[str, str],
    expected: int,
    worker: subprocess.Popen[bytes],
    workdir: Path,
    timeout_s: float = 180,
) -> Totals:
    """Wait until this run's events are all in the database; return its window totals."""
    deadline = time.monotonic() + timeout_s
    with click.progressbar(length=expected, label="aggregating         ") as bar:
        applied = 0
        while True:
            stored = _stored_totals(engine, customers)
            now_applied = sum(events for _value, events in stored.values())
            bar.update(now_applied - applied)
            applied = now_applied
            if applied >= expected:
                return stored
            if worker.poll() is not None:
                log = (workdir / "aggregate.log").read_text(errors="replace")[-2000:]
                raise click.ClickException(f"the aggregator worker stopped:\n{log}")
            if time.monotonic() > deadline:
                raise click.ClickException(
                    f"only {applied} of {expected} events reached the database in {timeout_s:g} s"
                )
            time.sleep(0.2)


def _report_until_done(settings: Settings, workdir: Path, echo: Echo) -> int:
    for attempt in range(1, 11):
        with (workdir / "report.log").open("ab") as log:
            code = start_meterstream(settings, "report", "--once", output=log).wait()
        if code == 0:
            echo(f"reporter             every due window acknowledged by Stripe (cycle {attempt})")
            return attempt
        echo(f"reporter             cycle {attempt} left usage unacknowledged (exit {code}); again")
    raise click.ClickException(f"the reporter did not finish; see {workdir / 'report.log'}")


@dataclass(frozen=True)
class MeterRow:
    meter: str
    formula: str
    database: int
    stripe: int
    customers_differing: int


def _compare(
    client: stripe.StripeClient, catalogue: Catalogue, engine: Engine, customers: dict[str, str]
) -> list[MeterRow]:
    """Per meter: the database's exact totals in Stripe units beside Stripe's event summaries."""
    stripe_meters = {m.event_name: m.id for m in client.v1.billing.meters.list({"limit": 100}).data}
    now = datetime.now(UTC)
    start = (now - timedelta(days=34)).replace(second=0, microsecond=0)
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=2)
    expected = _database_units(engine, catalogue)

    def stripe_units(meter: Meter, stripe_id: str) -> int:
        summaries = client.v1.billing.meters.event_summaries.list(
            stripe_meters[meter.stripe_event_name],
            {
                "customer": stripe_id,
                "start_time": int(start.timestamp()),
                "end_time": int(end.timestamp()),
            },
        ).data
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


def _print_table(echo: Echo, traffic: Traffic, facts: dict[str, Any], rows: list[MeterRow]) -> int:
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


def _scrape_counter(port: int, name: str) -> int | None:
    samples = scrape(port)
    return int(samples[(name, ())]) if (name, ()) in samples else None


@contextmanager
def _process(
    settings: Settings, arguments: list[str], workdir: Path, metrics_port: int
) -> Iterator[subprocess.Popen[bytes]]:
    with (workdir / f"{arguments[0]}.log").open("ab") as log:
        process = start_meterstream(
            settings.model_copy(update={"metrics_port": metrics_port}),
            *arguments,
            output=log,
            cwd=workdir,
        )
        try:
            yield process
        finally:
            stop_process(process)
