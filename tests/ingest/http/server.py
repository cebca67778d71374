"""A real ``meterstream serve`` process for the tests, and curl to talk to it."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from meterstream.db import build_engine, migrate
from meterstream.embedded import free_port
from meterstream.processes import start_meterstream, stop_process
from meterstream.settings import Settings, environment_of
from tests.cli.commands import meterstream

SOURCE = "billing-api"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(frozen=True)
class Server:
    settings: Settings
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def create_key(self, name: str, source: str = SOURCE, scope: str = "ingest") -> str:
        """``meterstream api-keys create`` run as a command; the printed key."""
        done = meterstream(
            self.env(), "api-keys", "create", name, "--source", source, "--scope", scope
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def env(self) -> dict[str, str]:
        import os

        return environment_of(self.settings, os.environ)

    def curl(self, *arguments: str, path: str = "/v1/events", body: bytes | None = None) -> Answer:
        """curl's answer to a request made with ``arguments`` (e.g. -H); ``body`` is sent as
        it is (from stdin: bodies may be larger than a command line)."""
        return curl(self.url + path, *arguments, body=body)

    def post(self, key: str, body: Any, content_type: str, *extra: str) -> Answer:
        """POST /v1/events with ``key``: ``body`` as it is if bytes, else as JSON."""
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        return self.curl(
            "-X",
            "POST",
            "-H",
            f"Authorization: Bearer {key}",
            "-H",
            f"Content-Type: {content_type}",
            *extra,
            body=data,
        )


def curl(url: str, *arguments: str, body: bytes | None = None) -> Answer:
    if body is not None:
        arguments = (*arguments, "--data-binary", "@-")
    done = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "60", *arguments, url],
        input=body,
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):  # curl's Expect: 100-continue for large bodies
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(lines[0].split()[1]), headers, body)


@contextmanager
def running_server(settings: Settings, log: Path) -> Iterator[Server]:
    """``meterstream serve`` on a free port with ``settings`` (database migrated first); stopped
    by its pid at the end."""
    engine = build_engine(settings)
    try:
        migrate(engine)
    finally:
        engine.dispose()
    port = free_port()
    settings = settings.model_copy(update={"http_port": port, "metrics_port": 0})
    with log.open("ab") as out:
        process = start_meterstream(settings, "serve", output=out)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, process, log)
        yield Server(settings, url, process, log)
    finally:
        stop_process(process)


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"meterstream serve exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as answer:  # noqa: S310 - our http URL
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise AssertionError(f"meterstream serve did not answer in 30 s: {log.read_text()[-2000:]}")


def event(
    event_id: str,
    customer: str = "cust-1",
    meter: str = "api_calls",
    value: Any = "1",
    **extra: Any,
) -> dict[str, Any]:
    """A CloudEvents structured usage event (time now unless given)."""
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id,
        "source": SOURCE,
        "type": meter,
        "subject": customer,
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "data": {"value": value, "properties": {}},
    }
    doc.update(extra)
    return doc
