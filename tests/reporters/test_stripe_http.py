"""The lean HTTP client under the real stripe SDK, against the emulator over real sockets:
the SDK's retries keep their Idempotency-Key, a failed call is never billed twice, a pooled
connection the server closed is replaced without a failed call."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import stripe
from prometheus_client import CollectorRegistry

from meterstream.metrics import ReporterMetrics
from reporters.stripe_http import KeepAliveClient, ResponseHeaders, proxy_configured
from reporters.stripe_push import build_http_client
from stripe_emulator import Emulator, run_stripe_emulator
from tests.reporters.test_reporter import world_settings

SECRET = "sk_test_51H8lean0client"  # noqa: S105  # a fake key
PATH = "/v1/billing/meter_events"


class Retries:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with run_stripe_emulator(rate_limit_per_s=None) as running:
        running.state.create_meter(display_name="tokens", event_name="tokens", formula="sum")
        running.state.create_customer(customer_id="cus_a")
        yield running


def sdk_client(url: str, http_client: KeepAliveClient) -> stripe.StripeClient:
    return stripe.StripeClient(
        SECRET,
        base_addresses={"api": url, "meter_events": url},
        max_network_retries=2,
        http_client=http_client,
    )


def create_event(client: stripe.StripeClient, identifier: str, **options: Any) -> Any:
    """A meter event; no Idempotency-Key of ours unless given: the SDK makes one up."""
    params: Any = {
        "event_name": "tokens",
        "payload": {"stripe_customer_id": "cus_a", "value": "3"},
        "identifier": identifier,
        "timestamp": int(time.time()) - 60,
    }
    return client.v1.billing.meter_events.create(params=params, options=options)


def test_answer_lost_on_a_dropped_connection_is_replayed_under_the_same_key(
    emulator: Emulator,
) -> None:
    retries = Retries()
    client = sdk_client(emulator.url, KeepAliveClient(10.0, on_retry=retries))
    create_event(client, f"warm_{uuid.uuid4().hex}")  # the next call reuses a live connection
    emulator.faults.inject("drop_connection", path_prefix=PATH)
    identifier = f"ev_{uuid.uuid4().hex}"

    answer = create_event(client, identifier)

    # The emulator recorded the event, then cut the connection; the SDK's retry carried the
    # Idempotency-Key it made up for the first try, so the saved answer was replayed (a new
    # key would have met "An event already exists" instead of a 200).
    assert answer.identifier == identifier
    assert answer.last_response.headers["Idempotent-Replayed"] == "true"
    assert [e.identifier for e in emulator.state.events].count(identifier) == 1
    assert emulator.faults.fired == (("drop_connection", PATH),)
    assert retries.count == 1


def test_500_then_success_records_the_event_once(emulator: Emulator) -> None:
    retries = Retries()
    client = sdk_client(emulator.url, KeepAliveClient(10.0, on_retry=retries))
    emulator.faults.inject("http_500", path_prefix=PATH)
    identifier = f"ev_{uuid.uuid4().hex}"

    answer = create_event(client, identifier, idempotency_key=identifier)

    assert answer.last_response.request_id.startswith("req_")
    assert answer.last_response.idempotency_key == identifier
    assert [e.identifier for e in emulator.state.events] == [identifier]
    assert retries.count == 1


def test_500s_past_the_retries_raise_and_record_nothing(emulator: Emulator) -> None:
    client = sdk_client(emulator.url, KeepAliveClient(10.0))
    emulator.faults.inject("http_500", count=3, path_prefix=PATH)

    with pytest.raises(stripe.APIError):
        create_event(client, f"ev_{uuid.uuid4().hex}")
    assert not emulator.state.events


def _answer_meter_event(handler: BaseHTTPRequestHandler) -> None:
    """A 200 with a meter event, its length given (the connection may stay open)."""
    body = json.dumps({"object": "billing.meter_event", "identifier": "ev_1"}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class _OneCallPerConnection(BaseHTTPRequestHandler):
    """Answers a meter event, then closes the connection without saying so (no
    "Connection: close"), as a server does with a keep-alive connection it finds idle."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        _answer_meter_event(self)
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


class _ClosingServer(ThreadingHTTPServer):
    """Says when it has closed a connection, so the test calls again only after that."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OneCallPerConnection)
        self.closed = threading.Semaphore(0)

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        self.closed.release()


def test_pooled_connection_the_server_closed_is_replaced_without_a_failed_call() -> None:
    retries = Retries()
    http_client = KeepAliveClient(10.0, on_retry=retries)
    server = _ClosingServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        client = sdk_client(f"http://127.0.0.1:{server.server_address[1]}", http_client)
        for n in range(3):
            create_event(client, f"ev_{n}")
            assert server.closed.acquire(timeout=30)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        http_client.close()
    assert retries.count == 0


def test_unreachable_server_is_a_retryable_connection_error_without_the_key() -> None:
    retries = Retries()
    with run_stripe_emulator(rate_limit_per_s=None) as closed:
        dead_url = closed.url
    client = sdk_client(dead_url, KeepAliveClient(10.0, on_retry=retries))

    with pytest.raises(stripe.APIConnectionError) as raised:
        create_event(client, f"ev_{uuid.uuid4().hex}")

    assert raised.value.should_retry
    assert retries.count == 2  # the SDK's max_network_retries
    assert SECRET not in str(raised.value)


def test_response_headers_are_found_regardless_of_case() -> None:
    headers = ResponseHeaders([("Request-Id", "req_1"), ("Stripe-Should-Retry", "false")])

    assert headers["request-id"] == headers["REQUEST-ID"] == "req_1"
    assert "stripe-should-retry" in headers
    assert headers.get("idempotency-key") is None
    assert dict(headers) == {"request-id": "req_1", "stripe-should-retry": "false"}


def test_a_header_sent_twice_reads_as_both_values_joined() -> None:
    headers = ResponseHeaders([("Vary", "Origin"), ("Request-Id", "req_1"), ("vary", "Accept")])

    assert headers["Vary"] == "Origin, Accept"  # as requests joins them
    assert len(headers) == 2


def test_invalid_url_is_a_local_error_and_not_retried(emulator: Emulator) -> None:
    retries = Retries()
    http_client = KeepAliveClient(10.0, on_retry=retries)
    try:
        with pytest.raises(stripe.APIConnectionError) as raised:
            # a space in the path: http.client refuses it (InvalidURL) before sending
            http_client.request_with_retries(
                "post", f"{emulator.url}{PATH}/bad path", {}, b"", max_network_retries=2
            )
    finally:
        http_client.close()

    assert not raised.value.should_retry
    assert "InvalidURL" in str(raised.value)
    assert retries.count == 0
    assert not emulator.state.events


def test_a_failed_tls_handshake_is_not_retried(emulator: Emulator) -> None:
    retries = Retries()
    client = sdk_client(
        emulator.url.replace("http://", "https://"), KeepAliveClient(10.0, on_retry=retries)
    )

    # TLS to a server that speaks plain HTTP: an SSLError that is no cut connection
    with pytest.raises(stripe.APIConnectionError) as raised:
        create_event(client, f"ev_{uuid.uuid4().hex}")

    assert not raised.value.should_retry
    assert retries.count == 0


class _HeldKeepAlive(BaseHTTPRequestHandler):
    """Answers a meter event once the test lets it, and keeps the connection open after."""

    protocol_version = "HTTP/1.1"
    received: threading.Event
    answer: threading.Event

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.set()
        assert type(self).answer.wait(timeout=30)
        _answer_meter_event(self)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def test_close_during_a_call_closes_its_connection_when_the_call_ends() -> None:
    handler = type(
        "Handler", (_HeldKeepAlive,), {"received": threading.Event(), "answer": threading.Event()}
    )
    server = _ClosingServer()
    server.RequestHandlerClass = handler
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    serving.start()
    http_client = KeepAliveClient(10.0)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            create_event(
                sdk_client(f"http://127.0.0.1:{server.server_address[1]}", http_client), "ev_1"
            )
        except BaseException as exc:
            errors.append(exc)

    calling = threading.Thread(target=call)
    try:
        calling.start()
        assert handler.received.wait(timeout=30)
        http_client.close()  # the call is in flight: its connection is not idle yet
        handler.answer.set()
        calling.join(timeout=30)
        assert not errors
        # The client closed the connection after the answer instead of pooling it, so the
        # server sees it end (it would otherwise stay open, idle, until the process exits).
        assert server.closed.acquire(timeout=30)
    finally:
        handler.answer.set()
        calling.join(timeout=30)
        server.shutdown()
        server.server_close()
        serving.join()


@pytest.fixture
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


def test_a_proxy_named_only_in_all_proxy_keeps_the_requests_client(
    no_proxy_environment: pytest.MonkeyPatch, emulator: Emulator, tmp_path: Path
) -> None:
    no_proxy_environment.setenv("ALL_PROXY", "http://proxy.internal:3128")
    settings = world_settings(emulator, f"sqlite:///{tmp_path / 'm.db'}", tmp_path)

    assert proxy_configured("https://api.stripe.com")
    http_client = build_http_client(settings, ReporterMetrics(CollectorRegistry()))
    assert isinstance(http_client, stripe.RequestsClient)


def test_a_host_in_no_proxy_keeps_the_lean_client(
    no_proxy_environment: pytest.MonkeyPatch, emulator: Emulator, tmp_path: Path
) -> None:
    no_proxy_environment.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    no_proxy_environment.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    no_proxy_environment.setenv("NO_PROXY", "stripe.com,127.0.0.1")
    settings = world_settings(emulator, f"sqlite:///{tmp_path / 'm.db'}", tmp_path)

    assert not proxy_configured("https://api.stripe.com")
    assert proxy_configured("https://example.com")
    http_client = build_http_client(settings, ReporterMetrics(CollectorRegistry()))
    assert isinstance(http_client, KeepAliveClient)
    http_client.close()
