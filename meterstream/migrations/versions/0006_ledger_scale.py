"""The ledger records the unit_scale each row was computed with.

Rows written before keep NULL. ``meter_scales`` holds each meter's scale: the reporter
records a meter's scale at its first start and refuses to start on another one.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from meterstream.schema import ExactDecimal, UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ledger") as batch:
        batch.add_column(sa.Column("unit_scale", ExactDecimal(), nullable=True))
    op.create_table(
        "meter_scales",
        sa.Column("meter", sa.String(100), primary_key=True),
        sa.Column("unit_scale", ExactDecimal(), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("meter_scales")
    with op.batch_alter_table("ledger") as batch:
        batch.drop_column("unit_scale")
