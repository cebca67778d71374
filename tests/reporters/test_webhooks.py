"""Stripe's webhooks, from the emulator's signed deliveries over HTTP to their effects in the
database: meter error reports reject the named ledger rows, payment failures open and close,
duplicates and disorder change nothing, a failing action is retried and never dropped.

The route runs in a real uvicorn server on a thread (the end-to-end tests through
``meterstream serve`` are in tests/cli/test_serve_webhooks.py); the processor runs on demand,
so each test decides when events are acted on."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import stripe
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine, select

from meterstream.metrics import WebhookMetrics
from meterstream.schema import (
    billing_alert_counts,
    customer_links,
    ledger,
    meter_error_counts,
    payment_failures,
    stripe_webhook_events,
)
from reporters import ledger as ledger_rows
from reporters.ledger import LedgerRow
from reporters.webhooks import WebhookProcessor, open_failures
from reporters.webhooks.route import PATH, webhooks_router
from stripe_emulator import Emulator, run_stripe_emulator

SECRET = "whsec_testsecret1"  # noqa: S105 (a test secret)
NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)


@dataclass
class Hooks:
    engine: Engine
    emulator: Emulator
    client: stripe.StripeClient
    processor: WebhookProcessor
    metrics: WebhookMetrics
    url: str

    def control(self, path: str, body: object) -> Any:
        request = urllib.request.Request(  # noqa: S310 (loopback)
            self.emulator.url + "/_emulator/" + path,
            data=json.dumps(body).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            return json.loads(answer.read())

    def stored(self, count: int, timeout_s: float = 15.0) -> list[Any]:
        """Wait until ``count`` events are stored, and the emulator saw them delivered."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.engine.connect() as connection:
                rows = connection.execute(select(stripe_webhook_events)).all()
            deliveries = self.emulator.webhooks.deliveries()
            if len(rows) >= count and all(d.delivered for d in deliveries):
                return list(rows)
            time.sleep(0.02)
        raise AssertionError(f"expected {count} stored events, found {len(rows)}")

    def customer(self) -> str:
        return str(self.client.v1.customers.create(params={}).id)


def _serve(app: FastAPI) -> Iterator[str]:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise AssertionError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def hooks(migrated_engine: Engine) -> Iterator[Hooks]:
    with run_stripe_emulator(rate_limit_per_s=None) as emulator:
        emulator.webhooks.retry_base_s = 0.02
        emulator.notifier.report_interval_s = 0.05
        client = stripe.StripeClient(
            "sk_test_x", base_addresses={"api": emulator.url, "meter_events": emulator.url}
        )
        metrics = WebhookMetrics()
        app = FastAPI()
        app.include_router(webhooks_router((SECRET,), migrated_engine, client, metrics))
        for base in _serve(app):
            emulator.webhooks.configure(base + PATH, [SECRET])
            processor = WebhookProcessor(migrated_engine, client, metrics)
            yield Hooks(migrated_engine, emulator, client, processor, metrics, base + PATH)


def _metric(metrics: WebhookMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


# -- meter error reports ------------------------------------------------------------------------


def _accepted_row(identifier: str, sequence: int, customer: str) -> LedgerRow:
    start = NOW - timedelta(hours=sequence + 1)
    return LedgerRow(
        customer_id=customer,
        meter="api_calls",
        window_start=start,
        window_end=start + timedelta(hours=1),
        revision=1,
        sequence=sequence,
        window_value=Decimal(2),
        accounted_total=Decimal(2 * (sequence + 1)),
        units_total=2 * (sequence + 1),
        value=2,
        event_name="api_calls",
        stripe_customer_id=customer,
        timestamp=start,
        identifier=identifier,
        status="accepted",
        attempts=1,
        first_attempt_at=NOW,
        error_code=None,
        last_error=None,
        stripe_request_id=None,
        created_at=NOW,
        updated_at=NOW,
        sent_at=NOW,
        unit_scale=Decimal(1),
    )


def _stream(hooks: Hooks, events: list[dict[str, Any]]) -> None:
    session = hooks.client.v2.billing.meter_event_session.create()
    stream = stripe.StripeClient(
        session.authentication_token,
        base_addresses={"api": hooks.emulator.url, "meter_events": hooks.emulator.url},
    )
    stream.v2.billing.meter_event_stream.create(params={"events": events})


def test_thin_error_report_rejects_the_named_rows_and_counts_the_rest(hooks: Hooks) -> None:
    hooks.emulator.notifier.samples_per_code = 2
    good_customer = hooks.customer()
    hooks.client.v1.billing.meters.create(
        params={
            "display_name": "API calls",
            "event_name": "api_calls",
            "default_aggregation": {"formula": "sum"},
        }
    )
    identifiers = [f"ms2_test_{n}" for n in range(4)]
    with hooks.engine.begin() as connection:
        ledger_rows.insert_rows(
            connection, [_accepted_row(i, n, "cus_gone") for n, i in enumerate(identifiers[:3])]
        )
        ledger_rows.insert_rows(connection, [_accepted_row(identifiers[3], 9, good_customer)])
    # Three events of a customer Stripe does not know (refused after the 202), one good.
    _stream(
        hooks,
        [
            {
                "event_name": "api_calls",
                "identifier": identifier,
                "payload": {
                    "stripe_customer_id": "cus_gone" if n < 3 else good_customer,
                    "value": "2",
                },
            }
            for n, identifier in enumerate(identifiers)
        ],
    )
    (stored,) = hooks.stored(1)
    assert (stored.type, stored.payload_kind, stored.status) == (
        "v1.billing.meter.error_report_triggered",
        "thin",
        "pending",
    )
    assert hooks.processor.run_once() == 1

    with hooks.engine.connect() as connection:
        statuses = dict(connection.execute(select(ledger.c.identifier, ledger.c.status)).all())
        codes = dict(connection.execute(select(ledger.c.identifier, ledger.c.error_code)).all())
        (count,) = connection.execute(select(meter_error_counts)).all()
    # Stripe sampled two of the three: those are rejected; the third waits for reconcile.
    assert [statuses[i] for i in identifiers] == ["rejected", "rejected", "accepted", "accepted"]
    assert codes[identifiers[0]] == "meter_event_customer_not_found"
    assert (count.event_name, count.code, count.errors_total) == (
        "api_calls",
        "meter_event_customer_not_found",
        3,
    )
    assert (count.rows_rejected, count.unidentified) == (2, 1)
    assert _metric(
        hooks.metrics,
        "meterstream_stripe_meter_errors_total",
        event_name="api_calls",
        code="meter_event_customer_not_found",
    ) == pytest.approx(3)

    # Delivered again (Stripe's duplicate): stored once, counted once.
    hooks.emulator.webhooks.resend(stored.event_id)
    _wait(lambda: sum(d.delivered for d in hooks.emulator.webhooks.deliveries()) == 2)
    assert hooks.processor.run_once() == 0
    with hooks.engine.connect() as connection:
        assert connection.execute(select(meter_error_counts.c.errors_total)).scalar() == 3
        assert connection.execute(select(stripe_webhook_events.c.deliveries)).scalar() == 2


def test_no_meter_found_is_counted_under_the_event_name(hooks: Hooks) -> None:
    _stream(hooks, [{"event_name": "renamed_meter", "identifier": "x-1", "payload": {}}])
    hooks.stored(1)
    hooks.processor.run_once()
    with hooks.engine.connect() as connection:
        (count,) = connection.execute(select(meter_error_counts)).all()
    assert (count.event_name, count.code, count.errors_total) == ("renamed_meter", "no_meter", 1)
    assert _metric(
        hooks.metrics,
        "meterstream_stripe_meter_errors_total",
        event_name="renamed_meter",
        code="no_meter",
    ) == pytest.approx(1)


# -- payment failures ---------------------------------------------------------------------------


def _open(hooks: Hooks) -> list[Any]:
    with hooks.engine.connect() as connection:
        return list(open_failures(connection))


def test_payment_failure_opens_and_payment_closes_it(hooks: Hooks) -> None:
    customer = hooks.customer()
    with hooks.engine.begin() as connection:
        connection.execute(
            customer_links.insert().values(
                customer_id="acme", stripe_customer_id=customer, created_at=NOW, updated_at=NOW
            )
        )
    hooks.control(
        "invoices",
        {
            "customer": customer,
            "invoice": "in_test_1",
            "outcome": "payment_failed",
            "amount_due": 12_345,
            "currency": "eur",
            "failure_code": "insufficient_funds",
        },
    )
    hooks.stored(1)
    hooks.processor.run_once()
    (failure,) = _open(hooks)
    assert (failure.invoice_id, failure.customer_id, failure.stripe_customer_id) == (
        "in_test_1",
        "acme",
        customer,
    )
    assert (failure.amount_remaining, failure.currency, failure.attempts) == (12_345, "eur", 1)
    assert failure.failure_code == "insufficient_funds"
    assert failure.next_payment_attempt is not None
    assert _metric(hooks.metrics, "meterstream_stripe_payment_failures_open") == 1
    assert _metric(
        hooks.metrics, "meterstream_stripe_payment_failures_amount_at_risk", currency="eur"
    ) == pytest.approx(12_345)
    assert _metric(
        hooks.metrics, "meterstream_stripe_payment_failures_total", code="insufficient_funds"
    ) == pytest.approx(1)

    hooks.emulator.state.clock = lambda: time.time() + 5  # Stripe's next event, seconds later
    hooks.control("invoices", {"customer": customer, "invoice": "in_test_1", "outcome": "paid"})
    hooks.stored(2)
    hooks.processor.run_once()
    assert _open(hooks) == []
    with hooks.engine.connect() as connection:
        (row,) = connection.execute(select(payment_failures)).all()
    assert (row.state, row.reason, row.amount_remaining) == ("closed", "paid", 0)
    assert _metric(hooks.metrics, "meterstream_stripe_payment_failures_open") == 0
    assert _metric(
        hooks.metrics, "meterstream_stripe_payment_failures_amount_at_risk", currency="eur"
    ) == pytest.approx(0)


def test_the_same_failure_three_times_counts_once(hooks: Hooks) -> None:
    customer = hooks.customer()
    sent = hooks.control(
        "invoices",
        {"customer": customer, "outcome": "payment_failed", "failure_code": "card_declined"},
    )
    hooks.stored(1)
    for _ in range(2):
        hooks.emulator.webhooks.resend(sent["id"])
    _wait(lambda: sum(d.delivered for d in hooks.emulator.webhooks.deliveries()) == 3)
    assert hooks.processor.run_once() == 1
    assert hooks.processor.run_once() == 0
    (failure,) = _open(hooks)
    assert failure.attempts == 1
    assert _metric(
        hooks.metrics, "meterstream_stripe_payment_failures_total", code="card_declined"
    ) == pytest.approx(1)
    assert _metric(
        hooks.metrics,
        "meterstream_stripe_webhook_events_total",
        type="invoice.payment_failed",
        outcome="duplicate",
    ) == pytest.approx(2)


def test_an_older_failure_after_the_payment_changes_nothing(hooks: Hooks) -> None:
    customer = hooks.customer()
    clock = [time.time()]
    hooks.emulator.state.clock = lambda: clock[0]
    failed = hooks.control(
        "invoices", {"customer": customer, "invoice": "in_test_2", "outcome": "payment_failed"}
    )
    clock[0] += 60
    paid = hooks.control(
        "invoices", {"customer": customer, "invoice": "in_test_2", "outcome": "paid"}
    )
    hooks.stored(2)
    # The processor meets the newer event first: take the older one out of reach until then.
    with hooks.engine.begin() as connection:
        connection.execute(
            stripe_webhook_events.update()
            .where(stripe_webhook_events.c.event_id == failed["id"])
            .values(next_attempt_at=datetime.now(UTC) + timedelta(hours=1))
        )
    assert hooks.processor.run_once() == 1
    with hooks.engine.begin() as connection:
        connection.execute(
            stripe_webhook_events.update()
            .where(stripe_webhook_events.c.event_id == failed["id"])
            .values(next_attempt_at=datetime.now(UTC))
        )
    assert hooks.processor.run_once() == 1
    assert _open(hooks) == []
    with hooks.engine.connect() as connection:
        outcomes = dict(
            connection.execute(
                select(stripe_webhook_events.c.event_id, stripe_webhook_events.c.outcome)
            ).all()
        )
        (row,) = connection.execute(select(payment_failures)).all()
    assert outcomes == {paid["id"]: "applied", failed["id"]: "stale"}
    assert (row.state, row.event_id) == ("closed", paid["id"])


def test_subscription_past_due_marks_the_failure_and_alerts_are_counted(hooks: Hooks) -> None:
    customer = hooks.customer()
    clock = [time.time()]
    hooks.emulator.state.clock = lambda: clock[0]
    hooks.control(
        "invoices",
        {"customer": customer, "invoice": "in_test_3", "outcome": "payment_failed"},
    )
    clock[0] += 1
    hooks.control(
        "subscriptions",
        {"customer": customer, "status": "past_due", "latest_invoice": "in_test_3"},
    )
    hooks.control("billing_alerts", {"customer": customer, "alert": "alrt_1", "value": 1000})
    hooks.control("billing_alerts", {"customer": customer, "alert": "alrt_1", "value": 2000})
    hooks.stored(4)
    hooks.processor.run_once()
    (failure,) = _open(hooks)
    assert (failure.reason, failure.amount_remaining) == ("past_due", 1000)
    with hooks.engine.connect() as connection:
        (alert,) = connection.execute(select(billing_alert_counts)).all()
    assert (alert.alert_id, alert.triggered, alert.last_value) == ("alrt_1", 2, Decimal(2000))


# -- refusals and failures ----------------------------------------------------------------------


def _post(url: str, body: bytes, header: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["Stripe-Signature"] = header
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _event(event_id: str = "evt_test_direct") -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": "invoice.paid",
            "created": int(time.time()),
            "data": {"object": {"id": "in_x", "object": "invoice"}},
        }
    ).encode()


def test_bad_signatures_are_400_and_store_nothing(hooks: Hooks) -> None:
    body = _event()
    now = int(time.time())
    good = stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET, now)
    cases = {
        "missing": None,
        "garbage": "nonsense",
        "wrong secret": stripe.WebhookSignature.generate_signature_header(
            body.decode(), "whsec_other", now
        ),
        "stale": stripe.WebhookSignature.generate_signature_header(
            body.decode(), SECRET, now - 301
        ),
    }
    for name, header in cases.items():
        assert _post(hooks.url, body, header) == 400, name
    assert _post(hooks.url, body.replace(b"in_x", b"in_y"), good) == 400  # tampered
    assert _post(hooks.url, b"\xff\xfe", good) == 400
    with hooks.engine.connect() as connection:
        assert connection.execute(select(stripe_webhook_events)).all() == []
    assert _post(hooks.url, body, good) == 200


def test_a_failing_action_is_kept_retried_and_shown(hooks: Hooks) -> None:
    # Signed and stored, but an invoice the processor cannot read (no amount): it stays.
    body = _event("evt_test_unreadable")
    header = stripe.WebhookSignature.generate_signature_header(
        body.decode(), SECRET, int(time.time())
    )
    assert _post(hooks.url, body, header) == 200
    assert hooks.processor.run_once() == 0
    with hooks.engine.connect() as connection:
        (row,) = connection.execute(select(stripe_webhook_events)).all()
    assert (row.status, row.attempts) == ("pending", 1)
    assert "amount_remaining" in (row.last_error or "")
    assert row.next_attempt_at > datetime.now(UTC)
    assert _metric(hooks.metrics, "meterstream_stripe_webhook_events_failing") == 1
    assert _metric(
        hooks.metrics,
        "meterstream_stripe_webhook_events_total",
        type="invoice.paid",
        outcome="failed",
    ) == pytest.approx(1)


def _wait(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
