"""``POST /v1/stripe/webhooks``: verify, store, commit, then answer 2xx.

A bad or missing signature, a stale timestamp or an unreadable body is 400 and stores
nothing; a verified event is committed to ``stripe_webhook_events`` before the answer (a
duplicate delivery is answered 200 too, and changes nothing). The database being away is
503: Stripe retries. Acting on the event happens after, from the table (processor.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

import stripe
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from meterstream.errors import WebhookError
from meterstream.metrics import WebhookMetrics
from reporters.webhooks import inbox
from reporters.webhooks.verify import verify

PATH = "/v1/stripe/webhooks"
# Stripe's events are a few KiB; a body this large is not one, and is not read further.
MAX_BODY_BYTES = 1024 * 1024
_log = logging.getLogger(__name__)


def webhooks_router(
    secrets: tuple[str, ...],
    engine: Engine,
    client: stripe.StripeClient,
    metrics: WebhookMetrics,
    on_stored: Callable[[], None] = lambda: None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> APIRouter:
    """The route, verifying with ``secrets`` (Settings.stripe_webhook_secrets) and storing in
    ``engine``; ``on_stored`` is called after each new event is committed (wake the
    processor). ``client`` parses thin events (it makes no call here)."""
    router = APIRouter(tags=["stripe"])

    @router.post(PATH, summary="Stripe webhook endpoint (signed by Stripe)")
    async def receive_stripe_webhook(request: Request) -> JSONResponse:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return _refused(metrics, 413, f"body over {MAX_BODY_BYTES} bytes")
        try:
            event = verify(bytes(body), request.headers.get("stripe-signature"), secrets, client)
        except WebhookError as exc:
            return _refused(metrics, 400, exc.reason)
        try:
            new = await run_in_threadpool(inbox.store, engine, event, clock())
        except SQLAlchemyError as exc:
            _log.error(
                "Stripe event %s not stored (%s): answered 503, Stripe retries",
                event.event_id,
                type(exc).__name__,
            )
            return JSONResponse({"error": "storage unavailable; retry"}, status_code=503)
        metrics.events.labels(type=event.type, outcome="stored" if new else "duplicate").inc()
        if new:
            on_stored()
        return JSONResponse({"received": True, "duplicate": not new})

    return router


def _refused(metrics: WebhookMetrics, status: int, reason: str) -> JSONResponse:
    metrics.events.labels(type="unknown", outcome="refused").inc()
    _log.warning("Stripe webhook refused (%d): %s", status, reason)
    return JSONResponse({"error": reason}, status_code=status)
