"""The v2 meter event stream on PostgreSQL in a catch-up (issue #15): events/s against Stripe's
planning figure and against the emulator's own capacity, measured in the same run.

    python -m bench.report.stream [--postgres URL] [--windows N] [--rounds R] [--profile]

Each round, with the emulator (no rate limit) in a process of its own and a fresh account:
1. the emulator's capacity: a bare client posting pre-encoded stream calls of 100 events from
   one thread (bench.report.throughput.bare_stream);
2. the reporter: one stream cycle over N fresh window totals in a fresh database (write the
   ledger rows, stamp, call, mark accepted), every event checked recorded by the emulator.
The figures printed are the median of the rounds, with every round shown.
Target (issue #15): the reporter >= 1.0 x Stripe's 10,000 events/s; 3x is the goal.

Then, with --latency-ms added to every call of an emulator of its own (Stripe is tens of ms
away, which the loopback hides), one cycle with one sending lane and one with the default
number: with one call in flight a lane sends at most 100 events a round trip.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics

from bench.common import save, table
from bench.report.emulator import emulator_process
from bench.report.reporter import METERS_FILE
from bench.report.throughput import Rate, bare_stream, reporter_cycle
from bench.report.windows import throughput_windows
from meterstream.meters import load_catalogue
from reporters.stream_sender import STREAM_LANES

# Stripe's planning figure for the v2 meter event stream (docs: 10,000 events/s per account).
STRIPE_STREAM_EVENTS_PER_S = 10_000.0
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def stream_rounds(
    postgres: str, windows: int, rounds: int, profile: bool
) -> tuple[list[Rate], list[Rate]]:
    """(bare client, reporter) rates of each round, in the same emulator process."""
    catalogue = load_catalogue(METERS_FILE)
    bare: list[Rate] = []
    reporter: list[Rate] = []
    with emulator_process(catalogue) as emulator:
        for round_number in range(rounds):
            fresh = throughput_windows(catalogue, windows, f"s{round_number}")
            customers = sorted({w.customer_id for w in fresh})
            emulator.seed(customers)
            bare.append(bare_stream(emulator.url, fresh, catalogue))
            emulator.seed(customers)
            reporter.append(reporter_cycle(emulator, catalogue, fresh, postgres, True, profile))
            print(
                f"round {round_number + 1}: emulator {bare[-1].per_s:,.0f} events/s, "
                f"reporter {reporter[-1].per_s:,.0f} events/s "
                f"({reporter[-1].per_s / STRIPE_STREAM_EVENTS_PER_S:.2f} x Stripe, "
                f"{reporter[-1].per_s / bare[-1].per_s:.2f} x emulator)",
                flush=True,
            )
    return bare, reporter


def latency_rounds(postgres: str, windows: int, latency_ms: float) -> dict[int, Rate]:
    """The reporter's rate by number of lanes (1, then the default), every call delayed."""
    catalogue = load_catalogue(METERS_FILE)
    rates: dict[int, Rate] = {}
    with emulator_process(catalogue, latency_s=latency_ms / 1000) as emulator:
        for lanes in sorted({1, STREAM_LANES}):
            fresh = throughput_windows(catalogue, windows, f"l{lanes}")
            emulator.seed(sorted({w.customer_id for w in fresh}))
            rates[lanes] = reporter_cycle(
                emulator, catalogue, fresh, postgres, True, False, lanes=lanes
            )
            print(
                f"{latency_ms:g} ms a call, {lanes} lane(s): {rates[lanes].per_s:,.0f} events/s",
                flush=True,
            )
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report.stream", description=__doc__)
    parser.add_argument(
        "--postgres",
        default=os.environ.get("METERSTREAM_BENCH_POSTGRES_URL", DEFAULT_POSTGRES),
        help="admin URL of a PostgreSQL server",
    )
    parser.add_argument("--windows", type=int, default=30_000, help="windows per cycle")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median shown)")
    parser.add_argument("--profile", action="store_true", help="py-spy the reporter cycles")
    parser.add_argument(
        "--latency-ms", type=float, default=20.0, help="a call's round trip for the lanes run"
    )
    parser.add_argument(
        "--latency-windows", type=int, default=5_000, help="windows of the lanes run's cycles"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    bare, reporter = stream_rounds(args.postgres, args.windows, args.rounds, args.profile)
    by_lanes = latency_rounds(args.postgres, args.latency_windows, args.latency_ms)
    emulator_per_s = statistics.median(r.per_s for r in bare)
    reporter_per_s = statistics.median(r.per_s for r in reporter)
    cpu_ms = statistics.median(1000 * (r.cpu_seconds or 0) / r.events for r in reporter)
    versus_stripe = reporter_per_s / STRIPE_STREAM_EVENTS_PER_S
    versus_emulator = reporter_per_s / emulator_per_s
    save(
        "report_stream",
        {
            "backend": "PostgreSQL",
            "windows": args.windows,
            "rounds": args.rounds,
            "emulator_events_per_s": round(emulator_per_s),
            "reporter_stream_events_per_s": round(reporter_per_s),
            "reporter_stream_events_per_s_rounds": [round(r.per_s) for r in reporter],
            "emulator_events_per_s_rounds": [round(r.per_s) for r in bare],
            "reporter_stream_cpu_ms_per_event": round(cpu_ms, 3),
            "ratio_vs_stripe_10000": round(versus_stripe, 2),
            "ratio_vs_emulator": round(versus_emulator, 3),
            "targets": {"ratio_vs_stripe_10000": 1.0, "goal_vs_stripe_10000": 3.0},
            "latency_ms": args.latency_ms,
            "latency_events_per_s_by_lanes": {
                str(lanes): round(rate.per_s) for lanes, rate in by_lanes.items()
            },
        },
    )
    table(
        f"report stream on PostgreSQL: {args.windows:,} windows a cycle, median of {args.rounds}",
        [
            ("emulator capacity (bare client, 100/call)", f"{emulator_per_s:,.0f} events/s"),
            (
                "reporter stream (one cycle)",
                f"{reporter_per_s:,.0f} events/s, {cpu_ms:.3f} ms CPU/event (rounds "
                + ", ".join(f"{r.per_s:,.0f}" for r in reporter)
                + ")",
            ),
            ("vs Stripe's 10,000 events/s (target >= 1.0, goal 3)", f"{versus_stripe:.2f}"),
            ("vs the emulator's capacity, same run", f"{versus_emulator:.2f}"),
            *(
                (
                    f"{args.latency_ms:g} ms a call, {lanes} sending lane(s)",
                    f"{rate.per_s:,.0f} events/s",
                )
                for lanes, rate in by_lanes.items()
            ),
        ],
    )


if __name__ == "__main__":
    main()
