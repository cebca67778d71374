"""The reporter after many windows were reported: does a cycle's cost grow with history?

1. In process (part of ``python -m bench.report``): a stream cycle over fresh windows and a
   cycle with nothing due, after --history windows of the last 30 days were reported.
2. PostgreSQL, as a user runs it:

       python -m bench.report.history --postgres URL [--sizes 0,100000,1000000] [--due 1000]

   N windows already reported are written in bulk (window_totals and their ledger rows, by
   INSERT ... SELECT generate_series, not through the pipeline; then VACUUM ANALYZE, as
   autovacuum would), and ``meterstream report --once`` (nothing due; then --due windows due)
   and ``meterstream status`` are timed as processes of their own, median of 3, at each N,
   with the ratio to N = 0 in the same run and the disk bytes per window (window_totals,
   ledger and report_queue with their indexes). Target at 1,000,000: each <= 3x N = 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
from sqlalchemy import select

from aggregators.windows import window_bounds
from bench.common import broker, save
from bench.report.emulator import EmulatorProcess, emulator_process
from bench.report.reporter import API_KEY, METERS_FILE, STRIPE_RATE, database, reporter_for
from bench.report.throughput import Rate
from bench.report.windows import METERS, Window, write_windows
from meterstream.db import build_engine, migrate
from meterstream.meters import Catalogue, load_catalogue
from meterstream.schema import window_totals
from meterstream.settings import load_settings


@dataclass
class History:
    windows: int  # window totals (and ledger rows) already reported
    idle_cycle_s: float  # a cycle with nothing due
    fresh: Rate  # a stream cycle over the fresh windows


def history_cycles(
    emulator: EmulatorProcess,
    catalogue: Catalogue,
    fresh: Sequence[Window],
    history: int,
    postgres: str | None,
) -> History:
    """Report ``history`` windows spread over the last 30 days (2,000 customers, 3 meters),
    then time a cycle with nothing due and a stream cycle over ``fresh``."""
    customers = 2_000
    first = datetime.now(UTC) - timedelta(days=30)
    step = timedelta(days=29) / max(1, history // customers)
    past: dict[tuple[str, str, datetime], Window] = {}
    for i in range(history):
        meter, at = METERS[i % len(METERS)], first + step * (i // customers)
        start, end = window_bounds(at, catalogue.meters[meter].window)
        customer = f"cus_past{i % customers:06d}"
        past[(customer, meter, start)] = Window(customer, meter, start, end, Decimal(5), 1, 1, at)
    emulator.seed(sorted({w.customer_id for w in [*past.values(), *fresh]}))
    with database(postgres) as url:
        reporter, engine = reporter_for(url, emulator.url, catalogue, stream=True)
        try:
            write_windows(engine, list(past.values()), [])
            done = reporter.run_cycle()
            if postgres:  # the statistics autovacuum would have taken by now
                with engine.begin() as connection:
                    connection.exec_driver_sql("ANALYZE")
            started = time.perf_counter()
            idle = reporter.run_cycle()
            idle_s = time.perf_counter() - started
            write_windows(engine, fresh, [])
            started, cpu = time.perf_counter(), time.process_time()
            result = reporter.run_cycle()
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        finally:
            engine.dispose()
    if done.acknowledged != len(past) or idle.acknowledged or result.acknowledged != len(fresh):
        raise RuntimeError(f"history run did not deliver everything: {done}; {idle}; {result}")
    return History(len(past), idle_s, Rate(len(fresh), elapsed, cpu_seconds=cpu))


# --- PostgreSQL: the commands a user runs, against a database with N windows of history -----

SIZES = (0, 100_000, 1_000_000)
CUSTOMERS = 2_000
REPEATS = 3
# Window i of the history: customer i % C, meter (i // C) % M, the hour (i // (C * M)) + 1
# before ``base``; reported once (revision 1, sent), its ledger row the key's sequence k plus
# an offset (see grow_history).
_WINDOW = """
SELECT 'cus_past' || lpad((i %% %(c)s)::text, 6, '0') AS c,
       (%(meters)s::text[])[1 + (i / %(c)s) %% %(m)s] AS m,
       %(base)s::timestamptz - ((i / (%(c)s * %(m)s)) + 1) * interval '1 hour' AS s,
       i / (%(c)s * %(m)s) + 1 AS k, i
FROM generate_series(%(first)s::bigint, %(last)s::bigint - 1) AS i
"""
_FILL_TOTALS = f"""
INSERT INTO window_totals (customer_id, meter, window_start, window_end, value, events, revision,
                           last_event_time, first_applied_at, updated_at)
SELECT c, m, s, s + interval '1 hour', 5, 1, 1, s, s, s + interval '1 hour' FROM ({_WINDOW}) w
"""  # noqa: S608  # the module's own SQL, no outside text
_FILL_LEDGER = f"""
INSERT INTO ledger (customer_id, meter, window_start, revision, window_end, sequence, total,
                    accounted_total, units_total, value, event_name, stripe_customer_id,
                    timestamp, identifier, status, attempts, first_attempt_at, created_at,
                    updated_at, sent_at)
SELECT c, m, s, 1, s + interval '1 hour', %(sequences)s + k, 5, 5 * k, 5 * k, 5, m, c, s,
       'hist_' || i, 'sent',
       1, s + interval '1 hour', s + interval '1 hour', s + interval '1 hour',
       s + interval '1 hour'
FROM ({_WINDOW}) w
"""  # noqa: S608  # the module's own SQL, no outside text


@dataclass
class Measured:
    windows: int
    idle_s: float  # meterstream report --once, nothing due
    due_s: float  # meterstream report --once, DUE windows due
    status_s: float  # meterstream status
    bytes_per_window: float | None  # window_totals + ledger + report_queue, per history window


def grow_history(url: str, first: int, last: int, band: int) -> None:
    """Windows [first, last) of the history, written in bulk (not through the pipeline). Their
    ledger sequences start at ``band`` x 10^8, past those of rows written before (the due
    windows' rows follow the history written until then)."""
    if last <= first:
        return
    base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    params = {
        "c": CUSTOMERS,
        "m": len(METERS),
        "meters": "{" + ",".join(METERS) + "}",
        "base": base,
        "sequences": band * 100_000_000,
    }
    with psycopg.connect(url, autocommit=True) as connection:
        for start in range(first, last, 500_000):  # one transaction per half million
            chunk = {**params, "first": start, "last": min(last, start + 500_000)}
            connection.execute(_FILL_TOTALS, chunk)
            connection.execute(_FILL_LEDGER, chunk)
        connection.execute("VACUUM ANALYZE")  # what autovacuum would have done by now


def disk_bytes(url: str) -> int:
    with psycopg.connect(url) as connection:
        found = connection.execute(
            "SELECT sum(pg_total_relation_size(oid)) FROM pg_class WHERE relkind = 'r' "
            "AND relname IN ('window_totals', 'ledger', 'report_queue')"
        ).fetchone()
    return int(found[0]) if found else 0


def command(env: dict[str, str], *args: str) -> float:
    """Seconds for ``meterstream *args`` as a user runs it (a process of its own)."""
    started = time.perf_counter()
    done = subprocess.run(  # our own command, fixed arguments
        [str(Path(sys.executable).parent / "meterstream"), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"meterstream {' '.join(args)}: exit {done.returncode}: {done.stderr}")
    return elapsed


def measure(url: str, env: dict[str, str], catalogue: Catalogue, due: Sequence[Window]) -> Measured:
    """Median of REPEATS runs of each command; each due cycle finds ``due`` changed again."""
    idle, cycles, status = [], [], []
    for _ in range(REPEATS):
        idle.append(command(env, "report", "--once"))
        write_due(url, due)
        cycles.append(command(env, "report", "--once"))
        status.append(command(env, "status"))
    return Measured(
        0, statistics.median(idle), statistics.median(cycles), statistics.median(status), None
    )


def write_due(url: str, due: Sequence[Window]) -> None:
    """Change every window of ``due`` (insert it the first time), as the aggregators would."""
    engine = build_engine(load_settings(database_url=url))
    try:
        with engine.connect() as connection:
            found = connection.execute(
                select(window_totals.c.revision).where(
                    window_totals.c.customer_id == due[0].customer_id,
                    window_totals.c.meter == due[0].meter,
                    window_totals.c.window_start == due[0].start,
                )
            ).scalar()
        for window in due:
            window.revision = (found or 0) + 1
            window.value = Decimal(window.revision * 3)
        write_windows(engine, [] if found else due, due if found else [])
    finally:
        engine.dispose()


def history_run(
    emulator: EmulatorProcess,
    catalogue: Catalogue,
    admin_url: str,
    sizes: Sequence[int],
    due_count: int,
) -> list[Measured]:
    """At each size (growing one database), time the idle cycle, a cycle with ``due_count``
    due windows, and status, each as the command a user runs."""
    at = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    due = [
        Window(
            f"cus_past{i // len(METERS):06d}",
            METERS[i % len(METERS)],
            at,
            at + timedelta(hours=1),
            Decimal(0),
            1,
            1,
            at + timedelta(minutes=5),
        )
        for i in range(due_count)
    ]
    emulator.seed(sorted({w.customer_id for w in due}))
    results = []
    with database(admin_url) as url:
        env = {
            **os.environ,
            "METERSTREAM_DATABASE_URL": url,
            "METERSTREAM_STRIPE_API_KEY": API_KEY,
            "METERSTREAM_STRIPE_API_BASE": emulator.url,
            "METERSTREAM_STRIPE_RATE": str(STRIPE_RATE),
            "METERSTREAM_METERS_FILE": str(METERS_FILE),
            "METERSTREAM_METRICS_PORT": "0",
        }
        engine = build_engine(load_settings(database_url=url))
        migrate(engine)
        engine.dispose()
        # Untimed: the first reporter run creates the ledger mark's topic in Kafka, a one-off
        # that would otherwise inflate the empty database's figures.
        command(env, "report", "--once")
        grown = 0
        for band, size in enumerate(sorted(sizes), start=1):
            grow_history(url, grown, size, band)
            grown = size
            found = measure(url, env, catalogue, due)
            found.windows = size
            found.bytes_per_window = disk_bytes(url) / size if size else None
            results.append(found)
            print_measured(found, results[0])
    return results


def print_measured(found: Measured, empty: Measured) -> None:
    per_window = f", {found.bytes_per_window:,.0f} bytes/window" if found.bytes_per_window else ""
    print(
        f"{found.windows:>12,} windows: idle cycle {found.idle_s:.2f} s "
        f"({found.idle_s / empty.idle_s:.2f}x), cycle with due windows {found.due_s:.2f} s "
        f"({found.due_s / empty.due_s:.2f}x), status {found.status_s:.2f} s "
        f"({found.status_s / empty.status_s:.2f}x){per_window}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report.history", description=__doc__)
    parser.add_argument(
        "--postgres",
        default=os.environ.get("METERSTREAM_BENCH_POSTGRES_URL"),
        required=not os.environ.get("METERSTREAM_BENCH_POSTGRES_URL"),
        help="admin URL of a PostgreSQL server",
    )
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, SIZES)),
        help="windows of history, comma-separated (0 is always measured; 10000000 for the long "
        "run)",
    )
    parser.add_argument("--due", type=int, default=1_000, help="due windows in the measured cycle")
    parser.add_argument(
        "--section",
        default="report_history",
        help="bench/results.json section to write (make bench writes report_history_quick, "
        "leaving the 1M/10M figures of report_history as they were measured)",
    )
    args = parser.parse_args()
    sizes = sorted({0, *(int(s) for s in args.sizes.split(","))})
    catalogue = load_catalogue(METERS_FILE)
    # The reporter keeps its ledger mark in Kafka (reporters/marks.py): an embedded broker for
    # the run unless METERSTREAM_KAFKA_BOOTSTRAP names one.
    with broker() as bootstrap, emulator_process(catalogue) as emulator:
        os.environ["METERSTREAM_KAFKA_BOOTSTRAP"] = bootstrap  # the commands' environment
        results = history_run(emulator, catalogue, args.postgres, sizes, args.due)
    empty = results[0]
    save(
        args.section,
        {
            "backend": "PostgreSQL",
            "due_windows": args.due,
            "repeats_median_of": REPEATS,
            "sizes": [
                {
                    "windows": r.windows,
                    "idle_cycle_s": round(r.idle_s, 3),
                    "idle_cycle_ratio": round(r.idle_s / empty.idle_s, 2),
                    "due_cycle_s": round(r.due_s, 3),
                    "due_cycle_ratio": round(r.due_s / empty.due_s, 2),
                    "status_s": round(r.status_s, 3),
                    "status_ratio": round(r.status_s / empty.status_s, 2),
                    "bytes_per_window": round(r.bytes_per_window) if r.bytes_per_window else None,
                }
                for r in results
            ],
            "target": "each <= 3x the empty database at 1,000,000 windows",
        },
    )


if __name__ == "__main__":
    main()
