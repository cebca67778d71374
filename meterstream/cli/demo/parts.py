"""What the demo runs on, started and stopped: the embedded broker, the Stripe emulator, the
database, an aggregator worker and the reporter, each replaced by a real one when given."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click
import stripe
from sqlalchemy import Engine, select

from aggregators.reference import CombinationTotals
from meterstream.cli.demo.options import DemoOptions, Echo
from meterstream.embedded import embedded_broker
from meterstream.metrics_endpoint import scrape
from meterstream.processes import start_meterstream, stop_process
from meterstream.schema import window_totals
from meterstream.settings import Settings, load_settings

_DEMO_KEY = "sk_test_meterstreamdemo"


def start_parts(stack: ExitStack, options: DemoOptions, workdir: Path, echo: Echo) -> Settings:
    """Start the embedded broker and Stripe emulator unless real ones are given (``stack`` stops
    them); return the settings every demo process reads."""
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
    return settings


def stripe_client(settings: Settings) -> stripe.StripeClient:
    """The demo's own Stripe client: it sets the account up and reads the summaries back."""
    if settings.stripe_api_key is None:  # start_parts always sets one
        raise click.ClickException("the demo needs a Stripe key (--stripe-api-key)")
    return stripe.StripeClient(
        settings.stripe_api_key.get_secret_value(),
        base_addresses={
            "api": settings.stripe_api_base,
            "meter_events": settings.meter_events_base,
        },
        max_network_retries=2,
    )


@contextmanager
def aggregator_worker(
    settings: Settings, workdir: Path, metrics_port: int
) -> Iterator[subprocess.Popen[bytes]]:
    """``meterstream aggregate`` in a child process (log in ``workdir``), stopped on exit."""
    with (workdir / "aggregate.log").open("ab") as log:
        process = start_meterstream(
            settings.model_copy(update={"metrics_port": metrics_port}),
            "aggregate",
            "--loglevel",
            "error",
            output=log,
            cwd=workdir,
        )
        try:
            yield process
        finally:
            stop_process(process)


def _stored_totals(engine: Engine, customers: dict[str, str]) -> CombinationTotals:
    c = window_totals.c
    query = select(c.customer_id, c.meter, c.window_start, c.combination, c.value, c.events).where(
        c.revision > 0, c.customer_id.in_(list(customers))
    )
    with engine.connect() as connection:
        return {
            (r.customer_id, r.meter, r.window_start, r.combination): (r.value, r.events)
            for r in connection.execute(query)
        }


def wait_for_totals(
    engine: Engine,
    customers: dict[str, str],
    expected: int,
    worker: subprocess.Popen[bytes],
    workdir: Path,
    timeout_s: float = 180,
) -> CombinationTotals:
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


def report_until_done(settings: Settings, workdir: Path, echo: Echo) -> int:
    """Run ``meterstream report --once`` until Stripe acknowledged everything due; the cycles."""
    for attempt in range(1, 11):
        with (workdir / "report.log").open("ab") as log:
            code = start_meterstream(settings, "report", "--once", output=log).wait()
        if code == 0:
            echo(f"reporter             every due window acknowledged by Stripe (cycle {attempt})")
            return attempt
        echo(f"reporter             cycle {attempt} left usage unacknowledged (exit {code}); again")
    raise click.ClickException(f"the reporter did not finish; see {workdir / 'report.log'}")


def scrape_counter(port: int, name: str) -> int | None:
    """A counter the worker exports on ``port``, or None when it exports none by that name."""
    samples = scrape(port)
    return int(samples[(name, ())]) if (name, ()) in samples else None
