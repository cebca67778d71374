"""The ``meterstream`` command line. Settings are read here, once, and passed down."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

import click

from meterstream.errors import MeterstreamError
from meterstream.settings import Settings, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except MeterstreamError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """meterstream: usage events from your application to Stripe meter events, exactly once.

    Every command reads its settings from METERSTREAM_* environment variables.
    """


@cli.command()
@click.option("--port", type=int, default=9092, show_default=True, help="port on 127.0.0.1")
@click.option("--partitions", type=int, default=None, help="partitions of the usage topic")
def broker(port: int, partitions: int | None) -> None:
    """Run the embedded Kafka-protocol broker (memory only) until Ctrl-C."""
    from meterstream.embedded import embedded_broker

    settings = _settings()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    topics = {settings.topic: partitions or settings.topic_partitions}
    with embedded_broker(port=port, topics=topics, log_dir=Path.cwd()) as running:
        click.echo(
            f"embedded broker on {running.bootstrap} (pid {running.pid}), topic "
            f"{settings.topic!r}; export METERSTREAM_KAFKA_BOOTSTRAP={running.bootstrap}"
        )
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    click.echo("broker stopped; everything it held is gone (memory only)")


@cli.command("stripe-emulator")
@click.option("--port", type=int, default=12111, show_default=True, help="port on 127.0.0.1")
@click.option(
    "--rate", type=int, default=100, show_default=True, help="calls per second it accepts"
)
def stripe_emulator(port: int, rate: int) -> None:
    """Serve the slice of Stripe's API that meterstream uses, with Stripe's rules, until Ctrl-C.

    Point the reporter at it with METERSTREAM_STRIPE_API_BASE=http://127.0.0.1:PORT and any
    METERSTREAM_STRIPE_API_KEY=sk_test_... key.
    """
    from reporters.stripe_emulator import serve_forever

    serve_forever(
        "127.0.0.1",
        port,
        rate_limit_per_s=rate,
        on_ready=lambda emulator: click.echo(f"Stripe emulator listening on {emulator.url}"),
    )


@cli.command()
def migrate() -> None:
    """Create or upgrade the database schema (METERSTREAM_DATABASE_URL); safe to run again."""
    from meterstream.db import build_engine
    from meterstream.db import migrate as run_migrations

    settings = _settings()
    engine = build_engine(settings)
    try:
        run_migrations(engine)
    finally:
        engine.dispose()
    click.echo(f"schema is up to date on {engine.url.render_as_string(hide_password=True)}")


def _register_stage_commands() -> None:
    # The command line is the one place that knows every stage; the stages never import each
    # other.
    from aggregators.commands import AGGREGATOR_COMMANDS
    from reporters.commands import REPORTER_COMMANDS

    for command in (*AGGREGATOR_COMMANDS, *REPORTER_COMMANDS):
        cli.add_command(command)


_register_stage_commands()


def main() -> None:
    try:
        cli(standalone_mode=True)
    except MeterstreamError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
