"""The demo's Stripe account (meters and customers) and the usage it sends through the SDK."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import click
import stripe
from sqlalchemy import Engine

from meterstream.cli.demo.options import DemoOptions
from meterstream.events import UsageEvent
from meterstream.meters import Catalogue, Meter
from meterstream.settings import Settings

# The llm_tokens meter keeps a total per model (and region): the demo's events name one.
MODELS = ("gpt-small", "gpt-large", "embed-1")


@dataclass
class Traffic:
    """What was sent: counts, and each unique event once (the reference the database must match)."""

    sent: int = 0
    unique: int = 0
    duplicates: int = 0
    late: int = 0
    events: list[UsageEvent] = field(default_factory=list)


def prepare_stripe(
    client: stripe.StripeClient, catalogue: Catalogue, engine: Engine, count: int
) -> dict[str, str]:
    """Create the Stripe meters the catalogue needs (if missing) and one Stripe customer per
    demo customer, linked in the database. Returns app customer id -> Stripe customer id."""
    from reporters.customers import link_customer

    existing = stripe_meters_by_event_name(client)
    for meter in catalogue:
        if meter.stripe_event_name not in existing:
            params: dict[str, Any] = {
                "display_name": meter.description or meter.name,
                "event_name": meter.stripe_event_name,
                "default_aggregation": {"formula": meter.stripe_formula},
            }
            if meter.dimensions:
                # Its events carry these keys, and Stripe groups its summaries by them. Not in
                # the SDK's typed create parameters (16.1), so the parameters are a plain dict.
                params["dimension_payload_keys"] = list(meter.dimensions)
            client.v1.billing.meters.create(params)  # type: ignore[arg-type]
    links = {}
    now = datetime.now(UTC)
    run = uuid.uuid4().hex[:6]  # a database reused across runs keeps each run's customers apart
    for number in range(count):
        app_id = f"customer-{run}-{number:04d}"
        created = client.v1.customers.create({"name": app_id})
        link_customer(engine, app_id, created.id, now)
        links[app_id] = created.id
    return links


def stripe_meters_by_event_name(client: stripe.StripeClient) -> dict[str, Any]:
    """Every Stripe meter by event name, page after page: an account can hold more than the
    100 meters one page lists, and a meter missed there would be created twice."""
    from reporters.pages import all_items

    def page(params: Any) -> Any:
        return client.v1.billing.meters.list(params)

    return {meter.event_name: meter for meter in all_items(page, {"limit": 100})}


def send_traffic(
    settings: Settings, catalogue: Catalogue, customers: dict[str, str], options: DemoOptions
) -> Traffic:
    """Send ``options.events`` usage events through the SDK, duplicates and late ones included."""
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
                    "model": rng.choice(MODELS),
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
