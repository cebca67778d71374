"""POST /v1/events against a running ``meterstream serve``, with curl: every rule, its answer."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from meterstream.events import decode_event
from tests.conftest import read_topic
from tests.ingest.http.server import SOURCE, Answer, Server, event


def post(server: Server, key: str, body: Any, content_type: str, *extra: str) -> Answer:
    return server.post(key, body, content_type, *extra)


STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"


def test_one_event_a_batch_and_binary_mode_reach_kafka_as_the_sdk_encodes_them(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    key = server.create_key("producer")
    assert post(server, key, event("s-1", value="12.5"), STRUCTURED).status == 202
    batch = [event(f"b-{i}", customer=f"cust-{i}", meter="tokens", value=str(i)) for i in range(3)]
    answer = post(server, key, batch, BATCH)
    assert (answer.status, answer.json()) == (202, {"accepted": 3})
    binary = server.curl(
        "-X",
        "POST",
        "-H",
        f"Authorization: Bearer {key}",
        "-H",
        "Content-Type: application/json",
        "-H",
        "ce-specversion: 1.0",
        "-H",
        "ce-id: bin-1",
        "-H",
        f"ce-source: {SOURCE}",
        "-H",
        "ce-type: api_calls",
        "-H",
        "ce-subject: cust%20%C3%A9",  # percent-encoded, as the HTTP binding says
        "--data-binary",
        '{"value": 2, "properties": {"region": "eu"}}',
    )
    assert binary.status == 202, binary.body

    messages = read_topic(server.settings.kafka_bootstrap, server.settings.topic, 5)
    events = {
        decode_event(m.value()).event_id: (m.key(), decode_event(m.value())) for m in messages
    }
    assert sorted(events) == ["b-0", "b-1", "b-2", "bin-1", "s-1"]
    key_bytes, single = events["s-1"]
    assert (key_bytes, single.value, single.source, single.meter) == (
        b"cust-1",
        __import__("decimal").Decimal("12.5"),
        SOURCE,
        "api_calls",
    )
    _key, from_binary = events["bin-1"]
    assert (from_binary.customer_id, dict(from_binary.properties)) == ("cust é", {"region": "eu"})
    assert events["b-2"][1].value == 2


def test_one_bad_event_refuses_the_whole_batch_naming_index_field_and_reason(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    key = server.create_key("producer")
    batch = [
        event("ok-0"),
        event("bad-1", value=1.5),
        event("ok-2"),
        event("bad-3", meter="no_such_meter"),
        event("bad-4", source="someone-else"),
        event("bad-5", time=(datetime.now(UTC) + timedelta(days=1)).isoformat()),
    ]
    answer = post(server, key, batch, BATCH)
    assert answer.status == 400
    problems = {p["index"]: p for p in answer.json()["problems"]}
    assert sorted(problems) == [1, 3, 4, 5]
    assert problems[1]["field"] == "data.value" and "not exact" in problems[1]["reason"]
    assert problems[3]["field"] == "type" and "unknown meter" in problems[3]["reason"]
    assert problems[4]["field"] == "source" and SOURCE in problems[4]["reason"]
    assert problems[5]["field"] == "time" and "ahead" in problems[5]["reason"]
    # Nothing of the refused batch was produced: the topic holds only what follows.
    assert post(server, key, event("after"), STRUCTURED).status == 202
    messages = read_topic(server.settings.kafka_bootstrap, server.settings.topic, 2, timeout_s=3)
    assert [decode_event(m.value()).event_id for m in messages] == ["after"]


def test_every_refusal_has_its_status_and_produces_nothing(serve: Callable[..., Server]) -> None:
    server = serve(http_max_body_bytes=1024 * 1024)
    key = server.create_key("producer")
    reader = server.create_key("dashboard", scope="read")
    huge_properties = {f"p{i}": "x" * 1000 for i in range(70)}
    cases: list[tuple[str, Answer, int, str]] = [
        (
            "no key",
            server.curl("-X", "POST", "-H", f"Content-Type: {STRUCTURED}", "-d", "{}"),
            401,
            "Bearer",
        ),
        (
            "unknown key",
            post(server, "msk_0000000000000000_" + "0" * 64, event("x"), STRUCTURED),
            401,
            "unknown or revoked",
        ),
        ("malformed key", post(server, "hunter2", event("x"), STRUCTURED), 401, "unknown"),
        ("read-only key", post(server, reader, event("x"), STRUCTURED), 403, "scope 'read'"),
        ("wrong media type", post(server, key, event("x"), "text/plain"), 415, "Content-Type"),
        ("not JSON", post(server, key, b"{not json", STRUCTURED), 400, "not JSON"),
        ("empty batch", post(server, key, [], BATCH), 400, "empty"),
        (
            "batch over 1,000",
            post(server, key, [event(f"n{i}") for i in range(1001)], BATCH),
            413,
            "at most 1000",
        ),
        (
            "body over the limit",
            post(server, key, b"[" + b" " * (1024 * 1024) + b"]", BATCH),
            413,
            "METERSTREAM_HTTP_MAX_BODY_BYTES",
        ),
        (
            "event over 64 KiB",
            post(
                server,
                key,
                event("big", meter="tokens", data={"value": "1", "properties": huge_properties}),
                STRUCTURED,
            ),
            413,
            "bytes; at most 65536",
        ),
        (
            "no subject",
            post(server, key, {**event("x"), "subject": ""}, STRUCTURED),
            400,
            "subject",
        ),
        (
            "binary without ce-id",
            server.curl(
                "-X",
                "POST",
                "-H",
                f"Authorization: Bearer {key}",
                "-H",
                "Content-Type: application/json",
                "-H",
                "ce-specversion: 1.0",
                "-H",
                f"ce-source: {SOURCE}",
                "-H",
                "ce-type: api_calls",
                "-H",
                "ce-subject: c",
                "-d",
                '{"value": "1"}',
            ),
            400,
            '"field":"id"',
        ),
        (
            "binary, data not JSON",
            server.curl(
                "-X",
                "POST",
                "-H",
                f"Authorization: Bearer {key}",
                "-H",
                "Content-Type: text/csv",
                "-H",
                "ce-specversion: 1.0",
                "-d",
                "1,2",
            ),
            415,
            "must be JSON",
        ),
    ]
    for name, answer, status, words in cases:
        assert answer.status == status, (name, answer)
        assert words in answer.body.decode(), (name, answer.body)
        assert "error" in answer.json(), name
    assert post(server, key, event("after"), STRUCTURED).status == 202
    messages = read_topic(server.settings.kafka_bootstrap, server.settings.topic, 2, timeout_s=3)
    assert [decode_event(m.value()).event_id for m in messages] == ["after"]


def test_a_revoked_key_is_refused_by_every_server_within_the_cache_period(
    serve: Callable[..., Server],
) -> None:
    from tests.aggregators.workers import wait_until
    from tests.cli.commands import meterstream

    # Two servers on one database (the test's), as two replicas behind a load balancer.
    servers = [serve(http_api_key_cache_s=1.0), serve(http_api_key_cache_s=1.0)]
    key = servers[0].create_key("leaving")
    for number, server in enumerate(servers):
        assert post(server, key, event(f"before-{number}"), STRUCTURED).status == 202
    done = meterstream(servers[0].env(), "api-keys", "revoke", "leaving")
    assert done.returncode == 0, done.stderr
    for server in servers:
        wait_until(
            lambda server=server: post(server, key, event("after"), STRUCTURED).status == 401,
            timeout_s=15,
            what="the revoked key to be refused",
        )
        assert post(server, key, event("again"), STRUCTURED).status == 401
    listed = orjson.loads(meterstream(servers[1].env(), "api-keys", "list", "--json").stdout)
    assert [(k["name"], k["revoked_at"] is not None) for k in listed] == [("leaving", True)]


def test_metrics_health_and_the_openapi_document(serve: Callable[..., Server]) -> None:
    server = serve()
    key = server.create_key("producer")
    assert post(server, key, [event("m1"), event("m2")], BATCH).status == 202
    assert post(server, key, [event("m3", value=1.5)], BATCH).status == 400
    assert server.curl(path="/healthz").json() == {"status": "ok"}
    assert server.curl(path="/readyz").json() == {"status": "ready"}
    metrics = server.curl(path="/metrics").body.decode()
    for line in (
        'meterstream_http_requests_total{route="/v1/events",status="202"} 1.0',
        'meterstream_http_requests_total{route="/v1/events",status="400"} 1.0',
        "meterstream_http_events_accepted_total 2.0",
        'meterstream_http_events_refused_total{reason="data"} 1.0',
        "meterstream_http_produce_duration_seconds_count 1.0",
        'meterstream_http_request_duration_seconds_count{route="/v1/events"} 2.0',
    ):
        assert line in metrics, line
    document = server.curl(path="/openapi.json").json()
    assert {"/v1/events", "/healthz", "/readyz", "/metrics"} <= set(document["paths"])
    assert "CloudEvent" in document["components"]["schemas"]
    # The key is a secret: not in the metrics, not in the server's log.
    assert key not in metrics
    assert key.split("_")[2] not in server.log.read_text()


def test_api_key_commands_on_a_database_never_migrated_say_to_migrate(tmp_path: Path) -> None:
    import os

    from tests.cli.commands import meterstream

    env = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    env["METERSTREAM_DATABASE_URL"] = f"sqlite:///{tmp_path / 'new.db'}"
    for arguments in (("list",), ("create", "k", "--source", "s"), ("revoke", "k")):
        done = meterstream(env, "api-keys", *arguments)
        assert done.returncode == 2, done.stderr
        assert "run meterstream migrate" in done.stderr
        assert "Traceback" not in done.stderr


def test_a_body_sent_a_byte_at_a_time_is_answered_408_and_the_server_serves_others(
    serve: Callable[..., Server],
) -> None:
    # Slowloris: uvicorn gives a body no deadline, so this request used to be held for ever.
    server = serve(http_body_timeout_s=0.5)
    key = server.create_key("producer")
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as slow:
        slow.sendall(
            (
                "POST /v1/events HTTP/1.1\r\n"
                f"Host: {host}\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: {STRUCTURED}\r\nContent-Length: 1000\r\n\r\n{{"
            ).encode()
        )
        assert post(server, key, event("meanwhile"), STRUCTURED).status == 202
        answer = b""
        while b"METERSTREAM_HTTP_BODY_TIMEOUT_S" not in answer:
            received = slow.recv(4096)
            assert received, answer  # closed without saying why
            answer += received
    assert answer.startswith(b"HTTP/1.1 408"), answer


def test_endless_headers_are_refused_431_and_the_server_serves_others(
    serve: Callable[..., Server],
) -> None:
    # uvicorn with httptools kept every header byte of an unfinished head: one client without
    # a key could grow the server without limit (100 MB of headers: +115 MB resident).
    server = serve()
    key = server.create_key("producer")
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    answer = b""
    with socket.create_connection((host, int(port)), timeout=10) as endless:
        endless.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n".encode())
        line = b"X-Padding: " + b"p" * 1000 + b"\r\n"
        try:
            for _ in range(2_000):  # 2 MB of headers, never ended
                endless.sendall(line)
        except OSError:
            pass  # refused and closed while sending: what is wanted
        try:
            while received := endless.recv(4096):
                answer += received
        except ConnectionResetError:
            pass  # closed with unread bytes: the kernel resets; the 431 may be lost
    assert answer.startswith(b"HTTP/1.1 431") or answer == b"", answer
    assert post(server, key, event("after"), STRUCTURED).status == 202


def test_headers_trickled_or_never_sent_are_cut_off_and_the_server_serves_others(
    serve: Callable[..., Server],
) -> None:
    # Slowloris before any key is read: uvicorn gives a head no deadline, so a connection that
    # sent part of its headers, or nothing, was held for ever.
    server = serve(http_head_timeout_s=0.5)
    key = server.create_key("producer")
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as silent,
        socket.create_connection((host, int(port)), timeout=10) as trickling,
    ):
        trickling.sendall(f"POST /v1/events HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode())
        assert post(server, key, event("meanwhile"), STRUCTURED).status == 202
        for connection in (silent, trickling):
            with contextlib.suppress(ConnectionResetError):
                assert connection.recv(4096) == b""  # closed by the server
