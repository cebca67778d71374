"""Kafka frozen or stopped under a running ``meterstream serve``: 503 with Retry-After, and
every event answered 202 before is on the topic. The test runs its own embedded broker."""

from __future__ import annotations

import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson

from meterstream.embedded import embedded_broker
from meterstream.events import decode_event
from meterstream.settings import Settings
from tests.aggregators.workers import wait_until
from tests.conftest import read_topic
from tests.ingest.http.server import Server, event, running_server

_BATCH = 10


def _refused(bootstrap: str) -> bool:
    host, _, port = bootstrap.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


class _Sender:
    """Sends batches one after another from a thread; remembers each answer's status."""

    def __init__(self, server: Server, key: str) -> None:
        self._url = f"{server.url}/v1/events"
        self._key = key
        self.answers: list[tuple[int, int, str | None]] = []  # (request, status, Retry-After)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def ids(self, request: int) -> set[str]:
        return {f"q{request}-{i}" for i in range(_BATCH)}

    def statuses(self) -> list[int]:
        return [status for _, status, _ in list(self.answers)]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        number = 0
        while not self._stop.is_set():
            body = orjson.dumps([event(i) for i in sorted(self.ids(number))])
            request = urllib.request.Request(  # noqa: S310 - our own http URL
                self._url,
                data=body,
                method="POST",
                headers={
                    "Authorization": f"Bearer {self._key}",
                    "Content-Type": "application/cloudevents-batch+json",
                },
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:  # noqa: S310
                    self.answers.append((number, answer.status, None))
            except urllib.error.HTTPError as refused:
                self.answers.append((number, refused.code, refused.headers.get("Retry-After")))
            number += 1


def test_kafka_frozen_then_stopped_answers_503_and_loses_nothing_answered_202(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    topic = "usage-faults"
    with embedded_broker(topics={topic: 4}) as broker:
        settings = settings_factory(
            kafka_bootstrap=broker.bootstrap, topic=topic, http_produce_timeout_s=2.0
        )
        with running_server(settings, tmp_path / "serve.log") as server:
            sender = _Sender(server, server.create_key("steady"))
            try:
                wait_until(lambda: sender.statuses().count(202) >= 5, 30, "five requests taken")
                os.kill(broker.pid, signal.SIGSTOP)  # Kafka stops answering mid-traffic
                try:
                    wait_until(lambda: 503 in sender.statuses(), 30, "a 503 while Kafka is frozen")
                finally:
                    os.kill(broker.pid, signal.SIGCONT)
                first_503 = sender.statuses().index(503)
                wait_until(
                    lambda: 202 in sender.statuses()[first_503:], 60, "202 again once Kafka is back"
                )
            finally:
                sender.stop()
            answers = list(sender.answers)
            assert {status for _, status, _ in answers} == {202, 503}
            assert all(
                after == str(settings.http_retry_after_s) for _, s, after in answers if s == 503
            )
            accepted = set().union(*(sender.ids(n) for n, status, _ in answers if status == 202))
            on_topic = {
                decode_event(m.value()).event_id
                for m in read_topic(broker.bootstrap, topic, len(accepted), timeout_s=30)
            }
            # Events of a 503 request may be there too (sent again, the workers count them once).
            assert accepted <= on_topic

            os.kill(broker.pid, signal.SIGTERM)  # Kafka gone altogether
            wait_until(lambda: _refused(broker.bootstrap), 30, "the broker to stop")
            answer = server.curl(
                "-X",
                "POST",
                "-H",
                f"Authorization: Bearer {server.create_key('late')}",
                "-H",
                "Content-Type: application/cloudevents+json",
                body=orjson.dumps(event("while-down")),
            )
            assert answer.status == 503
            assert answer.headers["retry-after"] == str(settings.http_retry_after_s)
            assert "send it again" in answer.json()["error"]
            assert server.curl(path="/readyz").status == 503
