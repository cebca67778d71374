"""Reconcile and retention read the ledger by range, not whole (issues #15, #19).

- ``ledger_by_time``: the meter event timestamp. Reconcile reads the rows of its range and of
  an ``unknown`` row's minute through it; retention the rows whose windows went since its
  last pass.
- ``ledger_prune_marks``: where the last prune pass ended, and when it ran.
- ``report_queue.held_*``, ``checked_at``: windows the reporter holds are set aside in the
  queue, not read again every cycle (reporters/held_windows.py).

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from meterstream.schema import UTCDateTime

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ledger_by_time", "ledger", ["timestamp"])
    op.create_table(
        "ledger_prune_marks",
        sa.Column("singleton", sa.Integer, primary_key=True),
        sa.Column("updated_mark", UTCDateTime(), nullable=True),
        sa.Column("timestamp_mark", UTCDateTime(), nullable=True),
        sa.Column("full_pass_at", UTCDateTime(), nullable=True),
        sa.Column("last_pass_at", UTCDateTime(), nullable=True),
        sa.CheckConstraint("singleton = 1", name="ledger_prune_marks_one_row"),
    )
    with op.batch_alter_table("report_queue") as batch:
        batch.add_column(sa.Column("held_reason", sa.String(50), nullable=True))
        batch.add_column(sa.Column("held_revision", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("held_since", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("checked_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("report_queue") as batch:
        for name in ("checked_at", "held_since", "held_revision", "held_reason"):
            batch.drop_column(name)
    op.drop_table("ledger_prune_marks")
    op.drop_index("ledger_by_time", table_name="ledger")
