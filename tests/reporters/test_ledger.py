"""mark_all_acknowledged on PostgreSQL and SQLite: it reports the rows it updated, and says so
loudly (rolling back) when the updates do not match the rows it found pending."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, event, update
from sqlalchemy.dialects import postgresql

from meterstream.schema import ledger as ledger_table
from reporters import ledger
from reporters.ledger import AcknowledgementMismatchError, LedgerRow, all_rows

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)


def pending_row(sequence: int) -> LedgerRow:
    start = NOW - timedelta(hours=sequence + 2)
    end = start + timedelta(hours=1)
    return LedgerRow(
        customer_id="cus_a",
        meter="tokens",
        window_start=start,
        window_end=end,
        revision=1,
        sequence=sequence,
        total=Decimal(3),
        accounted_total=Decimal(3 * (sequence + 1)),
        units_total=3 * (sequence + 1),
        value=3,
        event_name="tokens",
        stripe_customer_id="cus_a",
        timestamp=start,
        identifier=ledger.identifier_for("cus_a", "tokens", start, end, 1),
        status="pending",
        attempts=1,
        first_attempt_at=NOW,
        error_code=None,
        last_error=None,
        stripe_request_id=None,
        created_at=NOW,
        updated_at=NOW,
        sent_at=None,
    )


def insert_pending(engine: Engine, count: int) -> list[str]:
    rows = [pending_row(n) for n in range(count)]
    with engine.begin() as connection:
        ledger.insert_rows(connection, rows)
    return [row.identifier for row in rows]


def test_acknowledgement_reports_the_rows_it_updated(migrated_engine: Engine) -> None:
    identifiers = insert_pending(migrated_engine, 3)
    assert ledger.mark_acknowledged(migrated_engine, identifiers[0], "sent", "req_0", NOW)

    marked = ledger.mark_all_acknowledged(
        migrated_engine, {i: f"req_{n}" for n, i in enumerate(identifiers)}, "sent", NOW
    )

    assert marked == set(identifiers[1:])  # the first was settled before
    assert {r.identifier: r.stripe_request_id for r in all_rows(migrated_engine)} == {
        identifiers[0]: "req_0",
        identifiers[1]: "req_1",
        identifiers[2]: "req_2",
    }


def test_acknowledgement_updating_fewer_rows_than_found_raises_and_rolls_back(
    migrated_engine: Engine,
) -> None:
    identifiers = insert_pending(migrated_engine, 3)
    settled = identifiers[1]

    # Between the select and the updates, a row stops being pending (what the row lock is
    # there to prevent), in the same transaction so neither database blocks on it.
    def settle_one_first(connection: Any, clauseelement: Any, *args: Any) -> None:
        if clauseelement is ledger._ACKNOWLEDGE:
            connection.execute(
                update(ledger_table)
                .where(ledger_table.c.identifier == settled)
                .values(status="rejected")
            )

    event.listen(migrated_engine, "before_execute", settle_one_first)
    try:
        with pytest.raises(AcknowledgementMismatchError, match=r"3 pending .* updated 2"):
            ledger.mark_all_acknowledged(
                migrated_engine, dict.fromkeys(identifiers, "req_x"), "sent", NOW
            )
    finally:
        event.remove(migrated_engine, "before_execute", settle_one_first)

    # Nothing of that transaction was committed: every row is still pending, unacknowledged.
    assert {(r.status, r.stripe_request_id) for r in all_rows(migrated_engine)} == {
        ("pending", None)
    }


def test_postgresql_locks_the_pending_rows_in_identifier_order() -> None:
    sql = str(ledger._STILL_PENDING.compile(dialect=postgresql.dialect()))

    assert sql.endswith("ORDER BY ledger.identifier FOR UPDATE")
