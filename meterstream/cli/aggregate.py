"""The aggregators' commands for the ``meterstream`` command line."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

import click
import orjson

from meterstream.cli.exits import failed, settings_or_exit
from meterstream.cli.json_output import utc_text
from meterstream.cli.logs import LOG_LEVELS, LogLevel, LogOptions, logging_config
from meterstream.errors import MeterstreamError
from meterstream.events import format_value
from meterstream.settings import Settings


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
@click.option(
    "--group-by",
    "group_by",
    multiple=True,
    help="with --meter: one total per value of this dimension (repeat it, or separate names "
    "by commas); exact, as the meter's aggregation merges",
)
@click.option(
    "--since",
    default=None,
    help="with --group-by: windows starting at or after this time (ISO 8601, or 90m, 6h, 2d)",
)
@click.option("--json", "as_json", is_flag=True, help="one JSON array of objects")
def totals(
    customer: str | None,
    meter: str | None,
    group_by: tuple[str, ...],
    since: str | None,
    as_json: bool,
) -> None:
    """Print window totals (exact values) from the database; a meter with dimensions has one
    per combination of their values, or per group with --group-by."""
    settings = settings_or_exit()
    names = [name.strip() for item in group_by for name in item.split(",") if name.strip()]
    if group_by or since is not None:
        if meter is None:
            raise click.UsageError("--group-by and --since need --meter")
        records = _grouped(settings, meter, customer, names, since)
    else:
        records = _stored(settings, customer, meter)
    if as_json:
        click.echo(orjson.dumps(records).decode())
        return
    click.echo(
        f"{'customer':<24} {'meter':<20} {'window_start':<21} {'value':>20} {'events':>8}  group"
    )
    for record in records:
        group = " ".join(f"{k}={v}" for k, v in record["dimensions"].items())
        click.echo(
            f"{record['customer']:<24} {record['meter']:<20} {record['window_start']:<21} "
            f"{record['value']:>20} {record['events']:>8}  {group}"
        )


def _stored(settings: Settings, customer: str | None, meter: str | None) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from meterstream.db import build_engine
    from meterstream.dimensions import combination_values
    from meterstream.schema import window_totals

    engine = build_engine(settings)
    c = window_totals.c
    query = select(
        c.customer_id, c.meter, c.window_start, c.window_end, c.combination, c.value, c.events
    ).where(c.revision > 0)
    if customer is not None:
        query = query.where(c.customer_id == customer)
    if meter is not None:
        query = query.where(c.meter == meter)
    query = query.order_by(c.customer_id, c.meter, c.window_start, c.combination)
    try:
        with engine.connect() as connection:
            rows = connection.execute(query).all()
    finally:
        engine.dispose()
    return [
        _record(
            row.customer_id,
            row.meter,
            row.window_start,
            row.window_end,
            combination_values(row.combination),
            row.value,
            row.events,
        )
        for row in rows
    ]


def _grouped(
    settings: Settings, meter: str, customer: str | None, names: list[str], since: str | None
) -> list[dict[str, Any]]:
    from meterstream.cli.dead_letters import parse_since
    from meterstream.db import build_engine
    from meterstream.grouped_totals import grouped_totals
    from meterstream.meters import load_catalogue

    try:
        found = load_catalogue(settings.meters_file).get(meter)
        if found is None:
            raise click.BadParameter(f"no meter {meter!r} in the catalogue", param_hint="--meter")
        engine = build_engine(settings)
        try:
            with engine.connect() as connection:
                grouped = grouped_totals(
                    connection,
                    found,
                    since=parse_since(since, datetime.now(UTC)),
                    until=None,
                    group_by=names,
                    customer_id=customer,
                )
        finally:
            engine.dispose()
    except MeterstreamError as exc:
        raise failed(exc) from exc
    return [
        _record(g.customer_id, meter, g.window_start, g.window_end, g.group, g.value, g.events)
        for g in grouped
    ]


def _record(
    customer: str,
    meter: str,
    window_start: datetime,
    window_end: datetime,
    dimensions: dict[str, str],
    value: Decimal,
    events: int,
) -> dict[str, Any]:
    return {
        "customer": customer,
        "meter": meter,
        "window_start": utc_text(window_start),
        "window_end": utc_text(window_end),
        "dimensions": dimensions,
        "value": format_value(value),
        "events": events,
    }


AGGREGATOR_COMMANDS: list[click.Command] = [aggregate, totals]
