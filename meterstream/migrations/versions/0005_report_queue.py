"""The report queue: the windows changed since the reporter last looked at them; and an index
of the ledger rows sent late, so ``meterstream status`` need not read every row to count them.

Filled once here with every window due now (the old comparison of all window totals with the
ledger), so nothing due before the upgrade is forgotten; from then on the aggregators queue
each change in the transaction that makes it.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from meterstream.schema import SENT_LATE, UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Due: the window's revision is not the newest the ledger reported (0 when it has none).
_FILL = """
INSERT INTO report_queue (customer_id, meter, window_start, revision)
SELECT w.customer_id, w.meter, w.window_start, w.revision
FROM window_totals w
LEFT JOIN (
    SELECT customer_id, meter, window_start, max(revision) AS revision
    FROM ledger GROUP BY customer_id, meter, window_start
) r ON r.customer_id = w.customer_id AND r.meter = w.meter AND r.window_start = w.window_start
WHERE w.revision <> coalesce(r.revision, 0)
"""


def upgrade() -> None:
    op.create_table(
        "report_queue",
        sa.Column("customer_id", sa.String(200), primary_key=True),
        sa.Column("meter", sa.String(100), primary_key=True),
        sa.Column("window_start", UTCDateTime(), primary_key=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.execute(_FILL)
    # status lists the rows sent late through this, instead of reading every row.
    op.create_index(
        "ledger_sent_late",
        "ledger",
        ["sent_at"],
        postgresql_where=sa.text(SENT_LATE["postgresql"]),
        sqlite_where=sa.text(SENT_LATE["sqlite"]),
    )


def downgrade() -> None:
    op.drop_index("ledger_sent_late", "ledger")
    op.drop_table("report_queue")
