"""A stream cycle after many windows were reported, and a cycle with nothing due: each cycle
compares every window total with the ledger, so its fixed cost grows with history."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from aggregators.windows import window_bounds
from bench.report.emulator import EmulatorProcess
from bench.report.reporter import database, reporter_for
from bench.report.throughput import Rate
from bench.report.windows import METERS, Window, write_windows
from meterstream.meters import Catalogue


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
