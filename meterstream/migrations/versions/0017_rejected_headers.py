"""The Kafka headers of a rejected message, so a binary-mode CloudEvent (its attributes are
headers, its value only the data) can be replayed whole.

Revision ID: 0017
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("rejected_events", sa.Column("headers", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rejected_events") as batch:
        batch.drop_column("headers")
