"""SDK throughput against a bare idempotent confluent-kafka producer, in the same run.

    python -m bench.ingest [--events N] [--rounds R]

Targets (issue #3): the SDK reaches 0.3 of the bare producer and 100,000 events/s on one thread,
and record() stays non-blocking (p99 under 50 us while the broker keeps up).

The bare producer and the SDK take turns for R rounds on one broker, who goes first alternating
(the broker gets faster as it warms up); the ratio is the median of the rounds' ratios. Both
sides check afterwards that the topic holds exactly their messages. The rate loop is not
instrumented (two clock reads and an append per call cost about a third of a record());
record()'s latency is measured in a separate pass of the same size, every call timed.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal

from confluent_kafka import Producer

from bench.common import broker, save, table, topic
from ingest import UsageClient
from meterstream.events import UsageEvent, encode_event
from meterstream.kafka import client_config, end_offsets
from meterstream.meters import load_catalogue
from meterstream.settings import load_settings

CUSTOMERS = 10_000


def bare_producer(bootstrap: str, name: str, count: int) -> float:
    """Events/s of a bare idempotent producer sending pre-serialised messages."""
    now = datetime.now(UTC)
    payloads = [
        encode_event(
            UsageEvent(
                uuid.uuid4().hex,
                "bench",
                f"customer-{i % CUSTOMERS}",
                "tokens",
                Decimal(i % 1000),
                now,
                {},
            )
        )
        for i in range(10_000)
    ]
    keys = [f"customer-{i % CUSTOMERS}".encode() for i in range(10_000)]
    producer = Producer(
        {
            **client_config(bootstrap),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 100_000,
            # No delivery callback at all: the fastest baseline there is. Delivery is checked
            # afterwards on the topic's offsets.
        }
    )
    started = time.perf_counter()
    for i in range(count):
        while True:
            try:
                producer.produce(name, payloads[i % 10_000], keys[i % 10_000])
                break
            except BufferError:
                producer.poll(0.01)
        if i % 1000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    rate = count / (time.perf_counter() - started)
    check_delivered(bootstrap, name, count, left)
    return rate


def sdk(bootstrap: str, name: str, count: int) -> float:
    """Events/s of UsageClient.record() until all are acknowledged."""
    settings = load_settings(kafka_bootstrap=bootstrap, topic=name, source="bench")
    catalogue = load_catalogue(settings.meters_file)
    customers = [f"customer-{i}" for i in range(CUSTOMERS)]
    with UsageClient(settings, catalogue=catalogue) as client:
        record = client.record
        started = time.perf_counter()
        for i in range(count):
            record(customers[i % CUSTOMERS], "tokens", i % 1000)
        left = client.flush(120)  # raises DeliveryError if any event failed
        rate = count / (time.perf_counter() - started)
    check_delivered(bootstrap, name, count, left)
    return rate


def check_delivered(bootstrap: str, name: str, count: int, left: int) -> None:
    """Every message is on the topic, once: a rate with losses would mean nothing."""
    on_topic = sum(end_offsets(bootstrap, name).values())
    if left or on_topic != count:
        raise SystemExit(f"{name}: {left} left in flight, {on_topic:,} of {count:,} on the topic")


def record_latency(bootstrap: str, name: str, count: int) -> tuple[float, float]:
    """record() p50 and p99 in microseconds, every call timed."""
    settings = load_settings(kafka_bootstrap=bootstrap, topic=name, source="bench")
    catalogue = load_catalogue(settings.meters_file)
    durations = []
    customers = [f"customer-{i}" for i in range(CUSTOMERS)]
    with UsageClient(settings, catalogue=catalogue) as client:
        record = client.record
        for i in range(count):
            before = time.perf_counter_ns()
            record(customers[i % CUSTOMERS], "tokens", i % 1000)
            durations.append(time.perf_counter_ns() - before)
        client.flush(120)
    durations.sort()
    return durations[len(durations) // 2] / 1000, durations[len(durations) * 99 // 100] / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bares: list[float] = []
    rates: list[float] = []
    with broker() as bootstrap:
        run = uuid.uuid4().hex[:6]
        for turn in range(args.rounds):
            # Alternate who goes first: the broker gets faster as it warms up.
            for side in ("bare", "sdk") if turn % 2 == 0 else ("sdk", "bare"):
                name = topic(bootstrap, f"bench-{side}-{run}-{turn}")
                if side == "bare":
                    bares.append(bare_producer(bootstrap, name, args.events))
                else:
                    rates.append(sdk(bootstrap, name, args.events))
        p50, p99 = record_latency(bootstrap, topic(bootstrap, f"bench-latency-{run}"), args.events)
    bare, rate = statistics.median(bares), statistics.median(rates)
    ratios = [sdk_rate / bare_rate for sdk_rate, bare_rate in zip(rates, bares, strict=True)]
    ratio = statistics.median(ratios)
    figures = {
        "events": args.events,
        "rounds": args.rounds,
        "bare_producer_events_per_s": round(bare),
        "bare_producer_rounds": [round(each) for each in bares],
        "sdk_events_per_s": round(rate),
        "sdk_rounds": [round(each) for each in rates],
        "ratio": round(ratio, 3),
        "ratio_rounds": [round(each, 3) for each in ratios],
        "record_p50_us": round(p50, 1),
        "record_p99_us": round(p99, 1),
        "targets": {"ratio": 0.3, "sdk_events_per_s": 100_000, "record_p99_us": 50},
    }
    save("ingest", figures)
    table(
        f"ingest: {args.events:,} events, one thread, median of {args.rounds} rounds",
        [
            ("bare idempotent producer", f"{bare:,.0f} events/s"),
            ("UsageClient.record()", f"{rate:,.0f} events/s (target >= 100,000)"),
            ("ratio (target >= 0.3)", f"{ratio:.2f}  (rounds: {figures['ratio_rounds']})"),
            ("record() p50 / p99", f"{p50:.1f} / {p99:.1f} us (target p99 < 50 us)"),
        ],
    )


if __name__ == "__main__":
    main()
