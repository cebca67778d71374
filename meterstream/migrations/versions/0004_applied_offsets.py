"""Each partition's applied offset, kept with the totals; each meter's recorded definition.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from meterstream.schema import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "applied_offsets",
        sa.Column("topic", sa.String(255), primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "meter_definitions",
        sa.Column("meter", sa.String(100), primary_key=True),
        sa.Column("aggregation", sa.String(20), nullable=False),
        sa.Column("window", sa.String(10), nullable=False),
        sa.Column("unique_property", sa.String(200), nullable=True),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("meter_definitions")
    op.drop_table("applied_offsets")
