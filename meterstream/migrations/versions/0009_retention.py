"""Indexes that let retention prune by age, a bounded batch at a time, without a table scan.

``window_totals`` is pruned by ``window_end`` (its key leads with the customer), and
``rejected_events`` by ``rejected_at``. The ledger is pruned through ``ledger_by_status``
(status, updated_at), which exists already.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("window_totals_by_end", "window_totals", ["window_end"])
    op.create_index("rejected_events_by_time", "rejected_events", ["rejected_at"])


def downgrade() -> None:
    op.drop_index("rejected_events_by_time", table_name="rejected_events")
    op.drop_index("window_totals_by_end", table_name="window_totals")
