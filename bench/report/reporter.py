"""A real reporter on a throw-away database (PostgreSQL or SQLite) against the emulator."""

from __future__ import annotations

import inspect
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine

from bench.aggregate import drop_database, fresh_database
from meterstream.db import build_engine, migrate
from meterstream.meters import EXAMPLE_CATALOGUE, Catalogue
from meterstream.metrics import ReporterMetrics
from meterstream.settings import load_settings
from reporters.cycle import Reporter
from reporters.service import build_reporter, connect
from reporters.v1_sender import V1Sender

METERS_FILE = EXAMPLE_CATALOGUE
API_KEY = "sk_test_meterstreambench"
# The reporter's thread pool (Reporter(workers=...)'s default, as build_reporter leaves it).
THREADS: int = inspect.signature(V1Sender.__init__).parameters["workers"].default
# Settings caps METERSTREAM_STRIPE_RATE at 10,000 calls/s: one call per 0.1 ms, far above
# what is measured here, so the pace is not what limits the reporter.
STRIPE_RATE = 10_000.0


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
