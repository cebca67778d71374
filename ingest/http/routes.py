"""``POST /v1/events``: usage events over HTTP, all or nothing, 202 only once Kafka has them."""

# No `from __future__ import annotations`: FastAPI reads these annotations at run time, and the
# dependencies they name are local to the function that builds the router.

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from ingest.http.acks import RequestProducer
from ingest.http.body import BATCH, STRUCTURED, BodyRefusedError, Problem, admit, documents
from ingest.rules import EventRules
from meterstream.api_keys import ApiKey
from meterstream.errors import KafkaNotAcknowledgedError
from meterstream.http import ErrorBody, error_answer
from meterstream.metrics import HttpMetrics
from meterstream.settings import Settings


class EventData(BaseModel):
    """The ``data`` of a usage event (in binary mode: the whole body)."""

    value: str | int = Field(
        description="a decimal string such as '12.5' (never a JSON float), or an integer"
    )
    properties: dict[str, str] = Field(default_factory=dict)


class CloudEvent(BaseModel):
    """One usage event, CloudEvents 1.0 structured JSON."""

    specversion: Literal["1.0"]
    id: str = Field(description="the event id; with source, subject and type, its dedup key")
    source: str = Field(description="must be the source the API key is bound to")
    type: str = Field(description="the meter name")
    subject: str = Field(description="the customer id")
    time: str | None = Field(None, description="RFC 3339 event time; default: when received")
    datacontenttype: Literal["application/json"] | None = None
    data: EventData


class Accepted(BaseModel):
    """Kafka acknowledged every event of the request."""

    accepted: int


class EventProblem(BaseModel):
    index: int = Field(description="position of the event in the request (0 for one event)")
    field: str
    reason: str


class Refused(BaseModel):
    """Nothing of the request was produced; each refused event with the field and the reason."""

    error: str
    problems: list[EventProblem] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class IngestRoutes:
    """What the events route needs, built by the face."""

    settings: Settings
    rules: EventRules
    producer: RequestProducer
    metrics: HttpMetrics
    require_ingest: Callable[..., Awaitable[ApiKey]]


def _request_body_doc() -> dict[str, Any]:
    event = {"$ref": "#/components/schemas/CloudEvent"}
    return {
        "requestBody": {
            "required": True,
            "description": "one event (structured), an array of up to 1,000 events (batch), or "
            "binary mode: the data as application/json with the attributes in ce-specversion, "
            "ce-id, ce-source, ce-type, ce-subject and ce-time headers",
            "content": {
                STRUCTURED: {"schema": event},
                BATCH: {"schema": {"type": "array", "items": event, "maxItems": 1000}},
                "application/json": {"schema": {"$ref": "#/components/schemas/EventData"}},
            },
        }
    }


def openapi_schemas() -> dict[str, Any]:
    """The schemas the request body refers to, for the face to add to the document."""
    schema = CloudEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {"CloudEvent": schema, **defs}


def events_router(routes: IngestRoutes) -> APIRouter:
    """The ingest stage's routes: ``POST /v1/events``."""
    router = APIRouter(tags=["ingest"])
    settings, metrics = routes.settings, routes.metrics

    @router.post(
        "/v1/events",
        status_code=202,
        response_model=Accepted,
        openapi_extra=_request_body_doc(),
        responses={
            400: {"model": Refused, "description": "an event broke a rule; nothing produced"},
            401: {"model": ErrorBody},
            408: {"model": ErrorBody, "description": "the body came too slowly; nothing produced"},
            403: {"model": ErrorBody},
            413: {"model": Refused, "description": "body, batch or event too large"},
            415: {"model": ErrorBody},
            503: {"model": ErrorBody, "description": "Kafka did not acknowledge; retry later"},
        },
        summary="Send usage events (one, a batch, or binary mode)",
    )
    async def post_events(
        request: Request, key: Annotated[ApiKey, Depends(routes.require_ingest)]
    ) -> Response:
        """All or nothing: 202 once Kafka (acks=all) has every event; 400 listing each refused
        event; 503 with Retry-After when Kafka is slow or down (send the same request again:
        events are deduplicated by source, id, subject and type)."""
        try:
            body = await _read_body(
                request, settings.http_max_body_bytes, settings.http_body_timeout_s
            )
            messages = _admitted(request, body, routes.rules, key.source, settings)
        except BodyRefusedError as exc:
            metrics.events_refused.labels("body").inc()
            return error_answer(exc.status, exc.message)
        except _RefusedEventsError as exc:
            return _refused(exc.problems, exc.count, metrics)
        del body  # not held while Kafka acknowledges
        try:
            await routes.producer.produce_all(messages)
        except KafkaNotAcknowledgedError as exc:
            metrics.events_refused.labels("kafka").inc(len(messages))
            return error_answer(
                503,
                f"{exc}; nothing of this request may be taken as accepted: send it again "
                f"after {settings.http_retry_after_s} s (a re-sent event is counted once)",
                {"Retry-After": str(settings.http_retry_after_s)},
            )
        metrics.events_accepted.inc(len(messages))
        return JSONResponse({"accepted": len(messages)}, status_code=202)

    return router


class _RefusedEventsError(Exception):
    """Some events of the request broke a rule: ``problems`` of ``count`` events."""

    def __init__(self, problems: list[Problem], count: int) -> None:
        super().__init__(f"{len(problems)} of {count} events refused")
        self.problems = problems
        self.count = count


def _admitted(
    request: Request, body: bytes, rules: EventRules, source: str, settings: Settings
) -> list[tuple[bytes, bytes]]:
    """The request's events as Kafka messages. Raises BodyRefusedError or _RefusedEventsError.

    The parsed documents live only in here: held across the wait for Kafka, thousands of
    dicts per request would survive into the collector's oldest generation and make its full
    collections frequent and slow (measured: a tenth of the server's time in bench/http.py).
    """
    docs = documents(
        request.headers.get("content-type"), request.headers, body, settings.http_max_batch_events
    )
    messages, problems = admit(docs, rules, source)
    if problems:
        raise _RefusedEventsError(problems, len(docs))
    return messages


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyRefusedError(413, _too_large(int(declared), limit))
    chunks: list[bytes] = []
    size = 0
    try:
        # The server itself gives a body no deadline: a client sending a byte at a time would
        # keep its request (and its connection) for ever.
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyRefusedError(413, _too_large(size, limit))
                chunks.append(chunk)
    except TimeoutError:
        raise BodyRefusedError(
            408,
            f"the body did not arrive within {timeout_s:g} s (METERSTREAM_HTTP_BODY_TIMEOUT_S), "
            f"{size} bytes came: send it whole, then wait for the answer",
        ) from None
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> str:
    return (
        f"the body has {size} bytes or more; at most {limit} (METERSTREAM_HTTP_MAX_BODY_BYTES): "
        "send fewer events per request"
    )


def _refused(problems: list[Problem], count: int, metrics: HttpMetrics) -> JSONResponse:
    for problem in problems:
        metrics.events_refused.labels(problem.field.split(".")[0]).inc()
    too_large = any(problem.field == "event" for problem in problems)
    return JSONResponse(
        {
            "error": f"{len(problems)} of {count} events broke a rule; nothing was produced: "
            "fix them and send the request again",
            "problems": [
                {"index": p.index, "field": p.field, "reason": p.reason} for p in problems
            ],
        },
        status_code=413 if too_large else 400,
    )
