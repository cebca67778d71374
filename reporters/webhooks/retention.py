"""Retention of the webhook tables: nothing of them grows with history.

- ``stripe_webhook_events``: processed events go after ``METERSTREAM_WEBHOOK_EVENT_RETENTION_DAYS``
  (30). Stripe retries a delivery for up to 3 days, so a duplicate arriving later than that
  cannot happen; 30 days leave room for a manual resend from the Dashboard. Pending events
  are never pruned.
- ``payment_failures``: closed failures go once opened and closed more than
  ``METERSTREAM_PAYMENT_FAILURE_RETENTION_DAYS`` (35) ago (the row only guards against an
  older event arriving late).
- ``billing_alert_counts``: a count goes once its alert last triggered for its customer more
  than ``METERSTREAM_BILLING_ALERT_RETENTION_DAYS`` ago (400): otherwise every customer that
  ever crossed a threshold would stay for good. A later trigger counts afresh from 1.

Found through the tables' (status, next_attempt_at) and (state, opened_at) indexes; the alert
counts are read whole, one row per (alert, customer) triggered within the retention, so what
the read costs follows the alerts in hand, not the history.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, and_

from meterstream.retention import cutoff, delete_in_batches
from meterstream.schema import billing_alert_counts, payment_failures, stripe_webhook_events


@dataclass(frozen=True, slots=True)
class WebhookRetention:
    """Days each webhook table keeps its rows (the settings' defaults; see the docstring)."""

    event_days: int = 30
    failure_days: int = 35
    alert_days: int = 400


def prune(engine: Engine, now: datetime, batch_rows: int, keep: WebhookRetention) -> dict[str, int]:
    """Delete what retention let go; rows deleted per table."""
    events = stripe_webhook_events.c
    failures = payment_failures.c
    alerts = billing_alert_counts.c
    event_cutoff = cutoff(now, keep.event_days)
    failure_cutoff = cutoff(now, keep.failure_days)
    return {
        "stripe_webhook_events": delete_in_batches(
            engine,
            stripe_webhook_events,
            # next_attempt_at of a processed event is no later than its processing.
            and_(events.status == "processed", events.next_attempt_at < event_cutoff),
            batch_rows=batch_rows,
        ),
        "payment_failures": delete_in_batches(
            engine,
            payment_failures,
            and_(
                failures.state == "closed",
                failures.opened_at < failure_cutoff,
                failures.closed_at < failure_cutoff,
            ),
            batch_rows=batch_rows,
        ),
        "billing_alert_counts": delete_in_batches(
            engine,
            billing_alert_counts,
            alerts.last_triggered_at < cutoff(now, keep.alert_days),
            batch_rows=batch_rows,
        ),
    }
