"""``POST /v1/events`` throughput: ``meterstream serve`` against the same stack serving an
endpoint that only parses the body and discards it, in the same run.

Batches of 100 and 1,000 events from several keep-alive connections (a small asyncio client
that writes prepared requests, so the client costs little of the shared cores). Every answer
must be 202; the events Kafka holds afterwards must equal the events answered 202.

Targets: at least 0.5 of the baseline and at least 30,000 events/s on one server process.
    python -m bench.http [--seconds 5] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response

from bench.common import broker, save, table, topic
from meterstream.api_keys import create_key
from meterstream.db import build_engine, migrate
from meterstream.embedded import free_port
from meterstream.kafka import end_offsets
from meterstream.processes import start_meterstream, stop_process
from meterstream.settings import load_settings

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


@dataclass
class Run:
    events_per_s: float
    p99_ms: float
    accepted: int


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
    """Send batches of ``batch`` events for ``seconds`` from ``connections`` connections."""
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


def _baseline(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "bench.http:baseline_app",
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
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8)
    options, _ = parser.parse_known_args()
    runs: dict[str, Run] = {}
    with broker() as bootstrap, tempfile.TemporaryDirectory() as scratch:
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
        baseline_port = free_port()
        baseline = _baseline(baseline_port)
        try:
            _wait_up(baseline_port, baseline)
            for batch in BATCHES:
                runs[f"baseline_{batch}"] = load(
                    baseline_port, key, batch, options.connections, options.seconds
                )
        finally:
            stop_process(baseline)
        server = start_meterstream(settings, "serve")
        try:
            _wait_up(port, server)
            for batch in BATCHES:
                runs[f"serve_{batch}"] = load(
                    port, key, batch, options.connections, options.seconds
                )
        finally:
            stop_process(server)
        on_kafka = sum(end_offsets(bootstrap, name).values())
    accepted = sum(runs[f"serve_{batch}"].accepted for batch in BATCHES)
    if on_kafka != accepted:
        sys.exit(f"Kafka holds {on_kafka} events but {accepted} were answered 202")
    report(runs, options.connections)


def report(runs: dict[str, Run], connections: int) -> None:
    figures: dict[str, Any] = {"connections": connections}
    rows = []
    misses = []
    for batch in BATCHES:
        served, bare = runs[f"serve_{batch}"], runs[f"baseline_{batch}"]
        ratio = served.events_per_s / bare.events_per_s
        figures[f"batch_{batch}"] = {
            "events_per_s": round(served.events_per_s),
            "p99_ms": round(served.p99_ms, 1),
            "baseline_events_per_s": round(bare.events_per_s),
            "baseline_p99_ms": round(bare.p99_ms, 1),
            "ratio": round(ratio, 3),
        }
        rows.append(
            (
                f"batch {batch:>5}",
                f"{served.events_per_s:>9,.0f} events/s  p99 {served.p99_ms:6.1f} ms   "
                f"parse-and-discard {bare.events_per_s:>9,.0f}/s  p99 {bare.p99_ms:6.1f} ms  "
                f"ratio {ratio:.2f}",
            )
        )
        if ratio < TARGET_RATIO or served.events_per_s < TARGET_EVENTS_PER_S:
            misses.append(batch)
    figures["targets"] = {"ratio": TARGET_RATIO, "events_per_s": TARGET_EVENTS_PER_S}
    table(f"POST /v1/events, one server process, {connections} connections", rows)
    save("http", figures)
    if misses:
        print(f"  below target for batches of {misses}")


if __name__ == "__main__":
    main()
