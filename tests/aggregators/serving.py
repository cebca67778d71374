"""A running ``meterstream serve`` process for the tests, on a free port, stopped by its pid."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from meterstream.processes import start_meterstream, stop_process
from meterstream.settings import Settings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def served(settings: Settings, log: Path, timeout_s: float = 60.0) -> Iterator[str]:
    """``meterstream serve`` with ``settings`` on a free port; yields its base URL once
    /healthz answers, and stops it (SIGTERM, then SIGKILL) by its pid."""
    port = free_port()
    with log.open("ab") as out:
        process = start_meterstream(
            settings.model_copy(update={"http_port": port, "metrics_port": 0}),
            "serve",
            output=out,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise AssertionError(f"serve exited with {process.returncode}: {log.read_text()}")
            try:
                if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serve did not answer in {timeout_s:g} s: {log.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        stop_process(process)
