"""The ledger records the unit_scale each row was computed with.

Rows written before keep NULL. ``meter_scales`` holds each meter's scale: the reporter
records a meter's scale at its first start and refuses to start on another one.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from datetime import UTC, datetime

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
    table = op.create_table(
        "meter_scales",
        sa.Column("meter", sa.String(100), primary_key=True),
        sa.Column("unit_scale", ExactDecimal(), nullable=True),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
    )
    # The meters the ledger already holds, scale unknown (NULL): the reporter checks their rows'
    # running totals against the catalogue's scale at its next start (reporters/scales.py).
    now = datetime.now(UTC)
    meters = op.get_bind().execute(sa.text("SELECT DISTINCT meter FROM ledger")).scalars()
    op.bulk_insert(
        table, [{"meter": meter, "unit_scale": None, "recorded_at": now} for meter in meters]
    )


def downgrade() -> None:
    op.drop_table("meter_scales")
    with op.batch_alter_table("ledger") as batch:
        batch.drop_column("unit_scale")
