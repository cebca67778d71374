"""Everything ``meterstream serve`` needs for Stripe's webhooks, built from the settings: the
route, and the processor running on a thread beside it (unless processing is off here)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import stripe
from fastapi import APIRouter
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from meterstream.metrics import WebhookMetrics
from meterstream.settings import Settings
from reporters.stripe_push import REQUEST_TIMEOUT_S
from reporters.webhooks.processor import WebhookProcessor
from reporters.webhooks.retention import WebhookRetention
from reporters.webhooks.route import webhooks_router

_log = logging.getLogger(__name__)
SDK_NETWORK_RETRIES = 2  # a StripeClient retries nothing unless told (environment.md)


@dataclass
class WebhookService:
    router: APIRouter
    processor: WebhookProcessor | None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """Act on stored events from now on, those left by a crash first."""
        if self.processor is None or self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self.processor.run, args=(self._stop,), name="stripe-webhooks", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop acting on events (an event being applied finishes: one transaction)."""
        self._stop.set()
        if self.processor is not None:
            self.processor.wake()
        if self._thread is not None:
            self._thread.join(timeout=30)


def build_webhook_service(
    settings: Settings, engine: Engine, registry: CollectorRegistry
) -> WebhookService | None:
    """The webhook route and processor; None when METERSTREAM_STRIPE_WEBHOOK_SECRET is unset
    (the route does not exist then: nothing could verify a delivery)."""
    secrets = settings.stripe_webhook_secrets
    if not secrets:
        return None
    # Thin events are fetched in full with the API key; without one they wait, stored. The
    # client parses them all the same (no call is made with the placeholder).
    key = settings.stripe_api_key.get_secret_value() if settings.stripe_api_key else "sk_test_0"
    client = stripe.StripeClient(
        key,
        base_addresses={
            "api": settings.stripe_api_base,
            "meter_events": settings.meter_events_base,
        },
        max_network_retries=SDK_NETWORK_RETRIES,
        # The SDK's default waits 80 s for an answer; the processor acts on events one at a
        # time, so a hanging fetch holds up each pass's thin events for that long.
        http_client=stripe.RequestsClient(timeout=REQUEST_TIMEOUT_S),
    )
    metrics = WebhookMetrics(registry)
    processor = (
        WebhookProcessor(
            engine,
            client,
            metrics,
            can_fetch=settings.stripe_api_key is not None,
            prune_batch_rows=settings.prune_batch_rows,
            retention_days=WebhookRetention(
                event_days=settings.webhook_event_retention_days,
                failure_days=settings.payment_failure_retention_days,
                alert_days=settings.billing_alert_retention_days,
            ),
        )
        if settings.stripe_webhook_processing
        else None
    )
    router = webhooks_router(
        secrets, engine, client, metrics, on_stored=processor.wake if processor else lambda: None
    )
    if processor is None:
        _log.info("Stripe webhooks: storing only (METERSTREAM_STRIPE_WEBHOOK_PROCESSING=false)")
    return WebhookService(router, processor)
