"""Stripe's webhooks through a running ``meterstream serve`` on PostgreSQL: real signed
deliveries from the emulator and by hand, refusals that store nothing, a rolled secret, a thin
error report, a payment failure listed by ``meterstream payments``, duplicates, and a crash
between storing an event and acting on it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import stripe
from sqlalchemy import Engine, select

from meterstream.db import build_engine, migrate
from meterstream.schema import ledger, payment_failures, stripe_webhook_events
from meterstream.settings import load_settings
from reporters import ledger as ledger_rows
from reporters.ledger import LedgerRow
from stripe_emulator import Emulator
from tests.cli.commands import METERSTREAM, meterstream
from tests.cli.conftest import command_env

OLD_SECRET = "whsec_oldSecret1"  # noqa: S105 (test secrets)
NEW_SECRET = "whsec_newSecret2"  # noqa: S105
PATH = "/v1/stripe/webhooks"


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """``meterstream serve`` as a child process, stopped by its pid."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.port = int(env["METERSTREAM_HTTP_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, **extra: str) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [METERSTREAM, "serve"], env={**self.env, **extra}, stdout=out, stderr=out
            )
        _wait(self._healthy, 30, lambda: self.log.read_text())

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError("serve exited: " + self.log.read_text())
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1):  # noqa: S310
                return True
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    built = build_engine(load_settings(database_url=postgres_url))
    migrate(built)
    yield built
    built.dispose()


@pytest.fixture
def server(
    emulator: Emulator, postgres_url: str, engine: Engine, tmp_path: Path, kafka_bootstrap: str
) -> Iterator[Server]:
    env = command_env(emulator, postgres_url, tmp_path, kafka_bootstrap)
    env["METERSTREAM_HTTP_PORT"] = str(_free_port())
    # Being rolled: Stripe signs with the new secret only, the old one is still accepted.
    env["METERSTREAM_STRIPE_WEBHOOK_SECRET"] = f"{OLD_SECRET},{NEW_SECRET}"
    running = Server(env, tmp_path / "serve.log")
    emulator.webhooks.retry_base_s = 0.05
    emulator.notifier.report_interval_s = 0.05
    emulator.webhooks.configure(running.url + PATH, [NEW_SECRET])
    try:
        yield running
    finally:
        running.stop()


def _wait(
    condition: Callable[[], bool], timeout_s: float = 20.0, why: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time " + why())
        time.sleep(0.05)


def _control(emulator: Emulator, path: str, body: object) -> Any:
    request = urllib.request.Request(  # noqa: S310 (loopback)
        emulator.url + "/_emulator/" + path, data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        return json.loads(answer.read())


def _post(url: str, body: bytes, header: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["Stripe-Signature"] = header
    request = urllib.request.Request(  # noqa: S310 (loopback)
        url + PATH, data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _events(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(stripe_webhook_events)).all())


def _processed(engine: Engine, count: int) -> Callable[[], bool]:
    def done() -> bool:
        events = _events(engine)
        return len(events) >= count and all(e.status == "processed" for e in events)

    return done


def test_signed_deliveries_are_verified_stored_and_acted_on(
    server: Server, emulator: Emulator, engine: Engine
) -> None:
    server.start()
    body = json.dumps(
        {
            "id": "evt_test_by_hand",
            "object": "event",
            "type": "invoice.payment_failed",
            "created": int(time.time()),
            "data": {
                "object": {
                    "id": "in_by_hand",
                    "object": "invoice",
                    "customer": "cus_a",
                    "amount_remaining": 700,
                    "currency": "usd",
                    "attempt_count": 1,
                }
            },
        }
    ).encode()
    now = int(time.time())
    sign = stripe.WebhookSignature.generate_signature_header
    refused = {
        "missing": None,
        "wrong secret": sign(body.decode(), "whsec_someoneElse", now),
        "stale": sign(body.decode(), NEW_SECRET, now - 301),
    }
    for name, header in refused.items():
        assert _post(server.url, body, header) == 400, name
    tampered = body.replace(b"700", b"7")
    assert _post(server.url, tampered, sign(body.decode(), NEW_SECRET, now)) == 400
    assert _events(engine) == []
    # The old secret still verifies while it is rolled; the same event three times is one.
    for secret in (OLD_SECRET, NEW_SECRET, NEW_SECRET):
        assert _post(server.url, body, sign(body.decode(), secret, now)) == 200
    _wait(_processed(engine, 1))
    (stored,) = _events(engine)
    assert (stored.event_id, stored.deliveries, stored.outcome) == (
        "evt_test_by_hand",
        3,
        "applied",
    )

    # And one the emulator makes and sends as Stripe does.
    _control(
        emulator,
        "invoices",
        {"customer": "cus_a", "invoice": "in_emulated", "outcome": "payment_failed"},
    )
    _wait(_processed(engine, 2))
    listed = json.loads(meterstream(server.env, "payments", "--json").stdout)
    assert sorted((item["invoice_id"], item["amount_remaining"]) for item in listed) == [
        ("in_by_hand", 700),
        ("in_emulated", 1000),
    ]
    log = server.log.read_text()
    assert NEW_SECRET not in log and OLD_SECRET not in log
    assert '"amount_remaining"' not in log  # bodies are stored, never logged
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as page:  # noqa: S310
        metrics = page.read().decode()
    assert 'meterstream_stripe_webhook_events_total{outcome="refused",type="unknown"} 4.0' in (
        metrics
    )
    assert "meterstream_stripe_payment_failures_open 2.0" in metrics


def test_a_thin_error_report_makes_the_named_rows_rejected(
    server: Server, emulator: Emulator, engine: Engine
) -> None:
    server.start()
    now = datetime.now(UTC)
    row = LedgerRow(
        customer_id="cus_gone",
        meter="api_calls",
        window_start=now - timedelta(hours=1),
        window_end=now,
        revision=1,
        sequence=0,
        window_value=Decimal(5),
        accounted_total=Decimal(5),
        units_total=5,
        value=5,
        event_name="api_calls",
        stripe_customer_id="cus_gone",
        timestamp=now - timedelta(hours=1),
        identifier="ms2_test_gone",
        status="accepted",
        attempts=1,
        first_attempt_at=now,
        error_code=None,
        last_error=None,
        stripe_request_id=None,
        created_at=now,
        updated_at=now,
        sent_at=now,
        unit_scale=Decimal(1),
    )
    with engine.begin() as connection:
        ledger_rows.insert_rows(connection, [row])
    client = stripe.StripeClient(
        "sk_test_x", base_addresses={"api": emulator.url, "meter_events": emulator.url}
    )
    session = client.v2.billing.meter_event_session.create()
    stream = stripe.StripeClient(
        session.authentication_token,
        base_addresses={"api": emulator.url, "meter_events": emulator.url},
    )
    stream.v2.billing.meter_event_stream.create(
        params={
            "events": [
                {
                    "event_name": "api_calls",
                    "identifier": "ms2_test_gone",
                    "payload": {"stripe_customer_id": "cus_gone", "value": "5"},
                }
            ]
        }
    )
    _wait(_processed(engine, 1))
    with engine.connect() as connection:
        status, code = connection.execute(select(ledger.c.status, ledger.c.error_code)).one()
    assert (status, code) == ("rejected", "meter_event_customer_not_found")
    shown = json.loads(meterstream(server.env, "status", "--json").stdout)["reporter"]
    assert shown["ledger"]["rejected"] == 1
    (errors,) = shown["webhooks"]["meter_errors"]
    assert (errors["event_name"], errors["errors"], errors["rows_rejected"]) == (
        "api_calls",
        1,
        1,
    )

    # A report that names no sample: counted for reconcile to look for.
    emulator.notifier.samples_per_code = 0
    stream.v2.billing.meter_event_stream.create(
        params={
            "events": [
                {
                    "event_name": "api_calls",
                    "identifier": "ms2_test_unnamed",
                    "payload": {"stripe_customer_id": "cus_gone", "value": "5"},
                }
            ]
        }
    )
    _wait(_processed(engine, 2))
    compared = meterstream(server.env, "reconcile")
    assert (
        "Stripe refused 1 event(s) of api_calls (meter_event_customer_not_found) without "
        "naming them" in compared.stdout
    ), compared.stdout + compared.stderr


def test_a_crash_between_storing_and_acting_loses_nothing(
    server: Server, emulator: Emulator, engine: Engine
) -> None:
    # Storing only: the event is committed and answered 2xx, then the server dies.
    server.start(METERSTREAM_STRIPE_WEBHOOK_PROCESSING="false")
    _control(
        emulator,
        "invoices",
        {"customer": "cus_a", "invoice": "in_crash", "outcome": "payment_failed"},
    )
    _wait(lambda: any(d.delivered for d in emulator.webhooks.deliveries()))
    server.kill()
    (stored,) = _events(engine)
    assert stored.status == "pending"
    with engine.connect() as connection:
        assert connection.execute(select(payment_failures)).all() == []

    server.start()  # processing on: what the crash left is acted on at start
    _wait(_processed(engine, 1))
    with engine.connect() as connection:
        (failure,) = connection.execute(select(payment_failures)).all()
    assert (failure.invoice_id, failure.state) == ("in_crash", "open")
    assert len(emulator.webhooks.deliveries()) == 1  # Stripe sent it once: nothing was lost
