"""Processing stored Stripe events, from the table (reporters/webhooks/processor.py), on
PostgreSQL and SQLite: an event failing for days never stops the others; payment failures
keep the invoice's facts whatever order Stripe's invoice and subscription events come in, and
a paid invoice stays paid.

Events are stored as the route stores them (inbox.store of a verified event) and acted on by
the real processor; snapshot events need no call to Stripe, so no emulator runs here."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

import pytest
import stripe
from sqlalchemy import Engine, select, text, update

from meterstream.metrics import WebhookMetrics
from meterstream.schema import billing_alert_counts, payment_failures, stripe_webhook_events
from reporters.webhooks import WebhookProcessor, inbox, payments
from reporters.webhooks.inbox import RETRY_CAP_S
from reporters.webhooks.verify import VerifiedEvent

START = datetime(2026, 12, 1, 12, tzinfo=UTC)
_ids = count(1)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def processor(migrated_engine: Engine, clock: Clock) -> Iterator[WebhookProcessor]:
    # No call reaches Stripe: snapshot events are read from their stored bodies.
    client = stripe.StripeClient("sk_test_0", base_addresses={"api": "http://127.0.0.1:9"})
    yield WebhookProcessor(migrated_engine, client, WebhookMetrics(), clock)


def _store(engine: Engine, clock: Clock, type_: str, obj: dict[str, Any], created: int) -> str:
    event_id = f"evt_test_{next(_ids)}"
    body = {
        "id": event_id,
        "object": "event",
        "type": type_,
        "created": created,
        "data": {"object": obj},
    }
    event = VerifiedEvent(
        event_id, type_, "snapshot", datetime.fromtimestamp(created, UTC), json.dumps(body)
    )
    assert inbox.store(engine, event, clock())
    return event_id


def _invoice(invoice_id: str, *, amount: int = 12_345, attempts: int = 1) -> dict[str, Any]:
    return {
        "id": invoice_id,
        "object": "invoice",
        "customer": "cus_test_1",
        "subscription": "sub_test_1",
        "amount_remaining": amount,
        "currency": "eur",
        "attempt_count": attempts,
        "next_payment_attempt": int(START.timestamp()) + 86_400,
    }


def _subscription(status: str, latest_invoice: str | None) -> dict[str, Any]:
    return {
        "id": "sub_test_1",
        "object": "subscription",
        "customer": "cus_test_1",
        "status": status,
        "currency": "eur",
        "latest_invoice": latest_invoice,
    }


def _failure(engine: Engine, invoice_id: str) -> Any:
    with engine.connect() as connection:
        return connection.execute(
            select(payment_failures).where(payment_failures.c.invoice_id == invoice_id)
        ).one()


T = int(START.timestamp())


def test_an_event_failing_for_days_never_stops_the_others(
    migrated_engine: Engine, clock: Clock, processor: WebhookProcessor
) -> None:
    # An invoice event the processor cannot read (no amount): retried every 5 minutes for
    # days (the API key missing for a week does the same to every thin event).
    unreadable = {"id": "in_test_bad", "object": "invoice", "customer": "cus_test_1"}
    poison = _store(migrated_engine, clock, "invoice.payment_failed", unreadable, T)
    with migrated_engine.begin() as connection:
        connection.execute(
            update(stripe_webhook_events)
            .where(stripe_webhook_events.c.event_id == poison)
            .values(attempts=1_100)
        )
    clock.now += timedelta(seconds=1)
    _store(migrated_engine, clock, "invoice.payment_failed", _invoice("in_test_ok"), T)

    assert processor.run_once() == 1
    assert _failure(migrated_engine, "in_test_ok").state == "open"
    with migrated_engine.connect() as connection:
        row = connection.execute(
            select(stripe_webhook_events).where(stripe_webhook_events.c.event_id == poison)
        ).one()
    assert (row.status, row.attempts) == ("pending", 1_101)
    assert row.next_attempt_at == clock.now + timedelta(seconds=RETRY_CAP_S)


def test_a_subscription_event_first_does_not_hide_the_invoice_amount(
    migrated_engine: Engine, clock: Clock, processor: WebhookProcessor
) -> None:
    # Stripe sends invoice.payment_failed and the subscription's past_due in the same second
    # or the next, in any order: the subscription's, carrying no amount, arrives first.
    _store(
        migrated_engine,
        clock,
        "customer.subscription.updated",
        _subscription("past_due", "in_test_1"),
        T + 1,
    )
    assert processor.run_once() == 1
    clock.now += timedelta(seconds=1)
    _store(migrated_engine, clock, "invoice.payment_failed", _invoice("in_test_1"), T)
    assert processor.run_once() == 1

    failure = _failure(migrated_engine, "in_test_1")
    assert (failure.state, failure.amount_remaining, failure.attempts) == ("open", 12_345, 1)
    assert failure.failure_code == "unknown"
    assert failure.next_payment_attempt is not None
    assert processor.metrics.registry.get_sample_value(
        "meterstream_stripe_payment_failures_amount_at_risk", {"currency": "eur"}
    ) == pytest.approx(12_345)


def test_a_paid_invoice_is_not_reopened_by_a_later_subscription_event(
    migrated_engine: Engine, clock: Clock, processor: WebhookProcessor
) -> None:
    # The subscription stays past_due for an older unpaid invoice while its latest invoice
    # (here paid at once) is settled: a later update still names the paid one.
    _store(migrated_engine, clock, "invoice.paid", _invoice("in_test_2", amount=0), T)
    clock.now += timedelta(seconds=1)
    _store(
        migrated_engine,
        clock,
        "customer.subscription.updated",
        _subscription("past_due", "in_test_2"),
        T + 60,
    )
    assert processor.run_once() == 2

    failure = _failure(migrated_engine, "in_test_2")
    assert (failure.state, failure.reason) == ("closed", "paid")


def test_nothing_after_a_payment_reopens_the_invoice(
    migrated_engine: Engine, clock: Clock, processor: WebhookProcessor
) -> None:
    _store(migrated_engine, clock, "invoice.payment_failed", _invoice("in_test_3"), T)
    clock.now += timedelta(seconds=1)
    _store(migrated_engine, clock, "invoice.paid", _invoice("in_test_3", amount=0), T + 30)
    clock.now += timedelta(seconds=1)
    # A newer failure of a paid invoice cannot happen at Stripe: it changes nothing here.
    _store(migrated_engine, clock, "invoice.payment_action_required", _invoice("in_test_3"), T + 31)
    assert processor.run_once() == 3

    failure = _failure(migrated_engine, "in_test_3")
    assert (failure.state, failure.reason, failure.amount_remaining) == ("closed", "paid", 0)


def test_two_processors_never_reopen_a_payment_they_raced(postgres_engine: Engine) -> None:
    # Two `serve` processes act on two events of one invoice at once: a failure and the
    # payment that follows it. The failure's transaction reads the row before the payment
    # commits and writes after: it must see the payment, not overwrite it.
    engine = postgres_engine
    now = START
    with engine.begin() as connection:
        opened = payments.invoice_facts("invoice.payment_failed", _invoice("in_test_4"))
        assert payments.apply(connection, opened, "evt_1", START, now) == "applied"
    paid = payments.invoice_facts("invoice.paid", _invoice("in_test_4", amount=0))
    again = payments.invoice_facts("invoice.payment_failed", _invoice("in_test_4", attempts=2))
    outcome: list[str] = []

    def second_processor() -> None:
        with engine.begin() as connection:
            outcome.append(
                payments.apply(connection, again, "evt_2", START + timedelta(seconds=10), now)
            )

    with engine.connect() as first:
        first.begin()
        assert payments.apply(first, paid, "evt_3", START + timedelta(seconds=20), now) == "applied"
        thread = threading.Thread(target=second_processor)
        thread.start()
        _wait_for_a_lock_wait(engine)
        first.commit()
    thread.join(timeout=30)
    assert outcome == ["stale"]
    failure = _failure(engine, "in_test_4")
    assert (failure.state, failure.reason, failure.event_id) == ("closed", "paid", "evt_3")


def _wait_for_a_lock_wait(engine: Engine) -> None:
    """Until a session of this database waits on a row lock (the second processor's)."""
    for _ in range(1_000):
        with engine.connect() as connection:
            waiting = connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar()
        if waiting:
            return
        time.sleep(0.01)
    raise AssertionError("the second processor never waited on the invoice's row")


def test_alerts_per_customer_are_counted_without_a_metric_series_each(
    migrated_engine: Engine, clock: Clock, processor: WebhookProcessor
) -> None:
    # A usage alert filtered to one customer is the usual setup: with 100,000 subscribers
    # that is 100,000 alert ids, which the table keeps and a metric label must not.
    for n in range(5):
        alert = {
            "object": "billing.alert_triggered",
            "alert": {"id": f"alrt_test_{n}", "object": "billing.alert"},
            "customer": f"cus_test_{n}",
            "value": 1_000,
        }
        _store(migrated_engine, clock, "billing.alert.triggered", alert, T + n)
    assert processor.run_once() == 5
    with migrated_engine.connect() as connection:
        assert len(connection.execute(select(billing_alert_counts)).all()) == 5
    samples = [
        sample
        for metric in processor.metrics.registry.collect()
        if metric.name == "meterstream_stripe_billing_alerts"
        for sample in metric.samples
        if sample.name.endswith("_total")
    ]
    assert [(sample.labels, sample.value) for sample in samples] == [({}, 5.0)]


def _store_thin(engine: Engine, clock: Clock, created: int) -> str:
    event_id = f"evt_test_thin_{next(_ids)}"
    thin = {
        "id": event_id,
        "object": "v2.core.event",
        "type": "v1.billing.meter.no_meter_found",
        "created": datetime.fromtimestamp(created, UTC).isoformat().replace("+00:00", "Z"),
        "livemode": False,
        "context": None,
    }
    event = VerifiedEvent(
        event_id,
        "v1.billing.meter.no_meter_found",
        "thin",
        datetime.fromtimestamp(created, UTC),
        json.dumps(thin),
    )
    assert inbox.store(engine, event, clock())
    return event_id


def test_stripe_being_down_costs_one_call_per_pass_and_never_delays_payments(
    migrated_engine: Engine, clock: Clock, processor: WebhookProcessor
) -> None:
    # Thin events are fetched from Stripe's API (here a closed port: Stripe unreachable). A
    # pass must not try them one after another (each a timeout when Stripe hangs), and the
    # invoice events behind them, which need no call, must not wait for them.
    thin = [_store_thin(migrated_engine, clock, T + n) for n in range(3)]
    clock.now += timedelta(seconds=1)
    _store(migrated_engine, clock, "invoice.payment_failed", _invoice("in_test_5"), T)

    assert processor.run_once(limit=2) == 1
    assert _failure(migrated_engine, "in_test_5").state == "open"
    with migrated_engine.connect() as connection:
        attempts = dict(
            connection.execute(
                select(stripe_webhook_events.c.event_id, stripe_webhook_events.c.attempts).where(
                    stripe_webhook_events.c.event_id.in_(thin)
                )
            ).all()
        )
    assert sorted(attempts.values()) == [0, 0, 1]  # the first failed; the others wait


def test_a_voided_invoice_closes_its_failure_for_good(
    migrated_engine: Engine, clock: Clock, processor: WebhookProcessor
) -> None:
    # Finance voids a failed invoice (a cancelled subscription, a reissued bill): it can
    # never be paid, so nothing else would close it, and it would count as at risk for ever.
    _store(migrated_engine, clock, "invoice.payment_failed", _invoice("in_test_6"), T)
    clock.now += timedelta(seconds=1)
    _store(migrated_engine, clock, "invoice.voided", _invoice("in_test_6"), T + 60)
    clock.now += timedelta(seconds=1)
    _store(migrated_engine, clock, "invoice.payment_failed", _invoice("in_test_6"), T + 120)
    assert processor.run_once() == 3

    failure = _failure(migrated_engine, "in_test_6")
    assert (failure.state, failure.reason, failure.amount_remaining) == ("closed", "voided", 0)
    assert processor.metrics.registry.get_sample_value(
        "meterstream_stripe_payment_failures_open"
    ) == pytest.approx(0)


def test_a_subscription_naming_no_invoice_opens_nothing_that_cannot_close(
    migrated_engine: Engine, clock: Clock, processor: WebhookProcessor
) -> None:
    # Only an invoice event can close a failure; a row keyed by the subscription's id would
    # stay open for ever.
    _store(
        migrated_engine,
        clock,
        "customer.subscription.updated",
        _subscription("past_due", None),
        T,
    )
    assert processor.run_once() == 1
    with migrated_engine.connect() as connection:
        assert connection.execute(select(payment_failures)).all() == []
