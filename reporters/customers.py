"""Which Stripe customer an application customer's usage is billed to (table customer_links).

An application id that already starts with ``cus_`` is taken as the Stripe customer id itself.
Usage of any other id is held, not sent, until ``meterstream customers link`` names its Stripe
customer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import Engine, select

from meterstream.errors import ConfigError
from meterstream.schema import customer_links
from reporters.held_windows import release_customer

_STRIPE_CUSTOMER = re.compile(r"^cus_[A-Za-z0-9_]{1,250}$")


def stripe_customer_for(customer_id: str, links: Mapping[str, str]) -> str | None:
    """The Stripe customer id for ``customer_id``, or None while it is unlinked."""
    if customer_id.startswith("cus_"):
        return customer_id
    return links.get(customer_id)


def load_links(engine: Engine) -> dict[str, str]:
    """Every link, application id -> Stripe customer id."""
    with engine.connect() as connection:
        found = connection.execute(
            select(customer_links.c.customer_id, customer_links.c.stripe_customer_id)
        ).all()
    return {str(app_id): str(stripe_id) for app_id, stripe_id in found}


def link_customer(engine: Engine, customer_id: str, stripe_customer_id: str, now: datetime) -> None:
    """Link (or re-link) an application customer to a Stripe customer.

    Re-linking changes where future reports go; rows already in the ledger keep the customer
    they were written for, so a resend is the same request. Raises ConfigError on a bad id.
    """
    if not customer_id or len(customer_id) > 200:
        raise ConfigError(f"customer id must be 1 to 200 characters, got {customer_id!r}")
    if not _STRIPE_CUSTOMER.match(stripe_customer_id):
        raise ConfigError(
            f"Stripe customer id must look like cus_..., got {stripe_customer_id!r}; "
            "copy it from the Stripe dashboard or the Customers API"
        )
    with engine.begin() as connection:
        updated = connection.execute(
            customer_links.update()
            .where(customer_links.c.customer_id == customer_id)
            .values(stripe_customer_id=stripe_customer_id, updated_at=now)
        )
        if updated.rowcount == 0:
            connection.execute(
                customer_links.insert().values(
                    customer_id=customer_id,
                    stripe_customer_id=stripe_customer_id,
                    created_at=now,
                    updated_at=now,
                )
            )
        # Its held windows are due again, read by the next cycle (reporters/held_windows.py):
        # in this transaction, so no cycle sees the link without them.
        release_customer(connection, customer_id)
