"""Events per second: a bare client against the emulator, then the reporter over the same
windows (v1 from the reporter's thread pool; the v2 stream from one thread)."""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit

from bench.report.emulator import EmulatorProcess
from bench.report.profile import SpyProfile
from bench.report.reporter import API_KEY, THREADS, database, reporter_for
from bench.report.windows import Window, write_windows
from meterstream.meters import Catalogue
from reporters.cycle import Reporter
from reporters.stream import MAX_EVENTS_PER_CALL

BARE_STREAM_EVENTS = 100_000


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
    lanes: int | None = None,
) -> Rate:
    """One report cycle over ``windows`` (seeded as window totals); events/s acknowledged.
    ``lanes``: the stream's sending lanes, if not its default."""
    with database(postgres) as url:
        reporter, engine = reporter_for(url, emulator.url, catalogue, stream)
        if lanes is not None:
            reporter.sender.lanes = lanes  # type: ignore[attr-defined]  # a stream reporter's
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
