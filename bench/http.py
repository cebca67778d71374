"""``POST /v1/events`` throughput: ``meterstream serve`` against the same stack serving an
endpoint that only parses the body and discards it, in the same run.

Batches of 100 and 1,000 events from several keep-alive connections (a small asyncio client
that writes prepared requests, so the client costs little of the shared cores). Every answer
must be 202; the events Kafka holds afterwards must equal the events answered 202.

A third server, the floor, parses the body and produces each event to Kafka through serve's
own producer (idempotent, acks=all, 202 once every event is acknowledged) without any rule:
serve / floor is what the rules, the key check and the routing cost; floor / baseline is what
Kafka itself costs on this machine (the broker shares its cores). Each server's CPU per event
(and the broker's) is read from /proc, since other work on the machine moves events/s.

Targets: at least 0.5 of the baseline and at least 30,000 events/s on one server process.
    python -m bench.http [--seconds 5] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response

from bench.common import broker_process, cpu_seconds, save, table, topic
from meterstream.api_keys import create_key
from meterstream.db import build_engine, migrate
from meterstream.embedded import free_port
from meterstream.kafka import end_offsets
from meterstream.processes import start_meterstream, stop_process
from meterstream.settings import Settings, environment_of, load_settings

SOURCE = "bench-http"
BATCHES = (100, 1000)
EXAMPLE_METERS = Path(__file__).resolve().parent.parent / "examples" / "meters.toml"
TARGET_RATIO = 0.5
TARGET_EVENTS_PER_S = 30_000


def baseline_app() -> FastAPI:
    """The same framework and server, an endpoint that parses the body and discards it."""
    app = FastAPI()

    @app.post("/v1/events", status_code=202)
    async def parse_and_discard(request: Request) -> Response:
        count = len(orjson.loads(await request.body()))
        return Response(b'{"accepted":%d}' % count, status_code=202)

    return app


def floor_app() -> FastAPI:
    """The baseline's endpoint that also produces every event to Kafka and answers 202 once
    Kafka acknowledged them all, through serve's own producer (ingest/http/acks.py), with no
    rule, no key and no re-check: what Kafka alone costs. Reads METERSTREAM_* (a process of
    its own, started by :func:`main`)."""
    from ingest.http.acks import RequestProducer
    from meterstream.metrics import HttpMetrics

    producer = RequestProducer(load_settings(), HttpMetrics())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await producer.close(10.0)

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/events", status_code=202)
    async def parse_and_produce(request: Request) -> Response:
        messages = _messages(await request.body())
        await producer.produce_all(messages)
        return Response(b'{"accepted":%d}' % len(messages), status_code=202)

    return app


def _messages(body: bytes) -> list[tuple[bytes, bytes]]:
    # The parsed documents die here, not held while Kafka acknowledges (as serve does).
    dumps = orjson.dumps
    return [(doc["subject"].encode(), dumps(doc)) for doc in orjson.loads(body)]


@dataclass
class Run:
    events_per_s: float
    p99_ms: float
    accepted: int
    # CPU seconds per event of the server process (all its threads) and of the broker.
    server_cpu_us: float = 0.0
    server_loop_cpu_us: float = 0.0  # of which the main thread (the event loop)
    broker_cpu_us: float | None = None


def _bodies(batch: int, variants: int) -> list[bytes]:
    now = datetime.now(UTC).isoformat()
    return [
        orjson.dumps(
            [
                {
                    "specversion": "1.0",
                    "id": f"v{v}-{i}",
                    "source": SOURCE,
                    "type": "tokens",
                    "subject": f"customer-{(v * batch + i) % 1000}",
                    "time": now,
                    "data": {"value": str(i % 97 + 1), "properties": {"model": "m1"}},
                }
                for i in range(batch)
            ]
        )
        for v in range(variants)
    ]


async def _connection(
    port: int, requests: list[bytes], until: float, latencies: list[float]
) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    done = 0
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(requests[done % len(requests)])
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
            if status != 202:
                raise RuntimeError(f"answer {status}: {body[:300]!r}")
            latencies.append(time.perf_counter() - started)
            done += 1
    finally:
        writer.close()
    return done


def load(port: int, key: str, batch: int, connections: int, seconds: float) -> Run:
    """Send batches of ``batch`` events for ``seconds`` from ``connections`` connections
    (CPU figures left at zero: see :func:`measured`)."""
    requests = [
        (
            "POST /v1/events HTTP/1.1\r\nHost: bench\r\n"
            f"Authorization: Bearer {key}\r\n"
            "Content-Type: application/cloudevents-batch+json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in _bodies(batch, 20)
    ]
    latencies: list[float] = []

    async def run() -> list[int]:
        until = time.perf_counter() + seconds
        return await asyncio.gather(
            *(_connection(port, requests, until, latencies) for _ in range(connections))
        )

    started = time.perf_counter()
    counts = asyncio.run(run())
    elapsed = time.perf_counter() - started
    latencies.sort()
    accepted = sum(counts) * batch
    return Run(accepted / elapsed, latencies[int(len(latencies) * 0.99)] * 1000, accepted)


def measured(server_pid: int, broker_pid: int | None, send: Callable[[], Run]) -> Run:
    """``send()``'s run with the CPU per event the server and the broker spent on it."""
    server, kafka = cpu_seconds(server_pid), cpu_seconds(broker_pid) if broker_pid else 0.0
    loop = cpu_seconds(server_pid, main_thread_only=True)
    run = send()
    run.server_cpu_us = (cpu_seconds(server_pid) - server) / run.accepted * 1e6
    loop = cpu_seconds(server_pid, main_thread_only=True) - loop
    run.server_loop_cpu_us = loop / run.accepted * 1e6
    if broker_pid:
        run.broker_cpu_us = (cpu_seconds(broker_pid) - kafka) / run.accepted * 1e6
    return run


def _wait_up(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited at start")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers (the baseline has no /healthz)
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the server did not answer in 30 s")


def _uvicorn(factory: str, port: int, settings: Settings | None = None) -> subprocess.Popen[bytes]:
    """``factory`` (a function of this module) served as serve is: uvloop and httptools."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            f"bench.http:{factory}",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        env=environment_of(settings, os.environ) if settings is not None else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8)
    options, _ = parser.parse_known_args()
    runs: dict[str, Run] = {}
    with broker_process() as (bootstrap, broker_pid), tempfile.TemporaryDirectory() as scratch:
        name = topic(bootstrap, f"bench-http-{int(time.time())}")
        port = free_port()
        settings = load_settings(
            kafka_bootstrap=bootstrap,
            topic=name,
            database_url=f"sqlite:///{scratch}/bench.db",
            meters_file=EXAMPLE_METERS,
            http_port=port,
            metrics_port=0,
        )
        engine = build_engine(settings)
        migrate(engine)
        _, key = create_key(engine, "bench", SOURCE, "ingest")
        engine.dispose()
        floor_settings = settings.model_copy(update={"topic": topic(bootstrap, f"{name}-floor")})
        baseline_port, floor_port = free_port(), free_port()
        servers = (
            ("baseline", baseline_port, partial(_uvicorn, "baseline_app", baseline_port)),
            ("floor", floor_port, partial(_uvicorn, "floor_app", floor_port, floor_settings)),
            ("serve", port, partial(start_meterstream, settings, "serve")),
        )
        for label, server_port, start in servers:
            server = start()
            try:
                _wait_up(server_port, server)
                for batch in BATCHES:
                    send = partial(
                        load, server_port, key, batch, options.connections, options.seconds
                    )
                    runs[f"{label}_{batch}"] = measured(server.pid, broker_pid, send)
            finally:
                stop_process(server)
        on_kafka = sum(end_offsets(bootstrap, name).values())
        floor_on_kafka = sum(end_offsets(bootstrap, floor_settings.topic).values())
    for label, held in (("serve", on_kafka), ("floor", floor_on_kafka)):
        accepted = sum(runs[f"{label}_{batch}"].accepted for batch in BATCHES)
        if held != accepted:
            sys.exit(f"{label}: Kafka holds {held} events but {accepted} were answered 202")
    report(runs, options.connections)


def report(runs: dict[str, Run], connections: int) -> None:
    load_average = os.getloadavg()
    figures: dict[str, Any] = {
        "connections": connections,
        "load_average_1m": round(load_average[0], 2),
    }
    rows = []
    misses = []
    for batch in BATCHES:
        served, floor, bare = (runs[f"{label}_{batch}"] for label in ("serve", "floor", "baseline"))
        ratio = served.events_per_s / bare.events_per_s
        floor_ratio = floor.events_per_s / bare.events_per_s
        figures[f"batch_{batch}"] = {
            "events_per_s": round(served.events_per_s),
            "p99_ms": round(served.p99_ms, 1),
            "cpu_us_per_event": _cpu_figures(served),
            "baseline_events_per_s": round(bare.events_per_s),
            "baseline_p99_ms": round(bare.p99_ms, 1),
            "baseline_cpu_us_per_event": _cpu_figures(bare),
            "floor_events_per_s": round(floor.events_per_s),
            "floor_p99_ms": round(floor.p99_ms, 1),
            "floor_cpu_us_per_event": _cpu_figures(floor),
            "ratio": round(ratio, 3),
            "floor_ratio": round(floor_ratio, 3),
        }
        rows += [
            _row(batch, "serve", served, f"  ratio {ratio:.2f}"),
            _row(batch, "floor: parse+produce", floor, f"  ratio {floor_ratio:.2f}"),
            _row(batch, "baseline: parse", bare, ""),
        ]
        if ratio < TARGET_RATIO or served.events_per_s < TARGET_EVENTS_PER_S:
            misses.append(batch)
    figures["targets"] = {"ratio": TARGET_RATIO, "events_per_s": TARGET_EVENTS_PER_S}
    table(
        f"POST /v1/events, one server process, {connections} connections "
        f"(load average {load_average[0]:.2f} {load_average[1]:.2f} {load_average[2]:.2f})",
        rows,
    )
    save("http", figures)
    if misses:
        print(f"  below target for batches of {misses}")


def _row(batch: int, label: str, run: Run, ratio: str) -> tuple[str, str]:
    # The baseline produces nothing: the broker's CPU is shown for the two that do.
    broker = f", broker {run.broker_cpu_us:5.1f} us" if ratio and run.broker_cpu_us else ""
    return (
        f"batch {batch:>5} {label}",
        f"{run.events_per_s:>9,.0f} events/s  p99 {run.p99_ms:7.1f} ms  CPU/event: server "
        f"{run.server_cpu_us:5.1f} us (event loop {run.server_loop_cpu_us:5.1f}){broker}{ratio}",
    )


def _cpu_figures(run: Run) -> dict[str, float]:
    figures = {
        "server": round(run.server_cpu_us, 2),
        "server_event_loop": round(run.server_loop_cpu_us, 2),
    }
    if run.broker_cpu_us is not None:
        figures["broker"] = round(run.broker_cpu_us, 2)
    return figures


if __name__ == "__main__":
    main()
