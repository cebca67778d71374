"""The emulator's webhooks, checked with the stripe SDK's own parsers: signed as Stripe signs,
retried on non-2xx, thin meter error reports fetched in full through the SDK."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import stripe

from stripe_emulator import Emulator, run_stripe_emulator
from stripe_emulator.webhooks import signature_header

SECRET = "whsec_test_first"  # noqa: S105 (a test secret)
NEW_SECRET = "whsec_test_second"  # noqa: S105 (a test secret)


@dataclass
class Receiver:
    """A webhook endpoint that records each delivery and answers from a script of statuses."""

    url: str
    answers: list[int] = field(default_factory=list)
    received: list[tuple[str, bytes]] = field(default_factory=list)  # (signature, body)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.02)
        raise AssertionError(f"expected {count} deliveries, got {len(self.received)}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    box: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            me = box[0]
            with me.lock:
                me.received.append((self.headers["Stripe-Signature"], body))
                status = me.answers.pop(0) if me.answers else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box.append(Receiver(f"http://127.0.0.1:{server.server_address[1]}/hooks"))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield box[0]
    server.shutdown()
    server.server_close()
    thread.join()


def _control(emulator: Emulator, path: str, body: object) -> Any:
    request = urllib.request.Request(  # noqa: S310 (a loopback URL the test made)
        emulator.url + "/_emulator/" + path, data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        return json.loads(answer.read())


def _client(emulator: Emulator) -> stripe.StripeClient:
    return stripe.StripeClient(
        "sk_test_x", base_addresses={"api": emulator.url, "meter_events": emulator.url}
    )


@pytest.fixture
def emulator(receiver: Receiver) -> Iterator[Emulator]:
    with run_stripe_emulator(rate_limit_per_s=None) as running:
        running.webhooks.retry_base_s = 0.02
        _control(running, "webhooks", {"url": receiver.url, "secrets": [SECRET, NEW_SECRET]})
        yield running


def _wait(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_signature_matches_the_sdk() -> None:
    payload = b'{"id": "evt_1", "object": "event"}'
    header = signature_header(payload, [SECRET], 1_795_500_000)
    expected = stripe.WebhookSignature.generate_signature_header(
        payload.decode(), SECRET, timestamp=1_795_500_000
    )
    assert header == expected


def test_invoice_event_verifies_with_either_secret_while_rolled(
    emulator: Emulator, receiver: Receiver
) -> None:
    client = _client(emulator)
    customer = client.v1.customers.create(params={"name": "Acme"})
    sent = _control(
        emulator,
        "invoices",
        {"customer": customer.id, "outcome": "payment_failed", "amount_due": 4200},
    )
    ((header, body),) = receiver.wait_for(1)
    for secret in (SECRET, NEW_SECRET):
        event = stripe.Webhook.construct_event(body, header, secret, tolerance=300)
        assert event.id == sent["id"]
        assert event.type == "invoice.payment_failed"
        invoice = event.data.object
        assert (invoice["customer"], invoice["amount_remaining"], invoice["attempt_count"]) == (
            customer.id,
            4200,
            1,
        )
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body, header, "whsec_wrong", tolerance=300)


def test_non_2xx_is_retried_until_accepted(emulator: Emulator, receiver: Receiver) -> None:
    receiver.answers = [500, 400]
    customer = _client(emulator).v1.customers.create(params={})
    _control(emulator, "invoices", {"customer": customer.id, "outcome": "paid"})
    deliveries = receiver.wait_for(3)
    assert len({body for _, body in deliveries}) == 1  # the same event each time
    _wait(lambda: emulator.webhooks.deliveries()[0].delivered)
    assert emulator.webhooks.deliveries()[0].statuses == [500, 400, 200]


def test_rejected_stream_events_come_back_as_a_thin_error_report(
    emulator: Emulator, receiver: Receiver
) -> None:
    emulator.notifier.samples_per_code = 2
    client = _client(emulator)
    customer = client.v1.customers.create(params={})
    meter = client.v1.billing.meters.create(
        params={
            "display_name": "API calls",
            "event_name": "api_calls",
            "default_aggregation": {"formula": "sum"},
        }
    )
    session = client.v2.billing.meter_event_session.create()
    stream = stripe.StripeClient(
        session.authentication_token,
        base_addresses={"api": emulator.url, "meter_events": emulator.url},
    )
    bad = [f"bad-{i}" for i in range(3)]
    events = [
        {"event_name": "api_calls", "identifier": b, "payload": {"stripe_customer_id": "cus_nx"}}
        for b in bad
    ]
    events.append(
        {
            "event_name": "api_calls",
            "identifier": "good",
            "payload": {"stripe_customer_id": customer.id, "value": "3"},
        }
    )
    stream.v2.billing.meter_event_stream.create(params={"events": events})

    ((header, body),) = receiver.wait_for(1)
    with pytest.raises(ValueError, match="thin event"):
        stripe.Webhook.construct_event(body, header, SECRET, tolerance=300)
    notification = client.parse_event_notification(body, header, SECRET, tolerance=300)
    assert notification.type == "v1.billing.meter.error_report_triggered"
    assert notification.related_object.id == meter.id  # type: ignore[attr-defined]
    full = notification.fetch_event()
    reason = full.data.reason  # type: ignore[attr-defined]
    assert reason.error_count == 3
    (kind,) = reason.error_types
    assert (kind.code, kind.error_count) == ("meter_event_customer_not_found", 3)
    assert [s.request.identifier for s in kind.sample_errors] == bad[:2]  # samples only


def test_unknown_event_name_is_reported_as_no_meter_found(
    emulator: Emulator, receiver: Receiver
) -> None:
    client = _client(emulator)
    session = client.v2.billing.meter_event_session.create()
    stream = stripe.StripeClient(
        session.authentication_token,
        base_addresses={"api": emulator.url, "meter_events": emulator.url},
    )
    stream.v2.billing.meter_event_stream.create(
        params={"events": [{"event_name": "nope", "identifier": "x1", "payload": {}}]}
    )
    ((header, body),) = receiver.wait_for(1)
    notification = client.parse_event_notification(body, header, NEW_SECRET, tolerance=300)
    assert notification.type == "v1.billing.meter.no_meter_found"
    full = notification.fetch_event()
    sample = full.data.reason.error_types[0].sample_errors[0]  # type: ignore[attr-defined]
    assert "nope" in sample.error_message
