"""End to end: usage from UsageClient.record() to Stripe meter events at a steady load.

    python -m bench.e2e [--rate EVENTS_PER_S] [--seconds N]

Runs the real pipeline (embedded broker, one aggregator worker into PostgreSQL, the reporter
every second against the local Stripe emulator) under a steady load, with a probe event for
a customer of its own every 0.5 s; the lag of a probe is from record() to the moment Stripe
holds its meter event. Prints the load sustained and the lag p50/p99.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
import uuid
from decimal import Decimal
from pathlib import Path

from bench.aggregate import drop_database, fresh_database
from bench.common import broker, save, table, topic
from ingest import UsageClient
from meterstream.db import build_engine, migrate
from meterstream.meters import load_catalogue
from meterstream.processes import start_meterstream, stop_process
from meterstream.settings import Settings, load_settings
from stripe_emulator import run_stripe_emulator

ROOT = Path(__file__).resolve().parent.parent
CUSTOMERS = 1_000


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        stop_process(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=2_000, help="events/s to sustain")
    parser.add_argument("--seconds", type=int, default=40)
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "METERSTREAM_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = parser.parse_args()
    url = fresh_database(args.postgres)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with broker() as bootstrap, run_stripe_emulator(rate_limit_per_s=None) as emulator:
            # The reporter refuses to start unless every catalogue meter exists in Stripe.
            for meter in load_catalogue(ROOT / "examples" / "meters.toml"):
                emulator.state.create_meter(
                    display_name=meter.name,
                    event_name=meter.stripe_event_name,
                    formula=meter.stripe_formula,
                )
            customers = [f"cus_e2e{i:05d}" for i in range(CUSTOMERS)]
            probes = [f"cus_probe{i:05d}" for i in range(args.seconds * 2 + 10)]
            for customer in customers + probes:
                emulator.state.create_customer(customer_id=customer)
            settings = load_settings(
                kafka_bootstrap=bootstrap,
                topic=topic(bootstrap, f"bench-e2e-{uuid.uuid4().hex[:6]}"),
                consumer_group=f"bench-e2e-{uuid.uuid4().hex[:6]}",
                database_url=url,
                meters_file=ROOT / "examples" / "meters.toml",
                stripe_api_key="sk_test_benche2e",
                stripe_api_base=emulator.url,
                stripe_rate=5_000.0,
                report_interval_s=1.0,
                kafka_session_timeout_s=6.0,
                metrics_port=0,
                source="bench-e2e",
            )
            migrate(build_engine(settings))
            processes.append(start_meterstream(settings, "aggregate", "--loglevel", "error"))
            processes.append(start_meterstream(settings, "report"))
            try:
                sent, seen, produced = run_load(settings, emulator, customers, probes, args)
            finally:
                stop(processes)  # while the broker still runs, so the worker can leave cleanly
    finally:
        stop(processes)
        drop_database(url, args.postgres)
    lags = sorted(seen[probe] - sent[probe] for probe in seen)
    p50 = lags[len(lags) // 2]
    p99 = lags[min(len(lags) - 1, len(lags) * 99 // 100)]
    figures = {
        "target_rate_events_per_s": args.rate,
        "sustained_events_per_s": round(produced / args.seconds),
        "seconds": args.seconds,
        "probes": len(sent),
        "probes_in_stripe": len(seen),
        "lag_p50_s": round(p50, 2),
        "lag_p99_s": round(p99, 2),
    }
    save("e2e", figures)
    table(
        f"end to end: record() -> Stripe, {args.rate:,} events/s for {args.seconds} s",
        [
            ("events/s sustained", f"{figures['sustained_events_per_s']:,}"),
            ("probes reaching Stripe", f"{len(seen)} of {len(sent)}"),
            ("lag record() -> Stripe", f"p50 {p50:.2f} s, p99 {p99:.2f} s"),
        ],
    )


def run_load(
    settings: Settings,
    emulator: object,
    customers: list[str],
    probes: list[str],
    args: argparse.Namespace,
) -> tuple[dict[str, float], dict[str, float], int]:
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    state = emulator.state  # type: ignore[attr-defined]
    produced = 0

    def collect() -> None:
        for event in state.events:
            if event.customer_id in sent and event.customer_id not in seen:
                seen[event.customer_id] = time.perf_counter()

    with UsageClient(settings) as client:
        # Warm up: wait until a first event has gone all the way to Stripe.
        client.record(probes[-1], "tokens", 1)
        deadline = time.perf_counter() + 120
        while not any(e.customer_id == probes[-1] for e in state.events):
            if time.perf_counter() > deadline:
                raise SystemExit("the pipeline did not deliver a first event in 120 s")
            time.sleep(0.1)
        started = time.perf_counter()
        probe = 0
        while (elapsed := time.perf_counter() - started) < args.seconds:
            while produced < int(elapsed * args.rate):
                client.record(customers[produced % len(customers)], "tokens", Decimal(produced % 7))
                produced += 1
            if elapsed * 2 >= probe:
                client.record(probes[probe], "api_calls", 1)
                sent[probes[probe]] = time.perf_counter()
                probe += 1
            collect()
            time.sleep(0.002)
        client.flush(30)
    deadline = time.perf_counter() + 60
    while len(seen) < len(sent) and time.perf_counter() < deadline:
        collect()
        time.sleep(0.05)
    return sent, seen, produced


if __name__ == "__main__":
    main()
