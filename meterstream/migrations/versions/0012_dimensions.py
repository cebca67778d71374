"""Dimensions: totals per customer, window and combination of dimension values.

``window_totals``, ``unique_values`` and ``report_queue`` gain ``combination`` (the canonical
JSON of the values, meterstream.dimensions) and ``combination_digest`` (16 bytes of blake2b,
part of the primary key: a fixed size whatever the values' lengths). Both are empty for a meter
without dimensions, so every row written before keeps its meaning and its key.
``meter_definitions`` records each meter's dimensions and value_property: totals made with one
set of dimensions are wrong read with another (aggregators/definitions.py).

On PostgreSQL the new columns (constant defaults) are added without a rewrite, but each primary
key is rebuilt under an exclusive lock: stop the workers and the reporter for the upgrade (a few
seconds per million windows).

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_KEYED = {
    "window_totals": ["customer_id", "meter", "window_start"],
    "unique_values": ["customer_id", "meter", "window_start", "value_digest"],
    "report_queue": ["customer_id", "meter", "window_start"],
}


def upgrade() -> None:
    for table, key in _KEYED.items():
        _add_combination(table, key)
    with op.batch_alter_table("meter_definitions") as batch:
        batch.add_column(sa.Column("dimensions", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("value_property", sa.String(64), nullable=True))


def _add_combination(table: str, key: list[str]) -> None:
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
    new_key = [*key[:3], "combination_digest", *key[3:]]
    if postgres:
        for column in columns:
            op.add_column(table, column)
        op.drop_constraint(f"{table}_pkey", table, type_="primary")
        op.create_primary_key(f"{table}_pkey", table, new_key)
        return
    # SQLite cannot change a primary key in place: batch mode copies the table.
    with _new_key_expected(), op.batch_alter_table(table, recreate="always") as batch:
        for column in columns:
            batch.add_column(column)
        batch.create_primary_key(f"{table}_pkey", new_key)


@contextmanager
def _new_key_expected() -> Iterator[None]:
    """Batch mode warns that the copy's key differs from the reflected one: that is the point."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*specifies columns .* as primary_key=True")
        yield


def downgrade() -> None:
    with op.batch_alter_table("meter_definitions") as batch:
        batch.drop_column("value_property")
        batch.drop_column("dimensions")
    for table, key in _KEYED.items():
        # Rows of meters with dimensions have no place in the old key.
        op.execute(f"DELETE FROM {table} WHERE length(combination_digest) > 0")  # noqa: S608
        if op.get_bind().dialect.name == "postgresql":
            op.drop_constraint(f"{table}_pkey", table, type_="primary")
            op.drop_column(table, "combination_digest")
            op.drop_column(table, "combination")
            op.create_primary_key(f"{table}_pkey", table, key)
            continue
        with _new_key_expected(), op.batch_alter_table(table, recreate="always") as batch:
            batch.drop_column("combination_digest")
            batch.drop_column("combination")
            batch.create_primary_key(f"{table}_pkey", key)
