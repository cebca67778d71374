"""Bytes on disk per row of each table (PostgreSQL, indexes and TOAST included), and what the
database holds once every retention is reached, at a few traffic levels.

    python -m bench.disk [--rows N] [--postgres ADMIN_URL]

Fills a fresh, migrated database with N rows per table shaped as meterstream writes them
(18-character customer ids, uuid event ids, 52-character identifiers, random 16-byte keys,
a distinct update time per row, 10,000 customers sharing each window's start and end),
then divides ``pg_total_relation_size`` by N after VACUUM ANALYZE. Deleted rows leave free
space that autovacuum hands to new rows, so the steady state is what the retention keeps.
"""

from __future__ import annotations

import argparse
import math
import os
import uuid

import psycopg

from bench.common import table
from meterstream.db import build_engine, migrate
from meterstream.settings import load_settings

_FILL = {
    "window_totals": """
        INSERT INTO window_totals SELECT
            'cus_' || substr(md5((i %% 10000)::text), 1, 14), 'tokens',
            timestamptz '2026-01-01' + (i / 10000) * interval '1 hour',
            timestamptz '2026-01-01' + (i / 10000 + 1) * interval '1 hour',
            round((random() * 100000)::numeric, 6), 360, 60,
            timestamptz '2026-01-01' + (i / 10000) * interval '1 hour',
            gen_random_uuid()::text, now(), now() - i * interval '1 millisecond'
        FROM generate_series(1, %(rows)s) AS i""",
    "ledger": """
        INSERT INTO ledger SELECT
            'cus_' || substr(md5((i %% 10000)::text), 1, 14), 'tokens',
            timestamptz '2026-01-01' + (i / 600000) * interval '1 hour', i / 10000,
            timestamptz '2026-01-01' + (i / 600000 + 1) * interval '1 hour', i / 10000,
            round((random() * 100000)::numeric, 6), round((random() * 1e9)::numeric, 6),
            (random() * 1e9)::bigint, (random() * 1000)::bigint, 'tokens',
            'cus_' || substr(md5((i %% 10000)::text), 1, 14), now(),
            'ms1_' || substr(md5(i::text) || md5((-i)::text), 1, 48), 'sent', 1, now(),
            NULL, NULL, 'req_' || substr(md5(i::text), 1, 14), now(),
            now() - i * interval '1 millisecond', now() - i * interval '1 millisecond'
        FROM generate_series(1, %(rows)s) AS i""",
    "seen_events": """
        INSERT INTO seen_events SELECT date '2026-01-01', decode(md5(i::text), 'hex')
        FROM generate_series(1, %(rows)s) AS i""",
    "unique_values": """
        INSERT INTO unique_values SELECT
            'cus_' || substr(md5((i %% 10000)::text), 1, 14), 'active_users',
            timestamptz '2026-01-01', decode(md5(i::text), 'hex')
        FROM generate_series(1, %(rows)s) AS i""",
    "rejected_events": """
        INSERT INTO rejected_events SELECT
            'meterstream.usage', i %% 8, i, decode(md5(i::text), 'hex'), 'invalid_event',
            'value: must be a finite number >= 0, got ''NaN''', gen_random_uuid()::text,
            'cus_' || substr(md5((i %% 10000)::text), 1, 14), 'tokens',
            convert_to(repeat(md5(i::text), 9), 'UTF8'), now() - i * interval '1 millisecond'
        FROM generate_series(1, %(rows)s) AS i""",
}
_SIZE = {
    "seen_events": "SELECT pg_total_relation_size('seen_events_20260101')",
}


def measure(admin_url: str, rows: int) -> dict[str, float]:
    """Bytes per row of each table, over ``rows`` rows, in a database made and dropped here."""
    name = f"meterstream_disk_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        engine = build_engine(load_settings(database_url=url))
        migrate(engine)
        engine.dispose()
        per_row: dict[str, float] = {}
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(
                "CREATE TABLE seen_events_20260101 PARTITION OF seen_events "
                "FOR VALUES FROM ('2026-01-01') TO ('2026-01-02')"
            )
            for table_name, fill in _FILL.items():
                connection.execute(fill, {"rows": rows})
                connection.execute(f"VACUUM ANALYZE {table_name}")
                size_sql = _SIZE.get(table_name, f"SELECT pg_total_relation_size('{table_name}')")
                found = connection.execute(size_sql).fetchone()
                assert found is not None  # one row, always
                per_row[table_name] = found[0] / rows
        return per_row
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# What the defaults keep: dedup keys for the horizon (35) + 2 day partitions, windows 60 days,
# the ledger 45 days (and the newest row of each window still kept), refusals 30 days.
KEY_DAYS, WINDOW_DAYS, LEDGER_DAYS, REJECTED_DAYS = 37, 60, 45, 30
REPORT_INTERVAL_S = 60.0
REJECTED_SHARE = 0.001  # one event in a thousand refused


def steady_state(per_row: dict[str, float], events_s: float, customers: int) -> dict[str, float]:
    """Bytes each table holds once every retention is reached (the same after a year as after
    two months), for one hourly sum meter per customer with its events spread evenly."""
    per_customer_s = events_s / customers
    # A cycle writes a row for an open window that changed since the last one.
    rows_per_hour = 3600 / REPORT_INTERVAL_S * (1 - math.exp(-per_customer_s * REPORT_INTERVAL_S))
    windows = customers * 24 * WINDOW_DAYS
    ledger_rows = customers * 24 * (rows_per_hour * LEDGER_DAYS + (WINDOW_DAYS - LEDGER_DAYS))
    return {
        "seen_events": events_s * 86_400 * KEY_DAYS * per_row["seen_events"],
        "window_totals": windows * per_row["window_totals"],
        "ledger": ledger_rows * per_row["ledger"],
        "rejected_events": events_s
        * REJECTED_SHARE
        * 86_400
        * REJECTED_DAYS
        * per_row["rejected_events"],
    }


def _size(total: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if total >= scale:
            return f"{total / scale:,.1f} {unit}"
    return f"{total:,.0f} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "METERSTREAM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    arguments = parser.parse_args()
    per_row = measure(arguments.postgres, arguments.rows)
    table(
        f"bytes per row over {arguments.rows:,} rows (PostgreSQL, indexes included)",
        [(name, f"{size:,.0f}") for name, size in per_row.items()],
    )
    for events_s in (1_000, 10_000):
        for customers in (10_000, 100_000):
            held = steady_state(per_row, events_s, customers)
            rows = [(name, _size(size)) for name, size in held.items()]
            table(
                f"{events_s:,} events/s, {customers:,} customers: {_size(sum(held.values()))}",
                rows,
            )


if __name__ == "__main__":
    main()
