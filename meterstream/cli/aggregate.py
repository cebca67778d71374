"""The aggregators' commands for the ``meterstream`` command line."""

from __future__ import annotations

from datetime import UTC
from typing import cast

import click
import orjson

from meterstream.cli.exits import settings_or_exit
from meterstream.cli.logs import LOG_LEVELS, LogLevel, LogOptions, logging_config
from meterstream.events import format_value


@click.command()
@click.option(
    "--loglevel",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default=None,
    help="this worker's log level, faust's included  [default: the group's --log-level]",
)
@click.pass_context
def aggregate(ctx: click.Context, loglevel: str | None) -> None:
    """Run an aggregator worker: usage topic -> exact window totals in the database.

    Start several with the same METERSTREAM_CONSUMER_GROUP to share the partitions.
    Ctrl-C stops it cleanly after the batch in hand.
    """
    from aggregators.worker import run_worker

    options = ctx.find_object(LogOptions) or LogOptions()
    level = cast(LogLevel, loglevel.lower()) if loglevel else options.level
    # faust's worker replaces the logging configuration when it starts: hand it ours.
    run_worker(
        settings_or_exit(),
        loglevel=level,
        logging_config=logging_config(level, options.log_format),
    )


@click.command()
@click.option("--customer", default=None, help="only this customer id")
@click.option("--meter", default=None, help="only this meter")
@click.option("--json", "as_json", is_flag=True, help="one JSON array of objects")
def totals(customer: str | None, meter: str | None, as_json: bool) -> None:
    """Print window totals (exact values) from the database."""
    from sqlalchemy import select

    from meterstream.db import build_engine
    from meterstream.schema import window_totals

    settings = settings_or_exit()
    engine = build_engine(settings)
    c = window_totals.c
    query = select(c.customer_id, c.meter, c.window_start, c.window_end, c.value, c.events).where(
        c.revision > 0
    )
    if customer is not None:
        query = query.where(c.customer_id == customer)
    if meter is not None:
        query = query.where(c.meter == meter)
    query = query.order_by(c.customer_id, c.meter, c.window_start)
    try:
        with engine.connect() as connection:
            rows = connection.execute(query).all()
    finally:
        engine.dispose()
    records = [
        {
            "customer": row.customer_id,
            "meter": row.meter,
            "window_start": row.window_start.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "window_end": row.window_end.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "value": format_value(row.value),
            "events": row.events,
        }
        for row in rows
    ]
    if as_json:
        click.echo(orjson.dumps(records).decode())
        return
    click.echo(f"{'customer':<24} {'meter':<20} {'window_start':<21} {'value':>20} {'events':>8}")
    for record in records:
        click.echo(
            f"{record['customer']:<24} {record['meter']:<20} {record['window_start']:<21} "
            f"{record['value']:>20} {record['events']:>8}"
        )


AGGREGATOR_COMMANDS: list[click.Command] = [aggregate, totals]
