"""The reporter's commands for the ``meterstream`` command line."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click

from meterstream.cli.exits import (
    EXIT_NEEDS_A_PERSON,
    EXIT_OK,
    EXIT_PENDING,
    ConfigExit,
    failed,
    settings_or_exit,
)
from meterstream.cli.json_output import json_document
from meterstream.dimensions import combination_values
from meterstream.errors import MeterstreamError
from meterstream.meters import Catalogue, load_catalogue
from meterstream.metrics import ReporterMetrics
from meterstream.metrics_endpoint import serve_metrics
from meterstream.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from reporters.cycle import CycleResult, Reporter
    from reporters.reconcile import Reconciliation


@contextlib.contextmanager
def _database(settings: Settings) -> Iterator[Engine]:
    from sqlalchemy.exc import OperationalError

    from meterstream.db import build_engine, migrate

    engine = build_engine(settings)
    try:
        try:
            migrate(engine)
        except OperationalError as exc:
            # A start-up error (exit 2): no cycle ran, retrying will not fix the address.
            raise ConfigExit(
                f"METERSTREAM_DATABASE_URL={engine.url.render_as_string(hide_password=True)}: "
                f"cannot open the database ({type(exc.orig).__name__}); check the address and "
                "that the database is up"
            ) from None
        yield engine
    finally:
        engine.dispose()


def _catalogue(settings: Settings) -> Catalogue:
    try:
        return load_catalogue(settings.meters_file)
    except MeterstreamError as exc:
        raise failed(exc) from exc


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        # Finish the call in hand, record its answer, then leave.
        logging.getLogger(__name__).info("signal %d: stopping after the call in hand", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


@click.command()
@click.option(
    "--once",
    is_flag=True,
    help="run one cycle; exit 1 if due usage is still unacknowledged (run again later), "
    "2 on a configuration error (bad key, settings, meters: fix it, do not retry), "
    "3 if usage is held, unknown or was rejected in this cycle (a person must act)",
)
@click.option(
    "--accept-restore",
    is_flag=True,
    help="after a database restore (the reporter holds all sending and meterstream reconcile "
    "was checked): give the database a new deployment id, re-base the ledger mark, and exit",
)
@click.option(
    "--backstop",
    is_flag=True,
    help="first compare every window total with the ledger and queue what the report queue "
    "missed (should be nothing); its cost grows with history, so with --once run it hourly, "
    "not every time (a running reporter does it every METERSTREAM_REPORT_BACKSTOP_S)",
)
def report(once: bool, accept_restore: bool, backstop: bool) -> None:
    """Send the window totals' differences to Stripe meter events, every
    METERSTREAM_REPORT_INTERVAL_S seconds (or --once, for cron and scripts).

    \b
    Exit codes of --once:
      0  everything due is acknowledged by Stripe
      1  due usage is still pending (Stripe down, 429, lost answers): run again later
      2  configuration or start-up error (key missing or refused, settings, catalogue,
         Stripe meters, a unit_scale change): fix it, retrying will not help
      3  usage needs a person: held (unlinked customer: meterstream customers link;
         negative correction the meter does not allow; revision went back), unknown
         (first sent over 20 h ago with no answer: run meterstream reconcile), or
         rejected by Stripe in this cycle (see meterstream status), or the database
         was restored: the ledger is behind its mark in Kafka and nothing is sent until
         meterstream report --accept-restore. 3 wins over 1. Kafka unreachable (the
         mark cannot be checked, nothing is sent): 1.
    """
    settings = settings_or_exit()
    catalogue = _catalogue(settings)
    try:
        with _database(settings) as engine:
            if accept_restore:
                _accept_restore(settings, engine)
                return
            _report(settings, catalogue, engine, once, backstop)
    except MeterstreamError as exc:
        raise failed(exc) from exc


def _report(
    settings: Settings, catalogue: Catalogue, engine: Engine, once: bool, backstop: bool
) -> None:
    from meterstream.errors import BrokerUnavailableError, RestoredLedgerError
    from reporters.service import (
        build_guard,
        build_reporter,
        connect,
        log_result,
        publish_mark,
        run_schedule,
    )

    stop = _stop_on_signals()
    metrics = ReporterMetrics()
    guard = build_guard(settings, engine, metrics)
    with contextlib.closing(connect(settings, catalogue, metrics, stop)) as connected:
        reporter = build_reporter(connected, engine, catalogue, stop)
        if backstop and reporter.run_backstop():
            click.echo(
                "backstop: due windows were missing from the report queue; queued now "
                "(see the reporter's log)",
                err=True,
            )
        if once:
            try:
                guard.check()
            except RestoredLedgerError as exc:
                click.echo(f"nothing sent: {exc}", err=True)
                sys.exit(EXIT_NEEDS_A_PERSON)
            except BrokerUnavailableError as exc:
                click.echo(f"nothing sent: {exc}", err=True)
                sys.exit(EXIT_PENDING)
            result = reporter.run_cycle()
            log_result(result)
            publish_mark(guard)
            _prune_after_once(reporter)
            sys.exit(_once_exit_code(result))
        serve_metrics(settings, metrics.registry)
        run_schedule(reporter, settings.report_interval_s, stop, guard)


def _accept_restore(settings: Settings, engine: Engine) -> None:
    from reporters.marks import KafkaMarks
    from reporters.restore import accept_restore

    marks = KafkaMarks(settings.kafka_bootstrap, settings.marks_topic)
    old, new, rows = accept_restore(
        engine, marks, settings.deployment_id is not None, datetime.now(UTC)
    )
    click.echo(
        f"restore accepted: deployment {old} is now {new} (new identifiers cannot meet those "
        f"Stripe holds); the ledger mark is re-based to its {rows} row(s); sending resumes at "
        "the next report cycle"
    )


def _prune_after_once(reporter: Reporter) -> None:
    """Prune the ledger after a --once cycle too (cron deployments run nothing else), when a
    pass is due: hourly, however often cron runs it."""
    try:
        reporter.prune_ledger()
    except Exception as exc:
        # The cycle's outcome is the exit code; pruning is tried again at the next run.
        click.echo(
            f"pruning the ledger failed ({type(exc).__name__}: {exc}); tried again at the next run",
            err=True,
        )


def _once_exit_code(result: CycleResult) -> int:
    """Say why --once fails, on stderr, and return its exit code (see ``report --help``)."""
    if result.unacknowledged:
        click.echo(
            f"{result.unacknowledged} due report(s) not acknowledged by Stripe yet; "
            "they stay pending for the next run (see meterstream status)",
            err=True,
        )
    for (customer_id, meter), (reason, detail) in sorted(result.held_keys.items()):
        click.echo(f"held {customer_id} {meter}: {reason}: {detail}", err=True)
    for reason, count in sorted(result.held.items()):
        click.echo(f"{count} report(s) held: {reason} (see meterstream status)", err=True)
    if result.rejected:
        click.echo(
            f"{result.rejected} report(s) rejected in this cycle (see meterstream status)",
            err=True,
        )
    if result.unknown:
        click.echo(
            f"{result.unknown} report(s) unknown: first sent too long ago to resend safely; "
            "run meterstream reconcile",
            err=True,
        )
    if result.needs_a_person:
        return EXIT_NEEDS_A_PERSON
    return EXIT_PENDING if result.unacknowledged else EXIT_OK


@click.group()
def customers() -> None:
    """Link application customer ids to Stripe customers."""


@customers.command("link")
@click.argument("customer_id")
@click.argument("stripe_customer_id")
def customers_link(customer_id: str, stripe_customer_id: str) -> None:
    """Bill CUSTOMER_ID's usage to STRIPE_CUSTOMER_ID (cus_...); held usage goes out next cycle."""
    from reporters.customers import link_customer

    settings = settings_or_exit()
    try:
        with _database(settings) as engine:
            link_customer(engine, customer_id, stripe_customer_id, datetime.now(UTC))
    except MeterstreamError as exc:
        raise failed(exc) from exc
    click.echo(f"{customer_id} -> {stripe_customer_id}")


@customers.command("list")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='one JSON array of {"customer_id": ..., "stripe_customer_id": ...}',
)
def customers_list(as_json: bool) -> None:
    """Every link, application id -> Stripe customer id."""
    from reporters.customers import load_links

    with _database(settings_or_exit()) as engine:
        links = load_links(engine)
    if as_json:
        click.echo(
            json_document(
                [
                    {"customer_id": customer_id, "stripe_customer_id": stripe_customer_id}
                    for customer_id, stripe_customer_id in sorted(links.items())
                ]
            )
        )
        return
    for customer_id, stripe_customer_id in sorted(links.items()):
        click.echo(f"{customer_id} -> {stripe_customer_id}")
    if not links:
        click.echo("no links (ids starting with cus_ need none)")


@click.command()
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    default=None,
    help="start of the range (UTC); default: METERSTREAM_HORIZON_DAYS ago",
)
@click.option(
    "--settle-minutes",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="end the range this many minutes ago: Stripe counts asynchronously",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="one JSON object: the range, what was settled, one entry per Stripe customer and "
    "meter; Stripe's values as strings",
)
def reconcile(since: datetime | None, settle_minutes: int, as_json: bool) -> None:
    """Compare the database, the ledger and Stripe's meter event summaries per Stripe customer
    and meter; exit 1 on drift. First decides unknown rows (sent or pending again) and
    confirms v2 stream rows Stripe's summaries cover (accepted -> sent)."""
    from reporters.reconcile import reconcile as compare
    from reporters.service import connect, fetch_summary

    settings = settings_or_exit()
    catalogue = _catalogue(settings)
    now = datetime.now(UTC)
    start = since.replace(tzinfo=UTC) if since else now - timedelta(days=settings.horizon_days)
    kept_from = now - timedelta(days=settings.ledger_retention_days)
    if start < kept_from:
        # Older sent rows may be pruned: the ledger would seem short of what Stripe counted.
        raise click.BadParameter(
            f"{start:%Y-%m-%dT%H:%M:%S} is before {kept_from:%Y-%m-%dT%H:%M:%S}: the ledger "
            f"keeps sent rows for METERSTREAM_LEDGER_RETENTION_DAYS="
            f"{settings.ledger_retention_days} days; choose a later --since, or raise the "
            "retention (rows already pruned are not restored)",
            param_hint="--since",
        )
    try:
        with (
            _database(settings) as engine,
            contextlib.closing(
                connect(settings, catalogue, ReporterMetrics(), threading.Event())
            ) as connected,
        ):
            found = compare(
                engine,
                catalogue,
                connected.stripe_meters,
                fetch_summary(connected),
                start,
                now,
                settle_minutes,
            )
            unnamed = _unnamed_errors(engine)
    except MeterstreamError as exc:
        raise failed(exc) from exc
    if as_json:
        click.echo(json_document({**_reconciliation_document(found, start), "unnamed": unnamed}))
        sys.exit(EXIT_PENDING if found.drifting else EXIT_OK)
    for decided in found.settled:
        click.echo(decided)
    for line in found.lines:
        click.echo(str(line))
    for item in unnamed:
        click.echo(
            f"Stripe refused {item['unidentified']} event(s) of {item['event_name']} "
            f"({item['code']}) without naming them: they are in that meter's DRIFT lines"
        )
    click.echo(
        f"{len(found.lines)} Stripe customer meter(s) compared over "
        f"[{start.isoformat()}, {found.end.isoformat() if found.end else '?'}); "
        f"{found.drifting} drift"
    )
    if found.drifting:
        sys.exit(EXIT_PENDING)


def _unnamed_errors(engine: Engine) -> list[dict[str, Any]]:
    """Stripe's error reports' counts beyond their samples (reporters/webhooks)."""
    from reporters.webhooks.meter_errors import error_counts

    with engine.connect() as connection:
        return [
            {k: row[k] for k in ("event_name", "code", "unidentified")}
            for row in error_counts(connection)
            if row["unidentified"]
        ]


def _reconciliation_document(found: Reconciliation, start: datetime) -> dict[str, Any]:
    return {
        "start": start,
        "end": found.end,
        "settled": found.settled,
        "compared": len(found.lines),
        "drifting": found.drifting,
        "lines": [
            {
                "stripe_customer_id": line.stripe_customer_id,
                "meter": line.meter,
                # The combination's dimension values ({} for a meter without dimensions).
                "dimensions": combination_values(line.combination),
                "customer_ids": line.customer_ids,
                "stripe_value": line.stripe_value,
                "ledger_value": line.ledger_value,
                "database_value": line.database_value,
                "not_billed": line.not_billed,
                "in_flight": line.in_flight,
                "drift": line.drift,
            }
            for line in found.lines
        ],
    }


REPORTER_COMMANDS: list[click.Command] = [report, customers, reconcile]
