"""The HTTP API's keys: one row per key, its secret kept only as a SHA-256 digest.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from meterstream.schema import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("key_id", sa.String(16), nullable=False, unique=True),
        sa.Column("secret_sha256", sa.LargeBinary(32), nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("scope", sa.String(10), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.CheckConstraint("scope IN ('ingest', 'read', 'all')", name="api_keys_scope"),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
