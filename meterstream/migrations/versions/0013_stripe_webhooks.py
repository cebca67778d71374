"""Stripe webhooks: the events stored before they are acted on, open payment failures, meter
error counts and billing alert counts (reporters/webhooks/).

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from meterstream.schema import ExactDecimal, UTCDateTime

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stripe_webhook_events",
        sa.Column("event_id", sa.String(255), primary_key=True),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("payload_kind", sa.String(10), nullable=False),
        sa.Column("created", UTCDateTime(), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("deliveries", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("outcome", sa.String(20), nullable=True),
        sa.Column("processed_at", UTCDateTime(), nullable=True),
    )
    op.create_index(
        "stripe_webhook_events_due", "stripe_webhook_events", ["status", "next_attempt_at"]
    )
    op.create_table(
        "payment_failures",
        sa.Column("invoice_id", sa.String(255), primary_key=True),
        sa.Column("stripe_customer_id", sa.String(255), nullable=False),
        sa.Column("customer_id", sa.String(200), nullable=True),
        sa.Column("subscription_id", sa.String(255), nullable=True),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("reason", sa.String(30), nullable=False),
        sa.Column("failure_code", sa.String(100), nullable=True),
        sa.Column("amount_remaining", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_payment_attempt", UTCDateTime(), nullable=True),
        sa.Column("opened_at", UTCDateTime(), nullable=False),
        sa.Column("closed_at", UTCDateTime(), nullable=True),
        sa.Column("event_created", UTCDateTime(), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
    )
    op.create_index("payment_failures_by_state", "payment_failures", ["state", "opened_at"])
    op.create_index("customer_links_by_stripe_customer", "customer_links", ["stripe_customer_id"])
    op.create_table(
        "meter_error_counts",
        sa.Column("event_name", sa.String(100), primary_key=True),
        sa.Column("code", sa.String(100), primary_key=True),
        sa.Column("stripe_meter_id", sa.String(255), nullable=True),
        sa.Column("errors_total", sa.BigInteger, nullable=False),
        sa.Column("rows_rejected", sa.BigInteger, nullable=False),
        sa.Column("unidentified", sa.BigInteger, nullable=False),
        sa.Column("last_message", sa.Text, nullable=True),
        sa.Column("last_report_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "billing_alert_counts",
        sa.Column("alert_id", sa.String(255), primary_key=True),
        sa.Column("stripe_customer_id", sa.String(255), primary_key=True),
        sa.Column("customer_id", sa.String(200), nullable=True),
        sa.Column("triggered", sa.BigInteger, nullable=False),
        sa.Column("last_value", ExactDecimal(), nullable=True),
        sa.Column("last_triggered_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_index("customer_links_by_stripe_customer", table_name="customer_links")
    op.drop_table("billing_alert_counts")
    op.drop_table("meter_error_counts")
    op.drop_index("payment_failures_by_state", table_name="payment_failures")
    op.drop_table("payment_failures")
    op.drop_index("stripe_webhook_events_due", table_name="stripe_webhook_events")
    op.drop_table("stripe_webhook_events")
