"""Reporter delivery rate against the Stripe emulator's own capacity, same run; and Stripe calls
per million raw events.

    python -m bench.report [--windows N] [--customers C] [--postgres URL] [--profile]

The emulator (no rate limit) runs in a process of its own, so the reporter and the emulator do
not share one GIL (its handler sets TCP_NODELAY: see stripe_emulator/server.py).
Each run starts from a freshly seeded emulator account.
1. v1: a bare http.client posting pre-encoded form bodies to /v1/billing/meter_events from as
   many threads as the reporter's pool, one window per (customer, meter) like the reporter's
   rows; then one ``Reporter.run_cycle()`` (v1) over N seeded window totals.
2. v2 stream: a bare client on one thread (the reporter streams from one thread) creating a
   session and posting 100 JSON events per call; then one stream cycle over N fresh windows.
   The reporter's figure is the whole cycle (ledger writes, then sends); its send phase alone
   is shown too.
3. Calls per million raw events: a one-hour stream (uniform over customers, 3 meters, 100 raw
   events per customer) folded into window totals each METERSTREAM_REPORT_INTERVAL_S (60 s),
   the real reporter (stream mode) run after each interval; scaled down to --customers, and the
   same count computed for 1,000,000 events / 10,000 customers (checked against the run).
4. History: the same stream cycle over --windows fresh windows, after --history windows of
   the last 30 days were reported; and a cycle with nothing due. A cycle reads the report
   queue (what changed), not all history; ``python -m bench.report.history`` measures the
   commands at 1,000,000 windows and more on PostgreSQL.
Target (issue #7): the reporter delivers >= 0.8 of the bare client's events/s on each endpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from bench.common import save, table
from bench.report.calls import INTERVAL_S, RAW_PER_CUSTOMER_HOUR, measured_calls, modelled_calls
from bench.report.emulator import emulator_process
from bench.report.history import history_cycles
from bench.report.reporter import METERS_FILE, STRIPE_RATE, THREADS
from bench.report.throughput import bare_stream, bare_v1, reporter_cycle
from bench.report.windows import throughput_windows
from meterstream.meters import load_catalogue


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("--windows", type=int, default=6_000, help="windows per throughput run")
    parser.add_argument(
        "--customers", type=int, default=200, help="customers in the measured one-hour run"
    )
    parser.add_argument(
        "--full-customers", type=int, default=10_000, help="customers in the modelled hour"
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get("METERSTREAM_BENCH_POSTGRES_URL"),
        help="admin URL of a PostgreSQL server (default: throw-away SQLite files)",
    )
    parser.add_argument(
        "--history", type=int, default=50_000, help="windows already reported (history run)"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the reporter cycles")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    catalogue = load_catalogue(METERS_FILE)
    backend = "PostgreSQL" if args.postgres else "SQLite"
    with emulator_process(catalogue) as emulator:
        v1_windows = throughput_windows(catalogue, args.windows, "v1")
        customers = sorted({w.customer_id for w in v1_windows})
        emulator.seed(customers)
        bare1 = bare_v1(emulator.url, v1_windows, catalogue)
        print(f"bare v1 client: {bare1.per_s:,.0f} events/s")
        emulator.seed(customers)
        rep1 = reporter_cycle(emulator, catalogue, v1_windows, args.postgres, False, args.profile)
        print(f"reporter v1: {rep1.per_s:,.0f} events/s")

        v2_windows = throughput_windows(catalogue, args.windows, "v2")
        customers = sorted({w.customer_id for w in v2_windows})
        emulator.seed(customers)
        bare2 = bare_stream(emulator.url, v2_windows, catalogue)
        print(f"bare stream client: {bare2.per_s:,.0f} events/s")
        emulator.seed(customers)
        rep2 = reporter_cycle(emulator, catalogue, v2_windows, args.postgres, True, args.profile)
        print(f"reporter stream: {rep2.per_s:,.0f} events/s")

        past = history_cycles(
            emulator,
            catalogue,
            throughput_windows(catalogue, args.windows, "hist"),
            args.history,
            args.postgres,
        )
        print(f"reporter stream after {past.windows:,} windows: {past.fresh.per_s:,.0f} events/s")

        started = time.perf_counter()
        measured = measured_calls(emulator, catalogue, args.customers, args.postgres)
        print(f"measured hour: {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    full = modelled_calls(catalogue, args.full_customers)
    print(f"modelled hour: {time.perf_counter() - started:.1f} s")

    ratio1, ratio2 = rep1.per_s / bare1.per_s, rep2.per_s / bare2.per_s
    send2 = args.windows / rep2.send_seconds if rep2.send_seconds else None
    cpu1 = 1000 * (rep1.cpu_seconds or 0) / rep1.events
    cpu2 = 1000 * (rep2.cpu_seconds or 0) / rep2.events
    per_m = full.per_million
    figures = {
        "backend": backend,
        "windows": args.windows,
        "reporter_threads": THREADS,
        "stripe_rate_setting": STRIPE_RATE,
        "bare_v1_events_per_s": round(bare1.per_s),
        "reporter_v1_events_per_s": round(rep1.per_s),
        "reporter_v1_cpu_ms_per_event": round(cpu1, 2),
        "ratio_v1": round(ratio1, 3),
        "bare_stream_events_per_s": round(bare2.per_s),
        "reporter_stream_events_per_s": round(rep2.per_s),
        "reporter_stream_send_phase_events_per_s": round(send2) if send2 else None,
        "reporter_stream_cpu_ms_per_event": round(cpu2, 2),
        "ratio_stream": round(ratio2, 3),
        "history": {
            "windows_reported": past.windows,
            "idle_cycle_ms": round(past.idle_cycle_s * 1000),
            "reporter_stream_events_per_s": round(past.fresh.per_s),
            "reporter_stream_cpu_ms_per_event": round(
                1000 * (past.fresh.cpu_seconds or 0) / past.fresh.events, 2
            ),
        },
        "calls": {
            "report_interval_s": INTERVAL_S,
            "raw_events_per_customer_hour": RAW_PER_CUSTOMER_HOUR,
            "measured_with_reporter": {
                "customers": measured.customers,
                "raw_events": measured.raw_events,
                "meter_events": measured.meter_events,
                "meter_events_per_million_raw": round(measured.per_million(measured.meter_events)),
            },
            "counted_full_hour": {
                "customers": full.customers,
                "raw_events": full.raw_events,
                "meter_events": full.meter_events,
                "v1_calls_per_million_raw": round(per_m(full.meter_events)),
                "v1_calls_per_million_raw_by_meter": {
                    m: round(per_m(n)) for m, n in sorted(full.per_meter.items())
                },
                "stream_calls_per_million_raw": round(per_m(full.stream_calls)),
                "v1_calls_per_million_raw_one_cycle_per_hour": round(per_m(full.windows)),
            },
        },
        "targets": {"ratio_v1": 0.8, "ratio_stream": 0.8},
    }
    save("report", figures)
    by_meter = ", ".join(f"{m} {per_m(n):,.0f}" for m, n in sorted(full.per_meter.items()))
    table(
        f"report: {args.windows:,} windows per run, {backend}, emulator in its own process",
        [
            (f"bare v1 client ({THREADS} threads)", f"{bare1.per_s:,.0f} events/s"),
            ("reporter v1 (one cycle)", f"{rep1.per_s:,.0f} events/s, {cpu1:.2f} ms CPU/event"),
            ("ratio v1 (target >= 0.8)", f"{ratio1:.2f}"),
            ("bare stream client (1 thread, 100/call)", f"{bare2.per_s:,.0f} events/s"),
            (
                "reporter stream (one cycle)",
                f"{rep2.per_s:,.0f} events/s, {cpu2:.2f} ms CPU/event"
                + (f" (send phase alone {send2:,.0f}/s)" if send2 else ""),
            ),
            ("ratio stream (target >= 0.8)", f"{ratio2:.2f}"),
            (
                f"stream cycle after {past.windows:,} windows reported",
                f"{past.fresh.per_s:,.0f} events/s; a cycle with nothing due "
                f"{past.idle_cycle_s * 1000:,.0f} ms",
            ),
            (
                f"hour through the reporter: {measured.customers:,} customers",
                f"{measured.raw_events:,} raw -> {measured.meter_events:,} meter events "
                f"({measured.per_million(measured.meter_events):,.0f} per million raw)",
            ),
            (
                f"hour counted: {full.customers:,} customers",
                f"{full.raw_events:,} raw -> {full.meter_events:,} meter events",
            ),
            (
                f"Stripe calls per million raw ({INTERVAL_S} s cycles)",
                f"v1 {per_m(full.meter_events):,.0f} ({by_meter}); "
                f"stream {per_m(full.stream_calls):,.0f}",
            ),
            ("v1 calls per million raw, one cycle an hour", f"{per_m(full.windows):,.0f}"),
        ],
    )


if __name__ == "__main__":
    main()
