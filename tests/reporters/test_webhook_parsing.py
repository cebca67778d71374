"""Whatever a signed body holds, verification answers with a VerifiedEvent or a WebhookError
(a 400), never another exception (a 500 Stripe would retry for days); and the webhook tables
are pruned by age, pending events never."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stripe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, select

from meterstream.db import build_engine
from meterstream.errors import ConfigError, WebhookError
from meterstream.schema import (
    billing_alert_counts,
    customer_links,
    payment_failures,
    stripe_webhook_events,
)
from meterstream.settings import load_settings
from reporters.webhooks import retention
from reporters.webhooks.service import build_webhook_service
from reporters.webhooks.verify import VerifiedEvent, verify

SECRET = "whsec_parsingSecret"  # noqa: S105 (a test secret)
CLIENT = stripe.StripeClient("sk_test_x", base_addresses={"api": "http://127.0.0.1:9"})

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=30),
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "id": _json,
        "object": st.sampled_from(["event", "v2.core.event", "invoice"]) | _json,
        "type": st.sampled_from(["invoice.paid", "v1.billing.meter.error_report_triggered"])
        | _json,
        "created": st.integers(min_value=-(2**40), max_value=2**40) | _json,
        "data": _json,
        "related_object": _json,
    },
)


def _signed(body: bytes) -> str:
    return stripe.WebhookSignature.generate_signature_header(
        body.decode("utf-8", "replace"), SECRET, int(time.time())
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=_fields)
def test_a_signed_document_is_an_event_or_a_400(document: dict[str, Any]) -> None:
    body = json.dumps(document).encode()
    try:
        event = verify(body, _signed(body), [SECRET], CLIENT)
    except WebhookError:
        return
    assert isinstance(event, VerifiedEvent)
    assert 0 < len(event.event_id) <= 255 and event.created.tzinfo is not None


def test_a_signed_body_nested_too_deep_to_parse_is_a_400() -> None:
    # Well under the 1 MiB the route reads: Python's JSON parser gives up on the depth.
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"id": ' * 50_000 + b"1" + b"}" * 50_000):
        with pytest.raises(WebhookError, match="not a Stripe event"):
            verify(body, _signed(body), [SECRET], CLIENT)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200), header=st.text(max_size=60) | st.none())
def test_any_bytes_and_header_are_a_400(body: bytes, header: str | None) -> None:
    try:
        verify(body, header, [SECRET], CLIENT)
    except WebhookError:
        return
    raise AssertionError("an unsigned body was taken")


def test_processed_events_and_closed_failures_go_after_retention(migrated_engine: Engine) -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    old = now - timedelta(days=40)
    with migrated_engine.begin() as connection:
        for event_id, status, at in (
            ("evt_old_done", "processed", old),
            ("evt_old_pending", "pending", old),  # still failing: kept, whatever its age
            ("evt_new_done", "processed", now - timedelta(days=1)),
        ):
            connection.execute(
                stripe_webhook_events.insert().values(
                    event_id=event_id,
                    type="invoice.paid",
                    payload_kind="snapshot",
                    created=at,
                    body="{}",
                    received_at=at,
                    deliveries=1,
                    status=status,
                    attempts=0,
                    next_attempt_at=at,
                )
            )
        for invoice_id, state, closed_at in (
            ("in_old_closed", "closed", old),
            ("in_old_open", "open", None),
            ("in_recently_closed", "closed", now - timedelta(days=2)),
        ):
            connection.execute(
                payment_failures.insert().values(
                    invoice_id=invoice_id,
                    stripe_customer_id="cus_a",
                    state=state,
                    reason="paid" if state == "closed" else "payment_failed",
                    amount_remaining=0,
                    currency="usd",
                    attempts=1,
                    opened_at=old,
                    closed_at=closed_at,
                    event_created=old,
                    event_id="evt_x",
                )
            )
    assert retention.prune(migrated_engine, now, 1, retention.WebhookRetention()) == {
        "stripe_webhook_events": 1,
        "payment_failures": 1,
        "billing_alert_counts": 0,
    }
    with migrated_engine.connect() as connection:
        events = set(connection.execute(select(stripe_webhook_events.c.event_id)).scalars())
        failures = set(connection.execute(select(payment_failures.c.invoice_id)).scalars())
    assert events == {"evt_old_pending", "evt_new_done"}
    assert failures == {"in_old_open", "in_recently_closed"}


def test_processing_status_and_payments_never_scan_history(postgres_engine: Engine) -> None:
    """With 20,000 processed events and 5,000 closed failures (after ANALYZE), a processing
    pass, its gauges and pruning, status and payments read through indexes only."""
    from typing import Any as _Any

    from sqlalchemy import event

    from meterstream.metrics import WebhookMetrics
    from reporters.webhooks import WebhookProcessor
    from reporters.webhooks.status import payments_document, webhook_status

    engine = postgres_engine
    now = datetime.now(UTC)
    day = timedelta(days=1)
    with engine.begin() as connection:
        connection.execute(
            stripe_webhook_events.insert(),
            [
                {
                    "event_id": f"evt_done_{n}",
                    "type": "invoice.paid",
                    "payload_kind": "snapshot",
                    "created": now - day,
                    "body": "{}",
                    "received_at": now - day,
                    "deliveries": 1,
                    "status": "processed",
                    "attempts": 0,
                    "next_attempt_at": now - day,
                    "outcome": "applied",
                }
                for n in range(20_000)
            ],
        )
        connection.execute(
            payment_failures.insert(),
            [
                {
                    "invoice_id": f"in_{n}",
                    "stripe_customer_id": f"cus_{n % 500}",
                    "state": "closed" if n else "open",
                    "reason": "paid" if n else "payment_failed",
                    "amount_remaining": 0 if n else 990,
                    "currency": "usd",
                    "attempts": 1,
                    "opened_at": now - day,
                    "closed_at": now - day if n else None,
                    "event_created": now - day,
                    "event_id": f"evt_{n}",
                }
                for n in range(5_000)
            ],
        )
        connection.execute(
            customer_links.insert(),
            [
                {
                    "customer_id": f"app-{n}",
                    "stripe_customer_id": f"cus_{n}",
                    "created_at": now,
                    "updated_at": now,
                }
                for n in range(5_000)
            ],
        )
        connection.exec_driver_sql("ANALYZE")
    body = json.dumps(
        {
            "id": "evt_new",
            "object": "event",
            "type": "invoice.payment_failed",
            "created": int(now.timestamp()),
            "data": {
                "object": {
                    "id": "in_new",
                    "object": "invoice",
                    "customer": "cus_7",
                    "amount_remaining": 100,
                    "currency": "usd",
                }
            },
        }
    )
    with engine.begin() as connection:
        connection.execute(
            stripe_webhook_events.insert().values(
                event_id="evt_new",
                type="invoice.payment_failed",
                payload_kind="snapshot",
                created=now,
                body=body,
                received_at=now,
                deliveries=1,
                status="pending",
                attempts=0,
                next_attempt_at=now,
            )
        )
    plans: list[str] = []

    def explain(
        connection: _Any, _cursor: _Any, statement: str, parameters: _Any, *_: _Any
    ) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")):
            first = parameters[0] if isinstance(parameters, list) else parameters
            cursor = connection.connection.dbapi_connection.cursor()
            cursor.execute(f"EXPLAIN {statement}", first)
            plans.append("\n".join(str(r[0]) for r in cursor.fetchall()))

    event.listen(engine, "before_cursor_execute", explain)
    try:
        processor = WebhookProcessor(engine, CLIENT, WebhookMetrics())
        assert processor.run_once() == 1
        facts = webhook_status(engine, now)
        listed = payments_document(engine)
    finally:
        event.remove(engine, "before_cursor_execute", explain)
    assert facts["payment_failures_open"] == 2 and len(listed) == 2
    assert {item["customer_id"] for item in listed} == {None, "app-7"}  # linked back
    assert len(plans) > 8
    for plan in plans:
        assert "Seq Scan on stripe_webhook_events" not in plan, plan
        assert "Seq Scan on payment_failures" not in plan, plan
        assert "Seq Scan on customer_links" not in plan, plan


def _alert_counts(engine: Engine, now: datetime, days_ago: dict[str, int]) -> None:
    with engine.begin() as connection:
        for alert_id, days in days_ago.items():
            connection.execute(
                billing_alert_counts.insert().values(
                    alert_id=alert_id,
                    stripe_customer_id="cus_a",
                    customer_id="acme",
                    triggered=3,
                    last_value=None,
                    last_triggered_at=now - timedelta(days=days),
                )
            )


def _alert_ids(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.execute(select(billing_alert_counts.c.alert_id)).scalars())


def test_alert_counts_not_triggered_within_their_retention_go(migrated_engine: Engine) -> None:
    """Before, a count stayed for good: one row per customer that ever crossed a threshold."""
    now = datetime(2026, 12, 1, tzinfo=UTC)
    _alert_counts(migrated_engine, now, {"alrt_gone": 401, "alrt_kept": 399})

    pruned = retention.prune(migrated_engine, now, 1, retention.WebhookRetention(alert_days=400))

    assert pruned["billing_alert_counts"] == 1
    assert _alert_ids(migrated_engine) == {"alrt_kept"}


def test_the_webhook_processor_keeps_alert_counts_as_long_as_the_setting_says(
    migrated_engine: Engine, database_url: str
) -> None:
    settings = load_settings(
        database_url=database_url, stripe_webhook_secret=SECRET, billing_alert_retention_days=50
    )
    service = build_webhook_service(settings, migrated_engine, CollectorRegistry())
    assert service is not None and service.processor is not None
    now = datetime.now(UTC)
    _alert_counts(migrated_engine, now, {"alrt_gone": 51, "alrt_kept": 49})

    service.processor.run_once()  # prunes: its first pass

    assert _alert_ids(migrated_engine) == {"alrt_kept"}


def test_the_webhook_processor_keeps_events_and_failures_as_long_as_the_settings_say(
    database_url: str,
) -> None:
    settings = load_settings(
        database_url=database_url,
        stripe_webhook_secret=SECRET,
        webhook_event_retention_days=7,
        payment_failure_retention_days=9,
    )
    service = build_webhook_service(settings, build_engine(settings), CollectorRegistry())

    assert service is not None and service.processor is not None
    assert service.processor.retention_days == retention.WebhookRetention(7, 9, 400)


def test_a_webhook_event_retention_shorter_than_stripes_retries_is_refused() -> None:
    with pytest.raises(ConfigError, match="METERSTREAM_WEBHOOK_EVENT_RETENTION_DAYS"):
        load_settings(webhook_event_retention_days=3)
