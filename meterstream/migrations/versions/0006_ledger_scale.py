"""The ledger records the unit_scale each row was computed with.

Rows written before keep NULL; the reporter fills them in at start with the catalogue's
scale (the scale cannot have changed unnoticed before this column existed, as far as the
ledger can tell), then refuses to start on a scale that differs from the recorded one.

Revision ID: 0006
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from meterstream.schema import ExactDecimal

revision = "0006"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ledger") as batch:
        batch.add_column(sa.Column("unit_scale", ExactDecimal(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ledger") as batch:
        batch.drop_column("unit_scale")
