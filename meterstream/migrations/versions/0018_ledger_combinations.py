"""The ledger per combination of dimension values (issue #18, the reporter side).

``ledger`` gains ``combination`` (the canonical JSON of the dimension values,
meterstream.dimensions) and ``combination_digest`` (its 16 bytes, in the primary key: two
combinations of one window have their own revisions). Both are empty for a meter without
dimensions, so every row written before keeps its key and its identifier. The index
``ledger_by_combination`` finds the newest row of one (customer, meter, combination), which
carries that combination's running totals (the carry is kept per combination); it holds the
rows of meters with dimensions only, so the inserts of the others pay for no second index.

On PostgreSQL the new columns (constant defaults) are added without a rewrite, but the primary
key is rebuilt under an exclusive lock: stop the reporter for the upgrade.

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from alembic import op

from meterstream.errors import LedgerError

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

_OLD_KEY = ["customer_id", "meter", "window_start", "revision"]
_NEW_KEY = ["customer_id", "meter", "window_start", "combination_digest", "revision"]
_BY_COMBINATION = ["customer_id", "meter", "combination_digest", "sequence"]


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    # An empty blob, not an empty text: SQLite tells them apart in a key, and the code binds
    # bytes.
    empty_digest = sa.text("'\\x'::bytea" if postgres else "x''")
    columns: list[sa.Column[Any]] = [
        sa.Column("combination", sa.Text, nullable=False, server_default=""),
        sa.Column(
            "combination_digest", sa.LargeBinary(16), nullable=False, server_default=empty_digest
        ),
    ]
    if postgres:
        for column in columns:
            op.add_column("ledger", column)
        op.drop_constraint("ledger_pkey", "ledger", type_="primary")
        op.create_primary_key("ledger_pkey", "ledger", _NEW_KEY)
    else:
        # SQLite cannot change a primary key in place: batch mode copies the table.
        with _new_key_expected(), op.batch_alter_table("ledger", recreate="always") as batch:
            for column in columns:
                batch.add_column(column)
            batch.create_primary_key("ledger_pkey", _NEW_KEY)
    # Partial, as in meterstream/schema.py: rows without dimensions pay for no second index.
    has_combination = sa.text("length(combination_digest) > 0")
    op.create_index(
        "ledger_by_combination",
        "ledger",
        _BY_COMBINATION,
        unique=True,
        postgresql_where=has_combination,
        sqlite_where=has_combination,
    )


@contextmanager
def _new_key_expected() -> Iterator[None]:
    """Batch mode warns that the copy's key differs from the reflected one: that is the point."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*specifies columns .* as primary_key=True")
        yield


def downgrade() -> None:
    # Rows of meters with dimensions have no place in the old key: a downgrade with such rows
    # would lose billing history, so it refuses instead.
    found = op.get_bind().execute(
        sa.text("SELECT count(*) FROM ledger WHERE length(combination_digest) > 0")
    )
    if found.scalar_one():
        raise LedgerError(
            "the ledger holds rows of meters with dimensions: downgrading below 0018 would "
            "drop them; export them first (they are billing history) and delete them by hand"
        )
    op.drop_index("ledger_by_combination", "ledger")
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("ledger_pkey", "ledger", type_="primary")
        op.drop_column("ledger", "combination_digest")
        op.drop_column("ledger", "combination")
        op.create_primary_key("ledger_pkey", "ledger", _OLD_KEY)
        return
    with _new_key_expected(), op.batch_alter_table("ledger", recreate="always") as batch:
        batch.drop_column("combination_digest")
        batch.drop_column("combination")
        batch.create_primary_key("ledger_pkey", _OLD_KEY)
