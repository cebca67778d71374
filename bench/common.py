"""What the benchmarks share: a broker, a results file, a table."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meterstream.embedded import embedded_broker
from meterstream.kafka import ensure_topic, wait_for_broker

RESULTS = Path(__file__).parent / "results.json"


@contextmanager
def broker() -> Iterator[str]:
    """METERSTREAM_KAFKA_BOOTSTRAP if set, else an embedded broker for this run."""
    with broker_process() as (bootstrap, _pid):
        yield bootstrap


@contextmanager
def broker_process() -> Iterator[tuple[str, int | None]]:
    """Like :func:`broker`, with the broker's process id (None for METERSTREAM_KAFKA_BOOTSTRAP's:
    not ours to measure)."""
    given = os.environ.get("METERSTREAM_KAFKA_BOOTSTRAP")
    if given:
        wait_for_broker(given)
        yield given, None
        return
    with embedded_broker() as running:
        yield running.bootstrap, running.pid


def cpu_seconds(pid: int, *, main_thread_only: bool = False) -> float:
    """User and system CPU seconds ``pid`` has used so far: all its threads, or only its main
    thread (a Python server's event loop, without librdkafka's threads). Linux /proc."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat" if main_thread_only else f"/proc/{pid}/stat")
    # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    fields = stat.read_text().rpartition(")")[2].split()
    user, system = int(fields[11]), int(fields[12])
    return (user + system) / os.sysconf("SC_CLK_TCK")


def topic(bootstrap: str, name: str, partitions: int = 8) -> str:
    ensure_topic(bootstrap, name, partitions)
    return name


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def save(section: str, figures: dict[str, Any]) -> None:
    """Merge ``figures`` under ``section`` into bench/results.json."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[section] = {
        **figures,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
