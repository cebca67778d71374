"""Window totals, deduplication keys (partitioned by day in PostgreSQL), unique values, rejects.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from meterstream.schema import ExactDecimal, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "window_totals",
        sa.Column("customer_id", sa.String(200), primary_key=True),
        sa.Column("meter", sa.String(100), primary_key=True),
        sa.Column("window_start", UTCDateTime(), primary_key=True),
        sa.Column("window_end", UTCDateTime(), nullable=False),
        sa.Column("value", ExactDecimal(), nullable=False),
        sa.Column("events", sa.BigInteger, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("last_event_time", UTCDateTime(), nullable=True),
        sa.Column("last_event_id", sa.String(200), nullable=True),
        sa.Column("first_applied_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_index("window_totals_by_update", "window_totals", ["updated_at"])
    if op.get_bind().dialect.name == "postgresql":
        # Partitioned by event day: pruning past the horizon drops whole partitions (instant,
        # no vacuum), and the workers create each day's partition before they need it.
        op.execute(
            "CREATE TABLE seen_events (event_day date NOT NULL, key bytea NOT NULL, "
            "PRIMARY KEY (event_day, key)) PARTITION BY RANGE (event_day)"
        )
    else:
        op.create_table(
            "seen_events",
            sa.Column("event_day", sa.Date, primary_key=True),
            sa.Column("key", sa.LargeBinary(16), primary_key=True),
        )
    op.create_table(
        "unique_values",
        sa.Column("customer_id", sa.String(200), primary_key=True),
        sa.Column("meter", sa.String(100), primary_key=True),
        sa.Column("window_start", UTCDateTime(), primary_key=True),
        sa.Column("value", sa.String(1024), primary_key=True),
    )
    op.create_table(
        "rejected_events",
        sa.Column("topic", sa.String(255), primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("offset", sa.BigInteger, primary_key=True),
        sa.Column("raw_digest", sa.LargeBinary(16), primary_key=True),
        sa.Column("reason", sa.String(50), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("event_id", sa.String(200), nullable=True),
        sa.Column("customer_id", sa.String(200), nullable=True),
        sa.Column("meter", sa.String(100), nullable=True),
        sa.Column("raw", sa.LargeBinary, nullable=False),
        sa.Column("rejected_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    for table in ("rejected_events", "unique_values", "seen_events", "window_totals"):
        op.drop_table(table)
