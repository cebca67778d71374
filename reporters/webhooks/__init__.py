"""Stripe's webhooks: verified, stored before they are acted on, then acted on from the table.

route (verify + store, answer 2xx) -> inbox (``stripe_webhook_events``) -> processor (one
transaction per event) -> meter_errors (ledger rows rejected, counts per meter) | payments
(open payment failures per invoice) | alerts (usage-threshold alerts per customer).
"""

from __future__ import annotations

from reporters.webhooks.inbox import InboxCounts, counts, failing
from reporters.webhooks.meter_errors import error_counts
from reporters.webhooks.payments import OpenFailure, at_risk, open_failures
from reporters.webhooks.processor import WebhookProcessor
from reporters.webhooks.verify import TOLERANCE_S, VerifiedEvent, verify

__all__ = [
    "TOLERANCE_S",
    "InboxCounts",
    "OpenFailure",
    "VerifiedEvent",
    "WebhookProcessor",
    "at_risk",
    "counts",
    "error_counts",
    "failing",
    "open_failures",
    "verify",
]
