"""Reporter delivery rate against the Stripe emulator's own capacity, same run; and Stripe calls
per million raw events.

    python -m bench.report [--windows N] [--customers C] [--postgres URL] [--profile]

The emulator (no rate limit) runs in a process of its own, so the reporter and the emulator do
not share one GIL (its handler sets TCP_NODELAY: see reporters/stripe_emulator/server.py).
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
   the last 30 days were reported; and a cycle with nothing due. Each cycle compares every
   window total with the ledger (neither table is pruned), so its fixed cost grows with history.
Target (issue #7): the reporter delivers >= 0.8 of the bare client's events/s on each endpoint.
"""

from __future__ import annotations

import argparse
import http.client
import inspect
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from sqlalchemy import Engine, bindparam

from aggregators.windows import window_bounds
from bench.aggregate import drop_database, fresh_database
from bench.common import save, table
from meterstream.db import build_engine, migrate
from meterstream.meters import Catalogue, load_catalogue
from meterstream.metrics import ReporterMetrics
from meterstream.schema import window_totals
from meterstream.settings import load_settings
from reporters.cycle import Reporter
from reporters.service import build_reporter, connect
from reporters.stream import MAX_EVENTS_PER_CALL
from reporters.v1_sender import V1Sender
from stripe_emulator import run_stripe_emulator

ROOT = Path(__file__).resolve().parent.parent
METERS_FILE = ROOT / "examples" / "meters.toml"
METERS = ("tokens", "api_calls", "peak_connections")
API_KEY = "sk_test_meterstreambench"
# The reporter's thread pool (V1Sender(workers=...)'s default, as build_reporter leaves it).
THREADS: int = inspect.signature(V1Sender.__init__).parameters["workers"].default
# Settings caps METERSTREAM_STRIPE_RATE at 10,000 calls/s: one call per 0.1 ms, far above
# what is measured here, so the pace is not what limits the reporter.
STRIPE_RATE = 10_000.0
INTERVAL_S = 60  # METERSTREAM_REPORT_INTERVAL_S's default
RAW_PER_CUSTOMER_HOUR = 100  # 1,000,000 raw events / 10,000 customers / hour
BARE_STREAM_EVENTS = 100_000
SESSION_RENEW_S = 15 * 60 - 60  # a v2 session lives 15 min; renewed 60 s early


# -- the emulator, in its own process --------------------------------------------------------


def _serve_emulator(conn: Connection) -> None:
    """Child process: run the emulator and obey (command, argument) pairs from ``conn``."""
    with run_stripe_emulator(rate_limit_per_s=None) as emulator:
        conn.send(emulator.url)
        while True:
            command, argument = conn.recv()
            if command == "seed":
                meters, customers = argument
                emulator.reset()
                for display_name, event_name, formula in meters:
                    emulator.state.create_meter(
                        display_name=display_name, event_name=event_name, formula=formula
                    )
                for customer in customers:
                    emulator.state.create_customer(customer_id=customer)
                conn.send(None)
            elif command == "count":
                conn.send((len(emulator.state.events), len(emulator.state.async_errors)))
            else:
                conn.send(None)
                return


@dataclass
class EmulatorProcess:
    url: str
    conn: Connection
    catalogue: Catalogue

    def seed(self, customers: Sequence[str]) -> None:
        """Empty the account, then create every catalogue meter and ``customers``."""
        meters = [(m.name, m.stripe_event_name, m.stripe_formula) for m in self.catalogue]
        self.conn.send(("seed", (meters, list(customers))))
        self.conn.recv()

    def counts(self) -> tuple[int, int]:
        """(meter events recorded, stream events refused asynchronously)."""
        self.conn.send(("count", None))
        recorded, refused = self.conn.recv()
        return int(recorded), int(refused)


@contextmanager
def emulator_process(catalogue: Catalogue) -> Iterator[EmulatorProcess]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve_emulator, args=(child,), daemon=True)
    process.start()
    try:
        yield EmulatorProcess(str(parent.recv()), parent, catalogue)
    finally:
        if process.is_alive():
            parent.send(("stop", None))
            process.join(10)
        if process.is_alive():
            process.kill()
            process.join(5)


# -- window totals -----------------------------------------------------------------------------


@dataclass
class Window:
    customer_id: str
    meter: str
    start: datetime
    end: datetime
    value: Decimal
    events: int
    revision: int
    last_event_time: datetime


def _row(window: Window, now: datetime) -> dict[str, Any]:
    return {
        "customer_id": window.customer_id,
        "meter": window.meter,
        "window_start": window.start,
        "window_end": window.end,
        "value": window.value,
        "events": window.events,
        "revision": window.revision,
        "last_event_time": window.last_event_time,
        "last_event_id": None,
        "first_applied_at": now,
        "updated_at": now,
    }


def write_windows(engine: Engine, new: Sequence[Window], changed: Sequence[Window]) -> None:
    """Insert ``new`` window totals and update ``changed`` ones (value, events, revision)."""
    now = datetime.now(UTC)
    wt = window_totals.c
    with engine.begin() as connection:
        if new:
            connection.execute(window_totals.insert(), [_row(w, now) for w in new])
        if changed:
            connection.execute(
                window_totals.update()
                .where(
                    wt.customer_id == bindparam("k_customer"),
                    wt.meter == bindparam("k_meter"),
                    wt.window_start == bindparam("k_start"),
                )
                .values(
                    value=bindparam("value"),
                    events=bindparam("events"),
                    revision=bindparam("revision"),
                    last_event_time=bindparam("last_event_time"),
                    updated_at=bindparam("updated_at"),
                ),
                [
                    {
                        "k_customer": w.customer_id,
                        "k_meter": w.meter,
                        "k_start": w.start,
                        "value": w.value,
                        "events": w.events,
                        "revision": w.revision,
                        "last_event_time": w.last_event_time,
                        "updated_at": now,
                    }
                    for w in changed
                ],
            )


def throughput_windows(catalogue: Catalogue, count: int, tag: str) -> list[Window]:
    """``count`` windows, one per (customer, meter): 3 meters a customer, 30 minutes ago."""
    at = datetime.now(UTC) - timedelta(minutes=30)
    windows = []
    for i in range(count):
        meter = METERS[i % len(METERS)]
        start, end = window_bounds(at, catalogue.meters[meter].window)
        windows.append(
            Window(
                f"cus_{tag}{i // len(METERS):06d}",
                meter,
                start,
                end,
                Decimal(i % 997 + 1),
                1,
                1,
                at,
            )
        )
    return windows


# -- databases ---------------------------------------------------------------------------------


@contextmanager
def database(postgres: str | None) -> Iterator[str]:
    """A throw-away database URL: a fresh PostgreSQL database, or an SQLite file."""
    if postgres:
        url = fresh_database(postgres)
        try:
            yield url
        finally:
            drop_database(url, postgres)
        return
    with tempfile.TemporaryDirectory(prefix="bench-report-") as directory:
        yield f"sqlite:///{directory}/report.db"


def reporter_for(
    url: str, emulator_url: str, catalogue: Catalogue, stream: bool
) -> tuple[Reporter, Engine]:
    settings = load_settings(
        database_url=url,
        stripe_api_key=API_KEY,
        stripe_api_base=emulator_url,
        stripe_rate=STRIPE_RATE,
        stripe_stream=stream,
        meters_file=METERS_FILE,
        metrics_port=0,
    )
    engine = build_engine(settings)
    migrate(engine)
    stop = threading.Event()
    connected = connect(settings, catalogue, ReporterMetrics(), stop)
    return build_reporter(connected, engine, catalogue, stop), engine


# -- throughput: reporter against the bare client ----------------------------------------------


@dataclass
class Rate:
    events: int
    seconds: float
    send_seconds: float | None = None  # stream: first send to last answer
    cpu_seconds: float | None = None  # this process's CPU time (every thread) during the run

    @property
    def per_s(self) -> float:
        return self.events / self.seconds


def _connection(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)


def _post(
    connection: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]
) -> bytes:
    connection.request("POST", path, body, headers)
    response = connection.getresponse()
    answer = response.read()
    if response.status >= 300:
        raise RuntimeError(f"{path}: HTTP {response.status}: {answer[:300]!r}")
    return answer


def _timestamp(window: Window) -> datetime:
    return min(window.last_event_time, window.end - timedelta(seconds=1))


def bare_v1(url: str, windows: Sequence[Window], catalogue: Catalogue) -> Rate:
    """POST /v1/billing/meter_events, one pre-encoded form body per window, from THREADS."""
    bodies = []
    for window in windows:
        identifier = f"bare_{uuid.uuid4().hex}"
        form = {
            "event_name": catalogue.meters[window.meter].stripe_event_name,
            "payload[stripe_customer_id]": window.customer_id,
            "payload[value]": str(int(window.value)),
            "identifier": identifier,
            "timestamp": str(int(_timestamp(window).timestamp())),
        }
        bodies.append((identifier, urlencode(form).encode()))
    # One window per (customer, meter): no two threads ever hold the same Stripe call slot.
    shares = [bodies[i::THREADS] for i in range(THREADS)]
    ready = threading.Barrier(THREADS + 1)
    errors: list[BaseException] = []

    def send(share: list[tuple[str, bytes]]) -> None:
        connection = _connection(url)
        try:
            ready.wait()
            for identifier, body in share:
                headers = {
                    "Authorization": f"Bearer {API_KEY}",
                    "Content-Type": "application/x-www-form-urlencoded",
                    "Idempotency-Key": identifier,
                }
                _post(connection, "/v1/billing/meter_events", body, headers)
        except BaseException as exc:  # reported after the join
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    ready.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return Rate(len(windows), elapsed)


def bare_stream(url: str, windows: Sequence[Window], catalogue: Catalogue) -> Rate:
    """A v2 session, then 100 events per pre-encoded JSON stream call, from one thread; the
    windows are sent over again (fresh identifiers) up to BARE_STREAM_EVENTS, so the run is
    long enough to time."""
    windows = [windows[i % len(windows)] for i in range(max(len(windows), BARE_STREAM_EVENTS))]
    bodies = []
    for first in range(0, len(windows), MAX_EVENTS_PER_CALL):
        events = [
            {
                "event_name": catalogue.meters[w.meter].stripe_event_name,
                "payload": {"stripe_customer_id": w.customer_id, "value": str(int(w.value))},
                "identifier": f"bare_{uuid.uuid4().hex}",
                "timestamp": _timestamp(w).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            }
            for w in windows[first : first + MAX_EVENTS_PER_CALL]
        ]
        bodies.append(json.dumps({"events": events}).encode())
    connection = _connection(url)
    try:
        started = time.perf_counter()
        session = json.loads(
            _post(
                connection,
                "/v2/billing/meter_event_session",
                b"{}",
                {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            )
        )
        headers = {
            "Authorization": f"Bearer {session['authentication_token']}",
            "Content-Type": "application/json",
        }
        for body in bodies:
            _post(connection, "/v2/billing/meter_event_stream", body, headers)
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
    return Rate(len(windows), elapsed)


def reporter_cycle(
    emulator: EmulatorProcess,
    catalogue: Catalogue,
    windows: Sequence[Window],
    postgres: str | None,
    stream: bool,
    profile: bool,
) -> Rate:
    """One report cycle over ``windows`` (seeded as window totals); events/s acknowledged."""
    with database(postgres) as url:
        reporter, engine = reporter_for(url, emulator.url, catalogue, stream)
        try:
            write_windows(engine, windows, [])
            spans: list[float] = []
            if stream:
                spans = _time_stream_sends(reporter)
            title = f"reporter {'stream' if stream else 'v1'} cycle"
            with SpyProfile(title) if profile else nullcontext():
                started, cpu = time.perf_counter(), time.process_time()
                result = reporter.run_cycle()
                elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        finally:
            engine.dispose()
    recorded, refused = emulator.counts()
    if result.acknowledged != len(windows) or recorded != len(windows) or refused:
        raise RuntimeError(
            f"reporter acknowledged {result.acknowledged}, emulator recorded {recorded} "
            f"(refused {refused}) of {len(windows)} windows: {result}"
        )
    send_seconds = (spans[-1] - spans[0]) if len(spans) >= 2 else None
    return Rate(len(windows), elapsed, send_seconds, cpu)


def _time_stream_sends(reporter: Reporter) -> list[float]:
    """Wrap the reporter's StreamSender.send_batch (on this instance) to note when the send
    phase starts and ends; [first call's start, last call's end]."""
    sender: Any = reporter.sender.stream  # type: ignore[attr-defined]  # a stream reporter's
    original = sender.send_batch
    spans: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        if not spans:
            spans.append(time.perf_counter())
        try:
            return original(*args, **kwargs)
        finally:
            spans[1:] = [time.perf_counter()]

    sender.send_batch = timed
    return spans


class SpyProfile:
    """py-spy sampling this process (every thread, GIL holders only: where the CPU goes)
    while the ``with`` body runs; then the top frames by own and by total samples."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.out = Path(tempfile.mkdtemp(prefix="bench-report-spy-")) / "stacks.txt"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SpyProfile:
        spy = Path(sys.executable).with_name("py-spy")
        self.process = subprocess.Popen(
            [
                *(str(spy), "record", "--pid", str(os.getpid()), "--rate", "250", "--gil"),
                *("--format", "raw", "--output", str(self.out), "--nonblocking"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # let py-spy attach before the measured part starts
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        print(self.summary())
        shutil.rmtree(self.out.parent, ignore_errors=True)

    def summary(self, top: int = 12) -> str:
        if not self.out.exists():
            return f"{self.title}: py-spy wrote no profile (ptrace not allowed?)"
        own: Counter[str] = Counter()
        total: Counter[str] = Counter()
        samples = 0
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
            if not frames or not count.isdigit():
                continue
            n = int(count)
            samples += n
            own[_short(frames[-1])] += n
            for frame in {_short(f) for f in frames}:
                total[frame] += n
        ours = Counter({f: n for f, n in total.items() if f.split(" ")[-1].startswith("(rep")})
        lines = [f"\nprofile {self.title}: {samples} samples holding the GIL (py-spy --gil)"]
        lines.append("  by own samples:")
        lines += [f"    {n / samples:6.1%}  {f}" for f, n in own.most_common(top)]
        lines.append("  reporters/ frames by total samples:")
        lines += [f"    {n / samples:6.1%}  {f}" for f, n in ours.most_common(top)]
        return "\n".join(lines)


def _short(frame: str) -> str:
    """'name (path/to/site-packages/pkg/mod.py:12)' -> 'name (pkg/mod.py)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    for marker in ("site-packages", "main", "python3.11"):
        if marker in parts:
            parts = parts[len(parts) - parts[::-1].index(marker) :]
            break
    return f"{name} ({'/'.join(parts[-2:])})"


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


# -- calls per million raw events --------------------------------------------------------------


@dataclass
class Calls:
    raw_events: int
    customers: int
    meter_events: int
    stream_calls: int  # v2 stream calls (100 events each), sessions included
    windows: int  # distinct windows: the count if the reporter ran once, after the hour
    per_cycle: list[int]
    per_meter: dict[str, int]  # meter events per meter

    def per_million(self, count: int) -> float:
        return count * 1_000_000 / self.raw_events


def hour_of_events(
    customers: int, seed: int = 7
) -> tuple[datetime, list[tuple[float, str, str, Decimal]]]:
    """RAW_PER_CUSTOMER_HOUR events per customer over one full hour that ended an hour ago,
    customers and meters uniform; (seconds into the hour, customer, meter, value), in order."""
    rng = random.Random(seed)  # reproducible traffic, not secrets
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    events = []
    for _ in range(customers * RAW_PER_CUSTOMER_HOUR):
        meter = METERS[rng.randrange(len(METERS))]
        value = {
            "tokens": rng.randint(1, 2000),
            "api_calls": 1,
            "peak_connections": rng.randint(1, 50),
        }
        events.append(
            (
                rng.uniform(0, 3600),
                f"cus_calls{rng.randrange(customers):06d}",
                meter,
                Decimal(value[meter]),
            )
        )
    events.sort(key=lambda e: e[0])
    return hour, events


def fold_intervals(
    catalogue: Catalogue,
    hour: datetime,
    events: Sequence[tuple[float, str, str, Decimal]],
    on_interval: Callable[[list[Window], list[Window]], None] | None = None,
) -> tuple[list[int], int, Counter[str]]:
    """Fold ``events`` into window totals one report interval at a time (count, sum, max, as
    the aggregators do: the revision moves only when the value changes); after each interval
    call ``on_interval(new, changed)``. Returns the windows changed per interval, the number
    of distinct windows, and the changes per meter."""
    totals: dict[tuple[str, str, datetime], Window] = {}
    changed_per_interval = []
    per_meter: Counter[str] = Counter()
    cursor = 0
    for interval in range(3600 // INTERVAL_S):
        end_s = (interval + 1) * INTERVAL_S
        touched: dict[tuple[str, str, datetime], Window] = {}
        new: set[tuple[str, str, datetime]] = set()
        while cursor < len(events) and events[cursor][0] < end_s:
            offset, customer, meter, value = events[cursor]
            cursor += 1
            at = hour + timedelta(seconds=offset)
            aggregation = catalogue.meters[meter].aggregation
            start, stop = window_bounds(at, catalogue.meters[meter].window)
            key = (customer, meter, start)
            window = totals.get(key)
            if window is None:
                window = totals[key] = Window(customer, meter, start, stop, Decimal(0), 0, 0, at)
                new.add(key)
            before = window.value if window.events else None
            if aggregation == "count":
                window.value += 1
            elif aggregation == "max":
                window.value = max(window.value, value) if window.events else value
            else:
                window.value += value
            window.events += 1
            window.last_event_time = max(window.last_event_time, at)
            if window.value != before:
                touched[key] = window
        for window in touched.values():
            window.revision += 1
            per_meter[window.meter] += 1
        changed_per_interval.append(len(touched))
        if on_interval is not None:
            on_interval(
                [totals[k] for k in touched if k in new],
                [totals[k] for k in touched if k not in new],
            )
    return changed_per_interval, len(totals), per_meter


def measured_calls(
    emulator: EmulatorProcess, catalogue: Catalogue, customers: int, postgres: str | None
) -> Calls:
    """Run the real reporter (stream mode) after each interval of a scaled-down hour."""
    hour, events = hour_of_events(customers)
    emulator.seed(sorted({e[1] for e in events}))
    sent: list[int] = []
    with database(postgres) as url:
        reporter, engine = reporter_for(url, emulator.url, catalogue, stream=True)
        try:

            def report(new: list[Window], changed: list[Window]) -> None:
                write_windows(engine, new, changed)
                result = reporter.run_cycle()
                if result.held or result.rejected or result.unacknowledged:
                    raise RuntimeError(f"report cycle did not deliver everything: {result}")
                sent.append(result.acknowledged)

            expected, windows, per_meter = fold_intervals(catalogue, hour, events, report)
        finally:
            engine.dispose()
    recorded, refused = emulator.counts()
    if sent != expected or recorded != sum(sent) or refused:
        raise RuntimeError(
            f"reporter sent {sum(sent)} meter events, the fold expected {sum(expected)}, "
            f"the emulator recorded {recorded} (refused {refused})"
        )
    return _calls(len(events), customers, sent, windows, per_meter)


def modelled_calls(catalogue: Catalogue, customers: int) -> Calls:
    """The same count without the reporter: one meter event per window changed per interval."""
    hour, events = hour_of_events(customers)
    per_interval, windows, per_meter = fold_intervals(catalogue, hour, events)
    return _calls(len(events), customers, per_interval, windows, per_meter)


def _calls(
    raw: int, customers: int, per_cycle: list[int], windows: int, per_meter: Counter[str]
) -> Calls:
    sessions = math.ceil(3600 / SESSION_RENEW_S)
    stream = sum(math.ceil(n / MAX_EVENTS_PER_CALL) for n in per_cycle) + sessions
    return Calls(raw, customers, sum(per_cycle), stream, windows, per_cycle, dict(per_meter))


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
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
