"""The deployment id: one random id per database, part of every new meter event identifier.

Rows already in the ledger keep the identifiers they were sent with.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from meterstream.deployment import new_deployment_id
from meterstream.schema import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "deployment",
        sa.Column("singleton", sa.Integer, primary_key=True),
        sa.Column("deployment_id", sa.String(32), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("restore_held_at", UTCDateTime(), nullable=True),
        sa.Column("restore_mark_rows", sa.BigInteger, nullable=True),
        sa.Column("ledger_rows_written", sa.BigInteger, nullable=False, server_default="0"),
        sa.CheckConstraint("singleton = 1", name="deployment_one_row"),
    )
    op.bulk_insert(
        table,
        [{"singleton": 1, "deployment_id": new_deployment_id(), "created_at": datetime.now(UTC)}],
    )
    # The ledger written before this migration counts once; from here on each insert counts.
    op.execute("UPDATE deployment SET ledger_rows_written = (SELECT count(*) FROM ledger)")


def downgrade() -> None:
    op.drop_table("deployment")
