"""Child processes meterstream starts (the embedded broker, workers in the demo and tests)."""

from __future__ import annotations

import signal
import subprocess


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
