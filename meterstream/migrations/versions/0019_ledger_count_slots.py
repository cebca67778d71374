"""The ledger's written-rows counter in a row per slot instead of one column of deployment:
with one row, every writer's insert waited for the previous writer's commit (about 4 ms of
disk each here), so the reporter's writers took turns.

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def _lock(table: str) -> None:
    """PostgreSQL: hold ``table`` before its counter is copied, until the migration commits. A
    reporter still writing holds its counter's row until its commit; the copy, a plain read,
    would not wait for it, and what it commits before the column or table is dropped would be
    lost (a mark taken with it then stays ahead of the ledger: a restore hold). SQLite's
    migration holds the whole database from its BEGIN IMMEDIATE."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")


def upgrade() -> None:
    _lock("deployment")
    op.create_table(
        "ledger_rows_written",
        sa.Column("slot", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("rows", sa.BigInteger, nullable=False),
    )
    op.execute(
        "INSERT INTO ledger_rows_written (slot, rows) SELECT 0, ledger_rows_written FROM deployment"
    )
    with op.batch_alter_table("deployment") as batch:
        batch.drop_column("ledger_rows_written")


def downgrade() -> None:
    _lock("ledger_rows_written")
    with op.batch_alter_table("deployment") as batch:
        batch.add_column(
            sa.Column("ledger_rows_written", sa.BigInteger, nullable=False, server_default="0")
        )
    op.execute(
        "UPDATE deployment SET ledger_rows_written = "
        "(SELECT coalesce(sum(rows), 0) FROM ledger_rows_written)"
    )
    op.drop_table("ledger_rows_written")
