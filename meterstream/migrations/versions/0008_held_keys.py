"""The (customer, meter) pairs the reporter holds for a failure of their own, for status.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from meterstream.schema import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "held_keys",
        sa.Column("customer_id", sa.String(200), primary_key=True),
        sa.Column("meter", sa.String(100), primary_key=True),
        sa.Column("reason", sa.String(50), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("held_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("held_keys")
