"""The emulator's records and the JSON shapes Stripe gives them.

Each record is frozen; the state replaces a record to change it (deactivate a meter,
cancel an event), so a snapshot handed to a test never changes under it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

JsonObject = dict[str, Any]


class StripeApiError(Exception):
    """A rule Stripe enforces was broken; carries everything the HTTP answer needs.

    `type` is one of the document's v1 error types (`invalid_request_error`, `api_error`,
    `idempotency_error`; 401 and 429 are `invalid_request_error` told apart by status) or
    v2's `temporary_session_expired`; `code`, when set, is one the document lists; and
    `should_retry` becomes the `Stripe-Should-Retry` header when not None.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.should_retry = should_retry

    def to_stripe(self) -> JsonObject:
        error: JsonObject = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


def rfc3339(unix_s: int) -> str:
    """Unix seconds as the RFC 3339 UTC string v2 APIs use, e.g. 2026-11-24T00:00:00.000Z."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def parse_rfc3339(text: str) -> int:
    """RFC 3339 string to Unix seconds (fractions dropped); raises ValueError if malformed."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp has no UTC offset: {text!r}")
    return int(moment.timestamp())


@dataclass(frozen=True)
class Customer:
    id: str
    name: str | None
    email: str | None
    created: int

    def to_stripe(self) -> JsonObject:
        return {
            "id": self.id,
            "object": "customer",
            "created": self.created,
            "email": self.email,
            "name": self.name,
            "livemode": False,
            "metadata": {},
        }


@dataclass(frozen=True)
class Meter:
    id: str
    display_name: str
    event_name: str
    formula: str
    customer_key: str
    value_key: str
    status: str
    created: int
    updated: int
    deactivated_at: int | None
    # Seeded only (EmulatorState.create_meter), never through the API: the emulator does not
    # apply a pre-aggregation window or another mapping; it only shows them, so a client's
    # start-up check can be tested.
    event_time_window: str | None = None
    customer_mapping_type: str = "by_id"
    # Payload keys every event must carry; summaries can be grouped by them.
    dimension_payload_keys: tuple[str, ...] = ()

    def to_stripe(self) -> JsonObject:
        return {
            "id": self.id,
            "object": "billing.meter",
            "created": self.created,
            "customer_mapping": {
                "event_payload_key": self.customer_key,
                "type": self.customer_mapping_type,
            },
            "default_aggregation": {"formula": self.formula},
            "dimension_payload_keys": list(self.dimension_payload_keys),
            "display_name": self.display_name,
            "event_name": self.event_name,
            "event_time_window": self.event_time_window,
            "livemode": False,
            "status": self.status,
            "status_transitions": {"deactivated_at": self.deactivated_at},
            "updated": self.updated,
            "value_settings": {"event_payload_key": self.value_key},
        }


@dataclass(frozen=True)
class MeterEvent:
    """One accepted event. `value` is exact; `created` is when the emulator received it."""

    event_name: str
    meter_id: str
    customer_id: str
    value: int
    identifier: str
    timestamp: int
    created: int
    payload: Mapping[str, str]
    source: str
    cancelled: bool = False

    def to_stripe(self) -> JsonObject:
        """The v1 `billing.meter_event` answer."""
        return {
            "object": "billing.meter_event",
            "created": self.created,
            "event_name": self.event_name,
            "identifier": self.identifier,
            "livemode": False,
            "payload": dict(self.payload),
            "timestamp": self.timestamp,
        }

    def to_stripe_v2(self) -> JsonObject:
        """The v2 `v2.billing.meter_event` answer (RFC 3339 times)."""
        return {
            "object": "v2.billing.meter_event",
            "created": rfc3339(self.created),
            "event_name": self.event_name,
            "identifier": self.identifier,
            "livemode": False,
            "payload": dict(self.payload),
            "timestamp": rfc3339(self.timestamp),
        }

    def to_json(self) -> JsonObject:
        """Inspection shape for /_emulator/events; the value stays an exact string."""
        return {
            "event_name": self.event_name,
            "meter": self.meter_id,
            "customer": self.customer_id,
            "value": str(self.value),
            "identifier": self.identifier,
            "timestamp": self.timestamp,
            "created": self.created,
            "source": self.source,
            "cancelled": self.cancelled,
        }


@dataclass(frozen=True)
class AsyncError:
    """A stream event Stripe accepted with 200 and would later report as invalid."""

    code: str
    message: str
    event_name: str | None
    identifier: str | None

    def to_json(self) -> JsonObject:
        return {
            "code": self.code,
            "message": self.message,
            "event_name": self.event_name,
            "identifier": self.identifier,
        }


@dataclass(frozen=True)
class Session:
    id: str
    authentication_token: str
    created: int
    expires_at: int

    def to_stripe(self) -> JsonObject:
        return {
            "id": self.id,
            "object": "v2.billing.meter_event_session",
            "authentication_token": self.authentication_token,
            "created": rfc3339(self.created),
            "expires_at": rfc3339(self.expires_at),
            "livemode": False,
        }


@dataclass(frozen=True)
class CachedResponse:
    """An HTTP answer saved under an Idempotency-Key, replayed byte for byte."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = field(default=())
