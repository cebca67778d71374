"""An index on the ledger's meter event timestamp: reconcile reads the rows of its range and
the rows of an ``unknown`` row's minute through it, not the whole ledger.

Revision ID: 0011
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ledger_by_time", "ledger", ["timestamp"])


def downgrade() -> None:
    op.drop_index("ledger_by_time", table_name="ledger")
