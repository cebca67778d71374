"""Stripe's meter event summaries, as reconcile and settle read them: one value per meter and
customer over a minute-aligned range, or one per combination of dimension values.

A meter with dimensions is summarised grouped by them (``dimension_group_by_keys``): Stripe
answers one summary per combination, naming its values, which become meterstream's canonical
combination key (meterstream.dimensions), so each is compared with its own ledger and windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from functools import partial
from typing import Any, Protocol

import stripe

from meterstream.dimensions import combination_key
from reporters.pages import all_items
from reporters.stripe_push import StripeGateway


class SummarySource(Protocol):
    """What reconcile asks Stripe: a total, or the totals per combination."""

    def __call__(self, meter_id: str, stripe_customer_id: str, start_s: int, end_s: int) -> Decimal:
        """Stripe's aggregated value for one meter and customer over [start_s, end_s)."""
        ...

    def grouped(
        self,
        meter_id: str,
        stripe_customer_id: str,
        start_s: int,
        end_s: int,
        dimensions: Sequence[str],
    ) -> dict[str, Decimal]:
        """The same, per combination (its canonical key) of ``dimensions``' values."""
        ...


class StripeSummaries:
    """SummarySource through the SDK, each page paced by the gateway like every call."""

    def __init__(self, client: stripe.StripeClient, gateway: StripeGateway) -> None:
        self._client = client
        self._gateway = gateway

    def _summaries(
        self,
        meter_id: str,
        stripe_customer_id: str,
        start_s: int,
        end_s: int,
        group_by: Sequence[str] | None = None,
    ) -> list[Any]:
        params: dict[str, Any] = {
            "customer": stripe_customer_id,
            "start_time": start_s,
            "end_time": end_s,
        }
        if group_by is not None:
            params["dimension_group_by_keys"] = list(group_by)

        def page(page_params: Any) -> Any:
            summaries = self._client.v1.billing.meters.event_summaries
            return self._gateway.call(partial(summaries.list, meter_id, params=page_params))

        return list(all_items(page, params))

    def __call__(self, meter_id: str, stripe_customer_id: str, start_s: int, end_s: int) -> Decimal:
        found = self._summaries(meter_id, stripe_customer_id, start_s, end_s)
        return sum((Decimal(str(s.aggregated_value)) for s in found), Decimal(0))

    def grouped(
        self,
        meter_id: str,
        stripe_customer_id: str,
        start_s: int,
        end_s: int,
        dimensions: Sequence[str],
    ) -> dict[str, Decimal]:
        totals: dict[str, Decimal] = {}
        for summary in self._summaries(meter_id, stripe_customer_id, start_s, end_s, dimensions):
            named = getattr(summary, "dimensions", None)
            values = named.to_dict() if named is not None else {}
            key = combination_key({d: str(values.get(d, "")) for d in dimensions})
            totals[key] = totals.get(key, Decimal(0)) + Decimal(str(summary.aggregated_value))
        return totals
