"""``meterstream demo``: the whole pipeline on embedded defaults, checked end to end.

Starts an embedded broker, an SQLite database and the local Stripe emulator (or uses the real
ones it is given), one aggregator worker and the reporter (parts.py); sends realistic traffic
through the SDK, duplicates and late events included (traffic.py); then compares, per meter,
the exact totals in the database with what Stripe holds (verdict.py). Everything it starts, it
stops. On the emulator it ends with a payment failure sent as Stripe's webhook to
``meterstream serve`` and listed by ``meterstream payments`` (payments.py).
"""

from __future__ import annotations

import signal
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import click

from aggregators.reference import reference_combination_totals
from meterstream.cli.demo.options import DemoOptions, Echo
from meterstream.cli.demo.parts import (
    aggregator_worker,
    report_until_done,
    scrape_counter,
    start_parts,
    stripe_client,
    wait_for_totals,
)
from meterstream.cli.demo.payments import show_a_payment_failure
from meterstream.cli.demo.traffic import Traffic, prepare_stripe, send_traffic
from meterstream.cli.demo.verdict import MeterRow, compare, database_facts, print_table
from meterstream.db import build_engine, migrate
from meterstream.embedded import free_port
from meterstream.meters import load_catalogue

__all__ = ["DemoOptions", "MeterRow", "Traffic", "print_table", "run_demo"]


def run_demo(options: DemoOptions, echo: Echo = click.echo) -> int:
    """Run the demo; return 0 when the database and Stripe agree on every meter, else 1."""
    # A SIGTERM unwinds like Ctrl-C, so everything started below is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meterstream-")))
        settings = start_parts(stack, options, workdir, echo)
        engine = build_engine(settings)
        stack.callback(engine.dispose)
        migrate(engine)
        catalogue = load_catalogue(settings.meters_file)
        client = stripe_client(settings)
        customers = prepare_stripe(client, catalogue, engine, options.customers)
        metrics_port = free_port()
        worker = stack.enter_context(aggregator_worker(settings, workdir, metrics_port))
        echo("aggregator worker    started (joining the consumer group takes a few seconds)")
        traffic = send_traffic(settings, catalogue, customers, options)
        stored = wait_for_totals(engine, customers, traffic.unique, worker, workdir)
        # The database against an independent reference of what was sent: each event once.
        reference = reference_combination_totals(traffic.events, catalogue)
        windows_wrong = sum(stored.get(key) != want for key, want in reference.items()) + len(
            set(stored) - set(reference)
        )
        reported = report_until_done(settings, workdir, echo)
        rows = compare(client, catalogue, engine, customers)
        facts = {
            **database_facts(engine),
            "windows_wrong": windows_wrong,
            "cycles": reported,
            "duplicates_skipped": scrape_counter(
                metrics_port, "meterstream_aggregator_duplicates_skipped_total"
            ),
        }
        if options.stripe_api_key is None:  # the emulator plays Stripe: it can fail an invoice
            show_a_payment_failure(settings, customers, workdir, echo)
    return print_table(echo, traffic, facts, rows)
