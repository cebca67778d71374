"""The command tests' Stripe emulator and environment; the reporter fixtures serve them too."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stripe_emulator import Emulator, run_stripe_emulator
from tests.reporters.test_reporter import (
    SECRET,
    bare_emulator,
    create_stripe_meters,
    world,
    write_catalogue,
)

__all__ = ["bare_emulator", "emulator", "env", "world"]


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with run_stripe_emulator(rate_limit_per_s=None) as running:
        create_stripe_meters(running)
        running.state.create_customer(customer_id="cus_a")
        yield running


@pytest.fixture
def env(
    emulator: Emulator, database_url: str, tmp_path: Path, kafka_bootstrap: str
) -> dict[str, str]:
    """The environment of a ``meterstream`` process: this test's database, a catalogue, the
    emulator and the broker (the reporter keeps its ledger mark there, on a topic of the
    test's own); no METERSTREAM_* variable of the caller's leaks in."""
    return command_env(emulator, database_url, tmp_path, kafka_bootstrap)


def command_env(
    emulator: Emulator, database_url: str, tmp_path: Path, kafka_bootstrap: str
) -> dict[str, str]:
    """The environment of one command on ``database_url`` (see the env fixture)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    return {
        **clean,
        "METERSTREAM_DATABASE_URL": database_url,
        "METERSTREAM_METERS_FILE": str(write_catalogue(tmp_path)),
        "METERSTREAM_STRIPE_API_KEY": SECRET,
        "METERSTREAM_STRIPE_API_BASE": emulator.url,
        "METERSTREAM_METRICS_PORT": "0",
        "METERSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "METERSTREAM_MARKS_TOPIC": f"marks-{uuid.uuid4().hex[:12]}",
    }
