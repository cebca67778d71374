"""``meterstream payments``: the invoices whose payment failed and that are not paid yet, from
Stripe's webhooks (reporters/webhooks/payments.py)."""

from __future__ import annotations

import click

from meterstream.cli.exits import settings_or_exit


@click.command()
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="one JSON array; amounts as integers in the currency's minor unit, times ISO-8601 UTC",
)
@click.option("--limit", type=click.IntRange(1), default=None, help="the oldest N only")
def payments(as_json: bool, limit: int | None) -> None:
    """Open payment failures, oldest first: invoice, customer, amount owed (minor units),
    attempts and Stripe's next retry. A failure closes when Stripe says the invoice is paid."""
    from meterstream.db import build_engine
    from reporters.webhooks.status import format_payments, payments_document

    engine = build_engine(settings_or_exit())
    try:
        items = payments_document(engine, limit)
    finally:
        engine.dispose()
    if as_json:
        from meterstream.cli.json_output import json_document

        click.echo(json_document(items))
        return
    click.echo(format_payments(items))


PAYMENT_COMMANDS = (payments,)
