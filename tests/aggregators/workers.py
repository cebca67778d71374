"""Run real aggregator workers (``meterstream aggregate``) as processes, for the tests."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, func, select

from aggregators.offset_store import stored_offsets
from meterstream.kafka import watermarks
from meterstream.processes import start_meterstream, stop_process
from meterstream.schema import window_totals
from meterstream.settings import Settings, environment_of


def environment(settings: Settings, metrics_port: int = 0) -> dict[str, str]:
    """The METERSTREAM_* variables that make a process see ``settings`` (metrics off unless a
    port is given, so parallel processes never fight over one)."""
    return environment_of(settings.model_copy(update={"metrics_port": metrics_port}), os.environ)


@contextmanager
def worker(
    settings: Settings, log: Path, metrics_port: int = 0
) -> Iterator[subprocess.Popen[bytes]]:
    """A running worker; stopped (SIGTERM, then SIGKILL) by its pid on exit."""
    with log.open("ab") as out:
        process = start_meterstream(
            settings.model_copy(update={"metrics_port": metrics_port}),
            "aggregate",
            "--loglevel",
            "warning",
            output=out,
        )
    try:
        yield process
    finally:
        stop_process(process)


def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0, what: str = "") -> None:
    """Poll ``condition`` until it holds; fail after ``timeout_s`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def events_applied(engine: Engine) -> int:
    with engine.connect() as connection:
        total = connection.execute(select(func.coalesce(func.sum(window_totals.c.events), 0)))
        return int(total.scalar_one())


def all_applied(settings: Settings, engine: Engine) -> bool:
    """Every message now on the topic is behind the database's applied offsets (applied,
    found a duplicate, or dead-lettered)."""
    ends = watermarks(settings.kafka_bootstrap, settings.topic)
    stored = stored_offsets(engine, settings.topic)
    return all(stored.get(p, 0) >= high for p, (_low, high) in ends.items() if high > 0)
