"""``meterstream reconcile --since`` after a long outage: does it finish, and in what time?

    python -m bench.report.reconcile [--postgres URL] [--keys 70000] [--hours 20] [--unknown 1000]

A fresh PostgreSQL database gets ``--keys`` (customer, meter) pairs with one sent ledger row an
hour for ``--hours`` hours, written in bulk (INSERT ... SELECT generate_series, then ANALYZE),
``--unknown`` of them with their newest row ``unknown``. Reconcile then runs once from
``--hours`` ago against the emulator in a process of its own (no events: every line drifts,
which costs the same), paced at 10,000 calls/s so the emulator sets the pace. Printed: the
whole run, the Stripe calls made and their mean latency, lines compared and rows settled.
Measured once. Against Stripe itself the calls set the time: 70,000 at a live key's read
limit (about 100 calls/s) take about 12 minutes, at a sandbox's 25 calls/s about 47.
"""

from __future__ import annotations

import argparse
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg

from bench.aggregate import drop_database, fresh_database
from bench.report.emulator import emulator_process
from bench.report.reporter import API_KEY, METERS_FILE, STRIPE_RATE
from meterstream.db import build_engine, migrate
from meterstream.meters import load_catalogue
from meterstream.metrics import ReporterMetrics
from meterstream.settings import load_settings
from reporters.reconcile import reconcile
from reporters.service import connect, fetch_summary

METER = "tokens"
_FILL = """
INSERT INTO ledger (customer_id, meter, window_start, revision, window_end, sequence, total,
                    accounted_total, units_total, value, event_name, stripe_customer_id,
                    timestamp, identifier, status, attempts, first_attempt_at, created_at,
                    updated_at, sent_at, unit_scale)
SELECT c, %(meter)s, s, 1, s + interval '1 hour', h, 5, 5 * h, 5 * h, 5, %(meter)s, c,
       s + interval '10 minutes', 'rec_' || k || '_' || h,
       CASE WHEN k < %(unknown)s AND h = %(hours)s THEN 'unknown' ELSE 'sent' END,
       1, s + interval '1 hour', s + interval '1 hour', s + interval '1 hour',
       s + interval '1 hour', 1
FROM (SELECT k, h, 'cus_r' || lpad(k::text, 6, '0') AS c,
             %(base)s::timestamptz + (h - 1) * interval '1 hour' AS s
      FROM generate_series(0, %(keys)s - 1) AS k, generate_series(1, %(hours)s) AS h) w
"""


def run(admin_url: str, keys: int, hours: int, unknown: int) -> None:
    now = datetime.now(UTC)
    base = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours)
    url = fresh_database(admin_url)
    try:
        settings = load_settings(
            database_url=url,
            stripe_api_key=API_KEY,
            meters_file=METERS_FILE,
            metrics_port=0,
            stripe_rate=STRIPE_RATE,  # the emulator's pace, not a sandbox key's 25 calls/s
        )
        engine = build_engine(settings)
        migrate(engine)
        began = time.perf_counter()
        with psycopg.connect(
            url.replace("postgresql+psycopg", "postgresql"), autocommit=True
        ) as db:
            db.execute(
                _FILL,
                {"meter": METER, "keys": keys, "hours": hours, "unknown": unknown, "base": base},
            )
            db.execute("ANALYZE")
        print(f"wrote {keys * hours:,} ledger rows in {time.perf_counter() - began:.1f} s")
        catalogue = load_catalogue(METERS_FILE)
        with emulator_process(catalogue) as emulator:
            emulator.seed([])
            settings = settings.model_copy(update={"stripe_api_base": emulator.url})
            connected = connect(settings, catalogue, ReporterMetrics(), threading.Event())
            fetch = fetch_summary(connected)
            calls, inside = 0, 0.0

            def timed(meter_id: str, customer: str, start_s: int, end_s: int) -> Decimal:
                nonlocal calls, inside
                started = time.perf_counter()
                try:
                    return fetch(meter_id, customer, start_s, end_s)
                finally:
                    calls += 1
                    inside += time.perf_counter() - started

            began = time.perf_counter()
            found = reconcile(
                engine, catalogue, connected.stripe_meters, timed, base, datetime.now(UTC)
            )
            whole = time.perf_counter() - began
        engine.dispose()
    finally:
        drop_database(url, admin_url)
    print(
        f"reconcile --since {hours} h ago, {keys:,} pairs, {unknown:,} unknown rows: "
        f"{whole:.1f} s; {calls:,} Stripe summary calls, {inside / max(calls, 1) * 1000:.1f} ms "
        f"each on average (8 in flight); {len(found.lines):,} lines, "
        f"{len(found.settled):,} settled"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--keys", type=int, default=70_000)
    parser.add_argument("--hours", type=int, default=20)
    parser.add_argument("--unknown", type=int, default=1_000)
    arguments = parser.parse_args()
    run(arguments.postgres, arguments.keys, arguments.hours, arguments.unknown)


if __name__ == "__main__":
    main()
