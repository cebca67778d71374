"""Other teams' clients against a running ``meterstream serve``: Node.js's fetch, the official
CloudEvents SDK's HTTP binding, and a producer whose answer was lost and who sends again."""

from __future__ import annotations

import socket
import subprocess
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import orjson
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

from meterstream.db import build_engine
from meterstream.events import decode_event
from tests.aggregators.workers import all_applied, events_applied, wait_until, worker
from tests.conftest import read_topic
from tests.ingest.http.server import SOURCE, Server, event

_NODE_SCRIPT = """
const [url, key, now] = process.argv.slice(1);
const event = (id, customer, value) => ({specversion: "1.0", id, source: "billing-api",
  type: "tokens", subject: customer, time: now, data: {value, properties: {model: "m1"}}});
(async () => {
  const answers = [];
  for (const [type, body] of [
    ["application/cloudevents+json", event("node-1", "cust-n", "0.000000000001")],
    ["application/cloudevents-batch+json",
     [event("node-2", "cust-n", "7"), event("node-3", "cust-m", 3)]],
    ["application/cloudevents+json", event("node-4", "cust-n", 1.5)],
  ]) {
    const answer = await fetch(url, {method: "POST", body: JSON.stringify(body),
      headers: {"Content-Type": type, "Authorization": `Bearer ${key}`}});
    answers.push({status: answer.status, body: await answer.json()});
  }
  console.log(JSON.stringify(answers));
})();
"""


def test_nodejs_fetch_sends_events_and_reads_the_answers(serve: Callable[..., Server]) -> None:
    server = serve()
    key = server.create_key("node-service")
    now = datetime.now(UTC).isoformat()
    done = subprocess.run(
        ["node", "-e", _NODE_SCRIPT, f"{server.url}/v1/events", key, now],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answers = orjson.loads(done.stdout)
    assert [a["status"] for a in answers] == [202, 202, 400]
    assert answers[1]["body"] == {"accepted": 2}
    assert answers[2]["body"]["problems"][0]["field"] == "data.value"
    messages = read_topic(server.settings.kafka_bootstrap, server.settings.topic, 3)
    values = {decode_event(m.value()).event_id: decode_event(m.value()).value for m in messages}
    assert values == {
        "node-1": Decimal("0.000000000001"),
        "node-2": Decimal(7),
        "node-3": Decimal(3),
    }


def _send(url: str, key: str, headers: dict[str, str], body: bytes) -> int:
    request = urllib.request.Request(  # noqa: S310 - our own http URL
        url, data=body, method="POST", headers={**headers, "Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
        status: int = answer.status
        return status


def test_the_official_cloudevents_sdk_http_binding_in_both_modes(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    key = server.create_key("sdk-service")
    url = f"{server.url}/v1/events"
    for mode, convert in (("binary", to_binary_event), ("structured", to_structured_event)):
        cloud_event = CloudEvent(
            attributes={
                "id": f"sdk-{mode}",
                "source": SOURCE,
                "type": "storage_gb_hours",
                "subject": "cust é/1",
                "time": datetime.now(UTC),
                "datacontenttype": "application/json",
            },
            data={"value": "-2.5", "properties": {"tier": "hot"}},
        )
        message = convert(cloud_event)
        assert _send(url, key, dict(message.headers), message.body) == 202
    messages = read_topic(server.settings.kafka_bootstrap, server.settings.topic, 2)
    decoded = sorted((decode_event(m.value()) for m in messages), key=lambda e: e.event_id)
    assert [(e.event_id, e.customer_id, e.value, dict(e.properties)) for e in decoded] == [
        ("sdk-binary", "cust é/1", Decimal("-2.5"), {"tier": "hot"}),
        ("sdk-structured", "cust é/1", Decimal("-2.5"), {"tier": "hot"}),
    ]


def test_a_request_sent_again_after_its_answer_was_lost_is_counted_once(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    server = serve()
    key = server.create_key("retrying")
    batch = orjson.dumps([event(f"r-{i}", customer=f"cust-{i % 7}") for i in range(50)])
    head = (
        f"POST /v1/events HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/cloudevents-batch+json\r\nContent-Length: {len(batch)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    port = int(server.url.rsplit(":", 1)[1])
    settings = server.settings
    # The answer is lost on its way back: the connection closes before the producer reads it,
    # after the server took the events, so the producer cannot know and sends again.
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(head + batch)
        wait_until(
            lambda: len(read_topic(settings.kafka_bootstrap, settings.topic, 50, 1)) == 50,
            timeout_s=30,
            what="the first request's events on the topic",
        )
    answer = server.curl(
        "-X",
        "POST",
        "-H",
        f"Authorization: Bearer {key}",
        "-H",
        "Content-Type: application/cloudevents-batch+json",
        body=batch,
    )
    assert answer.status == 202
    assert len(read_topic(settings.kafka_bootstrap, settings.topic, 100)) == 100
    engine = build_engine(settings)
    try:
        with worker(settings, tmp_path / "worker.log"):
            wait_until(lambda: all_applied(settings, engine), what="the worker to apply the topic")
        assert events_applied(engine) == 50
    finally:
        engine.dispose()
