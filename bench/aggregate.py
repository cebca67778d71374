"""Aggregator throughput into PostgreSQL against bare consumers that only decode, same run.

    python -m bench.aggregate [--events N] [--postgres URL] [--dimensions-only]

Pushes N events (10,000 customers, 3 meters) through the real broker, then reads them:
1. a bare aiokafka consumer that only decodes (the machine's limit);
2. a bare faust agent that only decodes (the framework's ceiling);
3. one meterstream worker into PostgreSQL (exact totals), with its peak RSS (its processes);
4. two meterstream workers in one group.
Then the delay from produce to visible total at a steady 5,000 events/s (p50, p99).
Targets (issue #4): 3 >= 0.7 x 2 and >= 10,000 events/s; RSS flat; p99 delay < 5 s.
5. one worker on a meter with two dimensions (10 models x 5 regions), beside 3.
Target (issue #18): 5 >= 0.8 x 3. ``--dimensions-only`` runs 3 and 5 alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import suppress
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import orjson
import psycopg
from aiokafka import AIOKafkaConsumer
from confluent_kafka import Producer
from sqlalchemy import func, select, text

from bench.common import broker, save, table, topic
from meterstream.db import build_engine, migrate
from meterstream.events import UsageEvent, encode_event
from meterstream.kafka import client_config
from meterstream.processes import start_meterstream
from meterstream.schema import window_totals
from meterstream.settings import Settings, load_settings

METERS = ("tokens", "api_calls", "peak_connections")
CUSTOMERS = 10_000
# The dimensioned run's meter: 10 models x 5 regions, so up to 50 rows per customer and window.
DIMENSIONED_METER = """
[meters.llm_tokens]
aggregation = "sum"
window = "1h"
stripe_event_name = "llm_tokens"
dimensions = ["model", "region"]
"""
MODELS = tuple(f"model-{i}" for i in range(10))
REGIONS = ("eu", "us", "ap", "sa", "af")
ROOT = Path(__file__).resolve().parent.parent


def produce(
    bootstrap: str,
    name: str,
    count: int,
    customer_prefix: str = "customer-",
    *,
    dimensioned: bool = False,
) -> None:
    producer = Producer(
        {
            **client_config(bootstrap),
            "enable.idempotence": True,
            "linger.ms": 5,
            "compression.type": "lz4",
        }
    )
    now = datetime.now(UTC)
    for i in range(count):
        customer = f"{customer_prefix}{i % CUSTOMERS}"
        if dimensioned:
            # model and region vary independently of the customer (i // CUSTOMERS), so each
            # customer's window gets many combinations.
            step = i // CUSTOMERS
            properties = {"model": MODELS[step % 10], "region": REGIONS[(step // 10) % 5]}
            meter = "llm_tokens"
        else:
            properties, meter = {}, METERS[i % 3]
        event = UsageEvent(
            uuid.uuid4().hex, "bench", customer, meter, Decimal(i % 1000) / 10, now, properties
        )
        while True:
            try:
                producer.produce(name, encode_event(event), customer.encode())
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(120)


async def _bare_aiokafka(bootstrap: str, name: str, count: int) -> float:
    consumer = AIOKafkaConsumer(
        name,
        bootstrap_servers=bootstrap,
        group_id=f"bench-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_partition_fetch_bytes=8 << 20,
    )
    await consumer.start()
    seen, started = 0, 0.0
    try:
        while seen < count:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batches.values():
                if not started:
                    started = time.perf_counter()
                for record in records:
                    orjson.loads(record.value)
                seen += len(records)
    finally:
        await consumer.stop()
    return count / (time.perf_counter() - started)


def bare_faust(bootstrap: str, name: str, count: int) -> float:
    with tempfile.NamedTemporaryFile("r", suffix=".rate") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.bare_faust",
                bootstrap,
                name,
                f"bench-faust-{uuid.uuid4().hex[:6]}",
                str(count),
                out.name,
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            process.wait(timeout=900)
        finally:
            if process.poll() is None:
                process.kill()
        return float(Path(out.name).read_text())


def worker_settings(settings: Settings, meters_file: Path | None = None) -> Settings:
    return settings.model_copy(
        update={
            "kafka_session_timeout_s": 6.0,
            "metrics_port": 0,
            "meters_file": meters_file or ROOT / "examples" / "meters.toml",
        }
    )


def rss_kib(pid: int) -> int:
    """RSS of ``pid`` and its children (the worker applies batches in a child process)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1])
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        with suppress(FileNotFoundError):  # it ended between the listing and the read
            total += rss_kib(int(child))
    return total


def run_workers(
    settings: Settings, count: int, workers: int, meters_file: Path | None = None
) -> tuple[float, list[int]]:
    """Events/s from the first applied event to the last, and each sample of worker RSS (KiB)."""
    engine = build_engine(settings)
    processes = [
        start_meterstream(
            worker_settings(settings, meters_file), "aggregate", "--loglevel", "error"
        )
        for _ in range(workers)
    ]
    rss: list[int] = []
    started = 0.0
    try:
        while True:
            with engine.connect() as connection:
                applied = connection.execute(
                    select(func.coalesce(func.sum(window_totals.c.events), 0))
                ).scalar_one()
            if applied and not started:
                started = time.perf_counter()
            rss.append(rss_kib(processes[0].pid))
            if applied >= count:
                return count / (time.perf_counter() - started), rss
            time.sleep(0.25)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(60)
        engine.dispose()


def delay_at_rate(settings: Settings, rate: int, seconds: int) -> tuple[float, float]:
    """Produce ``rate`` events/s for ``seconds`` with a probe customer every 0.1 s; the delay
    is from producing a probe to seeing its total. Returns (p50, p99) in seconds."""
    engine = build_engine(settings)
    process = start_meterstream(worker_settings(settings), "aggregate", "--loglevel", "error")
    producer = Producer({**client_config(settings.kafka_bootstrap), "linger.ms": 5})
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    try:
        # Warm up: wait until the worker applies a first probe.
        _send_probe(producer, settings.topic, "probe-warmup", sent)
        while not _probes_visible(engine, ["probe-warmup"]):
            time.sleep(0.1)
        sent.clear()
        started = time.perf_counter()
        sent_events = 0
        probe = 0
        while (elapsed := time.perf_counter() - started) < seconds:
            due = int(elapsed * rate)
            while sent_events < due:
                customer = f"customer-{sent_events % CUSTOMERS}"
                event = UsageEvent(
                    uuid.uuid4().hex, "bench", customer, "tokens", Decimal(1), datetime.now(UTC), {}
                )
                producer.produce(settings.topic, encode_event(event), customer.encode())
                sent_events += 1
            if elapsed * 10 >= probe:
                _send_probe(producer, settings.topic, f"probe-{probe}", sent)
                probe += 1
            producer.poll(0)
            for name in _probes_visible(engine, [p for p in sent if p not in seen]):
                seen[name] = time.perf_counter()
            time.sleep(0.005)
        producer.flush(30)
        deadline = time.perf_counter() + 60
        while len(seen) < len(sent) and time.perf_counter() < deadline:
            for name in _probes_visible(engine, [p for p in sent if p not in seen]):
                seen[name] = time.perf_counter()
            time.sleep(0.02)
    finally:
        process.terminate()
        process.wait(60)
        engine.dispose()
    delays = sorted(seen[name] - sent[name] for name in seen)
    return delays[len(delays) // 2], delays[min(len(delays) - 1, len(delays) * 99 // 100)]


def _send_probe(producer: Producer, name: str, customer: str, sent: dict[str, float]) -> None:
    event = UsageEvent(
        uuid.uuid4().hex, "bench", customer, "tokens", Decimal(1), datetime.now(UTC), {}
    )
    producer.produce(name, encode_event(event), customer.encode())
    sent[customer] = time.perf_counter()


def _probes_visible(engine: object, names: list[str]) -> list[str]:
    if not names:
        return []
    with engine.connect() as connection:  # type: ignore[attr-defined]
        rows = connection.execute(
            select(window_totals.c.customer_id).where(window_totals.c.customer_id.in_(names))
        )
        return [row.customer_id for row in rows]


def fresh_database(admin_url: str) -> str:
    name = f"meterstream_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str, admin_url: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def bytes_per_key(url: str) -> float:
    engine = build_engine(load_settings(database_url=url))
    with engine.connect() as connection:
        size, rows = connection.execute(
            text(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0), "
                "(SELECT count(*) FROM seen_events) FROM pg_inherits i "
                "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
                "WHERE p.relname = 'seen_events'"
            )
        ).one()
    engine.dispose()
    return float(size) / max(int(rows), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--delay-seconds", type=int, default=30)
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "METERSTREAM_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument(
        "--dimensions-only",
        action="store_true",
        help="only one worker without and with dimensions (issue #18's comparison)",
    )
    args = parser.parse_args()
    count = args.events
    if args.dimensions_only:
        dimensions_only(count, args.postgres)
        return
    figures: dict[str, object] = {"events": count, "customers": CUSTOMERS, "meters": len(METERS)}
    with broker() as bootstrap:
        run = uuid.uuid4().hex[:6]
        name = topic(bootstrap, f"bench-aggregate-{run}")
        produced = time.perf_counter()
        produce(bootstrap, name, count)
        print(f"produced {count:,} events in {time.perf_counter() - produced:.1f} s")
        bare_kafka = asyncio.run(_bare_aiokafka(bootstrap, name, count))
        print(f"bare aiokafka: {bare_kafka:,.0f} events/s")
        bare = bare_faust(bootstrap, name, count)
        print(f"bare faust: {bare:,.0f} events/s")
        results = {}
        for workers in (1, 2):
            url = fresh_database(args.postgres)
            try:
                settings = load_settings(
                    kafka_bootstrap=bootstrap,
                    topic=name,
                    database_url=url,
                    consumer_group=f"bench-worker-{workers}-{run}",
                )
                migrate(build_engine(settings))
                results[workers] = run_workers(settings, count, workers)
                print(f"{workers} worker(s): {results[workers][0]:,.0f} events/s")
                if workers == 1:
                    figures["dedup_bytes_per_key"] = round(bytes_per_key(url), 1)
            finally:
                drop_database(url, args.postgres)
        url = fresh_database(args.postgres)
        try:
            delay_topic = topic(bootstrap, f"bench-delay-{run}")
            settings = load_settings(
                kafka_bootstrap=bootstrap,
                topic=delay_topic,
                database_url=url,
                consumer_group=f"bench-delay-{run}",
            )
            migrate(build_engine(settings))
            p50, p99 = delay_at_rate(settings, 5_000, args.delay_seconds)
        finally:
            drop_database(url, args.postgres)
    one, rss = results[1]
    two, _ = results[2]
    quarter = max(1, len(rss) // 4)
    figures.update(
        bare_aiokafka_events_per_s=round(bare_kafka),
        bare_faust_events_per_s=round(bare),
        worker_events_per_s=round(one),
        ratio_to_bare_faust=round(one / bare, 3),
        ratio_to_bare_aiokafka=round(one / bare_kafka, 3),
        two_workers_events_per_s=round(two),
        two_workers_speedup=round(two / one, 2),
        peak_rss_mib=round(max(rss) / 1024, 1),
        rss_first_quarter_mib=round(max(rss[:quarter]) / 1024, 1),
        rss_last_quarter_mib=round(max(rss[-quarter:]) / 1024, 1),
        delay_p50_s=round(p50, 3),
        delay_p99_s=round(p99, 3),
        targets={"ratio_to_bare_faust": 0.7, "worker_events_per_s": 10_000, "delay_p99_s": 5},
    )
    save("aggregate", figures)
    table(
        f"aggregate: {count:,} events, {CUSTOMERS:,} customers, {len(METERS)} meters",
        [
            ("bare aiokafka (decode only)", f"{bare_kafka:,.0f} events/s"),
            ("bare faust agent (decode only)", f"{bare:,.0f} events/s"),
            ("meterstream worker -> PostgreSQL", f"{one:,.0f} events/s"),
            ("ratio to bare faust (target >= 0.7)", f"{one / bare:.2f}"),
            ("two workers", f"{two:,.0f} events/s ({two / one:.2f}x)"),
            (
                "worker RSS first / last quarter / peak",
                f"{figures['rss_first_quarter_mib']} / {figures['rss_last_quarter_mib']} / "
                f"{figures['peak_rss_mib']} MiB",
            ),
            ("produce -> total delay at 5,000/s", f"p50 {p50:.2f} s, p99 {p99:.2f} s (< 5 s)"),
            ("dedup key on disk", f"{figures['dedup_bytes_per_key']} bytes/key"),
        ],
    )


def one_worker(
    bootstrap: str, name: str, count: int, admin_url: str, meters_file: Path | None = None
) -> float:
    """Events/s of one worker applying ``count`` events of topic ``name`` into a fresh database."""
    url = fresh_database(admin_url)
    try:
        settings = load_settings(
            kafka_bootstrap=bootstrap,
            topic=name,
            database_url=url,
            consumer_group=f"bench-worker-{uuid.uuid4().hex[:6]}",
        )
        migrate(build_engine(settings))
        return run_workers(settings, count, 1, meters_file)[0]
    finally:
        drop_database(url, admin_url)


def dimensions_only(count: int, admin_url: str) -> None:
    """One worker on the dimensionless mix, then on a meter with two dimensions."""
    with broker() as bootstrap, tempfile.TemporaryDirectory() as work:
        run = uuid.uuid4().hex[:6]
        catalogue = Path(work) / "meters.toml"
        catalogue.write_text((ROOT / "examples" / "meters.toml").read_text() + DIMENSIONED_METER)
        plain_topic = topic(bootstrap, f"bench-plain-{run}")
        produce(bootstrap, plain_topic, count)
        plain = one_worker(bootstrap, plain_topic, count, admin_url)
        print(f"1 worker, no dimensions: {plain:,.0f} events/s")
        dimensioned_topic = topic(bootstrap, f"bench-dimensions-{run}")
        produce(bootstrap, dimensioned_topic, count, dimensioned=True)
        dimensioned = one_worker(bootstrap, dimensioned_topic, count, admin_url, catalogue)
        print(f"1 worker, 2 dimensions (10 x 5 values): {dimensioned:,.0f} events/s")
    figures = {
        "events": count,
        "customers": CUSTOMERS,
        "worker_events_per_s": round(plain),
        "dimensioned_events_per_s": round(dimensioned),
        "dimensioned_ratio": round(dimensioned / plain, 3),
        "targets": {"dimensioned_ratio": 0.8},
    }
    save("aggregate_dimensions", figures)
    table(
        f"aggregate with dimensions: {count:,} events, {CUSTOMERS:,} customers",
        [
            ("one worker, no dimensions", f"{plain:,.0f} events/s"),
            ("one worker, 2 dimensions (10 x 5 values)", f"{dimensioned:,.0f} events/s"),
            ("ratio (target >= 0.8)", f"{dimensioned / plain:.2f}"),
        ],
    )


if __name__ == "__main__":
    main()
