"""The composition point of ``meterstream serve``: one FastAPI app, each stage's router mounted.

The stages own their routes (ingest's ``POST /v1/events`` in ``ingest/http``; the usage reads
beside the tables they read; Stripe's webhooks in ``reporters/``); only this module knows them
all. Health, readiness, metrics and the OpenAPI document are the server's own.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine, text
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aggregators.usage_api import UsageRoutes, usage_router
from ingest.http import IngestRoutes, RequestProducer, events_router, openapi_schemas
from ingest.rules import EventRules
from meterstream.api_keys import KeyVerifier
from meterstream.http import Authenticator, error_answer
from meterstream.meters import Catalogue
from meterstream.metrics import HttpMetrics
from meterstream.settings import Settings

if TYPE_CHECKING:
    from reporters.webhooks.service import WebhookService

_log = logging.getLogger(__name__)
_READY_TIMEOUT_S = 2.0
_CLOSE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class ServerParts:
    """What the server is built from; the caller (``serve``) owns the engine."""

    settings: Settings
    catalogue: Catalogue
    engine: Engine
    metrics: HttpMetrics


def build_app(parts: ServerParts) -> FastAPI:
    """The HTTP API: every stage's routes plus /healthz, /readyz, /metrics, /openapi.json."""
    settings, metrics = parts.settings, parts.metrics
    producer = RequestProducer(settings, metrics)
    authenticator = Authenticator(
        KeyVerifier(parts.engine, settings.http_api_key_cache_s),
        retry_after_s=settings.http_retry_after_s,
    )
    webhooks = _stripe_webhooks(parts)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if webhooks is not None:
            webhooks.start()  # events a crash left stored are acted on first
        # What start-up made (modules, the app, the catalogue) lives as long as the process:
        # frozen, the collector's full collections stop walking it again and again (measured:
        # bench/http.py; a request of 1,000 events makes some 8,000 objects).
        gc.freeze()
        yield
        if webhooks is not None:
            await run_in_threadpool(webhooks.stop)
        left = await producer.close(_CLOSE_TIMEOUT_S)
        if left:
            _log.error("%d events were not acknowledged by Kafka at shutdown (answered 503)", left)

    app = FastAPI(
        title="meterstream",
        version="1",
        description="Usage events in, exact usage out. Keys: meterstream api-keys create.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.include_router(
        events_router(
            IngestRoutes(
                settings=settings,
                rules=EventRules(
                    parts.catalogue, settings.horizon_days, settings.future_tolerance_s
                ),
                producer=producer,
                metrics=metrics,
                require_ingest=authenticator.require("ingest"),
            )
        )
    )
    app.include_router(
        usage_router(
            UsageRoutes(
                engine=parts.engine,
                catalogue=parts.catalogue,
                retention_days=settings.window_retention_days,
                require_read=authenticator.require("read"),
            )
        )
    )
    if webhooks is not None:
        # Stripe authenticates by its signature (reporters/webhooks/verify.py), not an API key.
        app.include_router(webhooks.router)
    _add_server_routes(app, parts, producer)
    app.add_exception_handler(HTTPException, _http_error)
    _document_schemas(app, openapi_schemas())
    app.add_middleware(_Measured, metrics=metrics)
    return app


def _stripe_webhooks(parts: ServerParts) -> WebhookService | None:
    """POST /v1/stripe/webhooks and its processor, when METERSTREAM_STRIPE_WEBHOOK_SECRET is set."""
    if not parts.settings.stripe_webhook_secrets:
        return None
    from reporters.webhooks.service import build_webhook_service

    return build_webhook_service(parts.settings, parts.engine, parts.metrics.registry)


def _add_server_routes(app: FastAPI, parts: ServerParts, producer: RequestProducer) -> None:
    @app.get("/healthz", tags=["server"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["server"],
        summary="Kafka and the database answer",
        responses={503: {"description": "Kafka or the database does not answer"}},
    )
    async def readyz() -> JSONResponse:
        problems = {}
        kafka = await run_in_threadpool(producer.check_broker, _READY_TIMEOUT_S)
        if kafka is not None:
            problems["kafka"] = kafka
        database = await run_in_threadpool(_check_database, parts.engine)
        if database is not None:
            problems["database"] = database
        if problems:
            return JSONResponse({"status": "unavailable", **problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["server"], summary="Prometheus metrics", response_class=Response)
    async def metrics_page() -> Response:
        return Response(generate_latest(parts.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _http_error(_request: Request, exc: Exception) -> Response:
    # One error shape across the API: {"error": ...}, as the routes' own answers.
    if not isinstance(exc, HTTPException):
        raise exc
    return error_answer(exc.status_code, str(exc.detail), exc.headers)


def _check_database(engine: Engine) -> str | None:
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        return f"the database did not answer: {type(exc).__name__}"
    return None


def _document_schemas(app: FastAPI, schemas: dict[str, Any]) -> None:
    """Add schemas that routes refer to from ``openapi_extra`` (their bodies are parsed by hand,
    for speed) to the generated document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            document.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend


class _Measured:
    """Counts every answer by route template and status, and times it (pure ASGI: cheap)."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            # The template, never the raw path: labels stay few whatever clients send.
            name = getattr(route, "path", "unmatched")
            self._metrics.requests.labels(name, str(status)).inc()
            self._metrics.request_latency.labels(name).observe(time.perf_counter() - started)
