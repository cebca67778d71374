"""The reporter's tables: customer links and the ledger of meter events sent to Stripe.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from meterstream.schema import ExactDecimal, UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "customer_links",
        sa.Column("customer_id", sa.String(200), primary_key=True),
        sa.Column("stripe_customer_id", sa.String(255), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "ledger",
        sa.Column("customer_id", sa.String(200), primary_key=True),
        sa.Column("meter", sa.String(100), primary_key=True),
        sa.Column("window_start", UTCDateTime(), primary_key=True),
        sa.Column("revision", sa.BigInteger, primary_key=True),
        sa.Column("window_end", UTCDateTime(), nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("total", ExactDecimal(), nullable=False),
        sa.Column("accounted_total", ExactDecimal(), nullable=False),
        sa.Column("units_total", sa.BigInteger, nullable=False),
        sa.Column("value", sa.BigInteger, nullable=False),
        sa.Column("event_name", sa.String(100), nullable=False),
        sa.Column("stripe_customer_id", sa.String(255), nullable=False),
        sa.Column("timestamp", UTCDateTime(), nullable=False),
        sa.Column("identifier", sa.String(100), nullable=False, unique=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("first_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("error_code", sa.String(100), nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("stripe_request_id", sa.String(255), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("sent_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ledger_sequence", "ledger", ["customer_id", "meter", "sequence"], unique=True)
    op.create_index("ledger_by_status", "ledger", ["status", "updated_at"])


def downgrade() -> None:
    op.drop_table("ledger")
    op.drop_table("customer_links")
