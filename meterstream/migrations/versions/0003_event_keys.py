"""Deduplication keys cover customer and meter; unique_count keeps digests of its values.

Keys were (source, id): a request id recorded for two meters lost the second event. Keys are
now (source, id, customer, meter). Keys already written cannot be converted (only their digest
is kept), so ``seen_events_legacy`` records the last event day that may hold old ones, and the
aggregators look for an event's old key on those days as well (aggregators.dedup).

A value of 1,024 multibyte characters is up to 4 KB, more than a PostgreSQL btree key holds
(about 2,700 bytes): such a message failed its batch. The digest (blake2b, 16 bytes, the same
as aggregators.aggregation.unique_digest) has a fixed size. The values already stored are
hashed here, so the distinct counts of open windows carry on unchanged.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa
from alembic import op

from meterstream.schema import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_CHUNK = 10_000


def upgrade() -> None:
    _record_old_keys()
    _hash_unique_values()


def _record_old_keys() -> None:
    op.create_table("seen_events_legacy", sa.Column("until_day", sa.Date, primary_key=True))
    connection = op.get_bind()
    # Old keys are stored by event day; workers refused event times more than a few minutes
    # ahead, so none lies beyond the newest day already stored.
    newest = connection.execute(sa.text("SELECT max(event_day) FROM seen_events")).scalar()
    if newest is not None:
        if isinstance(newest, str):  # SQLite returns the text it stored
            newest = date.fromisoformat(newest)
        until = max(newest, datetime.now(UTC).date() + timedelta(days=1))
        table = sa.table("seen_events_legacy", sa.column("until_day", sa.Date()))
        connection.execute(table.insert(), [{"until_day": until}])


def _hash_unique_values() -> None:
    op.create_table(
        "unique_values_digest",
        sa.Column("customer_id", sa.String(200), primary_key=True),
        sa.Column("meter", sa.String(100), primary_key=True),
        sa.Column("window_start", UTCDateTime(), primary_key=True),
        sa.Column("value_digest", sa.LargeBinary(16), primary_key=True),
    )
    old = sa.table(
        "unique_values",
        sa.column("customer_id", sa.String()),
        sa.column("meter", sa.String()),
        sa.column("window_start", UTCDateTime()),
        sa.column("value", sa.String()),
    )
    new = sa.table(
        "unique_values_digest",
        sa.column("customer_id", sa.String()),
        sa.column("meter", sa.String()),
        sa.column("window_start", UTCDateTime()),
        sa.column("value_digest", sa.LargeBinary()),
    )
    connection = op.get_bind()
    rows = connection.execute(sa.select(old)).yield_per(_CHUNK)
    for chunk in rows.partitions():
        connection.execute(
            new.insert(),
            [
                {
                    "customer_id": row.customer_id,
                    "meter": row.meter,
                    "window_start": row.window_start,
                    "value_digest": _digest(row.value),
                }
                for row in chunk
            ],
        )
    op.drop_table("unique_values")
    op.rename_table("unique_values_digest", "unique_values")
    if connection.dialect.name == "postgresql":
        # The primary key's index keeps its old name otherwise; 0001 named it this way.
        op.execute("ALTER INDEX unique_values_digest_pkey RENAME TO unique_values_pkey")


def downgrade() -> None:
    # The values cannot be recovered from their digests.
    raise NotImplementedError("0003 keeps digests only; restore a backup to go back to 0002")


def _digest(value: str) -> bytes:
    return hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).digest()
