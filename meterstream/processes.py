"""Child processes meterstream starts (the embedded broker, workers in the demo and tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

from meterstream.settings import Settings, environment_of


def start_meterstream(
    settings: Settings,
    *arguments: str,
    output: IO[bytes] | int = subprocess.DEVNULL,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``meterstream ARGUMENTS`` in this interpreter, reading ``settings``; the caller
    stops it (stop_process)."""
    return subprocess.Popen(  # noqa: S603 - our own interpreter and command
        [sys.executable, "-m", "meterstream", *arguments],
        env=environment_of(settings, os.environ),
        stdout=output,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """Ask ``process`` to stop (SIGTERM), wait for it, and kill it if it does not stop in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(timeout=timeout_s)
