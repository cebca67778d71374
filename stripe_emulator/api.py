"""Stripe's meter API over the emulator state: one request in, one answer out, no sockets.

The order of checks follows Stripe: authenticate, rate-limit, then replay an idempotent
reply if the Idempotency-Key was seen with the same request, then take the per-customer,
per-meter slot and run the endpoint. Injected faults fire after the rate limit.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Literal

from stripe_emulator import limits
from stripe_emulator.calls import ApiRequest, Call
from stripe_emulator.faults import Faults
from stripe_emulator.limits import CallSlots, RefusingRateLimit
from stripe_emulator.records import CachedResponse, StripeApiError
from stripe_emulator.routes import ROUTES, Route
from stripe_emulator.state import EmulatorState

_KEY_PREFIXES = ("sk_test_", "rk_test_")


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    drop: bool = False  # close the socket instead of answering


class StripeApi:
    """Answers Stripe API requests from `state`, applying limits and injected faults."""

    def __init__(
        self, state: EmulatorState, faults: Faults, rate_limit: RefusingRateLimit, slots: CallSlots
    ) -> None:
        self.state = state
        self.faults = faults
        self.rate_limit = rate_limit
        self.slots = slots

    def handle(self, request: ApiRequest) -> ApiResponse:
        route, path_ids = _match(request.method, request.path)
        if route is None:
            error = StripeApiError(
                404,
                f"Unrecognized request URL ({request.method}: {request.path}).",
            )
            return error_response(error, request)
        try:
            self._authenticate(request, route.auth)
            if not self.rate_limit.take():
                raise limits.rate_limit_error()
            fault = self.faults.take(request.path)
            if fault == "http_500":
                raise StripeApiError(
                    500, "An unexpected error occurred (injected).", type="api_error"
                )
            if fault == "http_429":
                raise limits.rate_limit_error()
            if fault == "http_409":
                raise StripeApiError(
                    409,
                    "There is currently another in-progress request using this "
                    f"Idempotency-Key '{request.headers.get('idempotency-key', '')}'. "
                    "Please try again later.",
                    type="idempotency_error",
                    code="idempotency_key_in_use",
                )
            call = Call(request, path_ids, self.faults.stall if fault == "hold" else _no_stall)
            key = request.headers.get("idempotency-key")
            if request.method == "POST" and key:
                response = self._idempotent(key, route, call)
            else:
                response = self._run(route, call)
            return replace(response, drop=fault == "drop_connection")
        except StripeApiError as exc:
            return error_response(exc, request)

    def _authenticate(self, request: ApiRequest, auth: Literal["secret", "session"]) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if auth == "session":
            self.state.check_session(token)
            return
        if scheme != "Bearer" or not token:
            raise StripeApiError(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY').",
            )
        if self.state.is_revoked(token):
            raise StripeApiError(
                401,
                f"Expired API Key provided: {token[:8]}****. This key was revoked.",
                code="api_key_expired",
            )
        if not token.startswith(_KEY_PREFIXES):
            raise StripeApiError(
                401,
                f"Invalid API Key provided: {token[:8]}****; the emulator takes test-mode "
                "keys starting with sk_test_ or rk_test_.",
            )

    def _idempotent(self, key: str, route: Route, call: Call) -> ApiResponse:
        request = call.request
        fingerprint = hashlib.sha256(
            b"%s %s\n%s" % (request.method.encode(), request.path.encode(), request.body)
        ).hexdigest()
        saved = self.state.begin_idempotent(key, fingerprint)
        if saved is not None:
            return ApiResponse(
                saved.status, saved.body, (*saved.headers, ("Idempotent-Replayed", "true"))
            )
        reply = None
        try:
            response = self._run(route, call)
            # Save only calls that ran to success: Stripe saves no result for a request that
            # failed validation or was refused, so a retry after fixing it can succeed.
            if 200 <= response.status < 300:
                reply = CachedResponse(response.status, response.body, response.headers)
            return response
        finally:
            self.state.finish_idempotent(key, reply)

    def _run(self, route: Route, call: Call) -> ApiResponse:
        try:
            with self._slot(route, call):
                call.stall()
                status, body = route.endpoint(self.state, call)
        except StripeApiError as exc:
            return error_response(exc, call.request)
        return json_response(status, body, call.request)

    def _slot(self, route: Route, call: Call) -> Any:
        if not route.one_per_customer:
            return nullcontext()
        payload = call.form.get("payload")
        key = self.state.slot_key(
            _str_or_none(call.form.get("event_name")),
            payload if isinstance(payload, dict) else {},
        )
        return self.slots.hold(key)


def _no_stall() -> None:
    return None


def _match(method: str, path: str) -> tuple[Route | None, tuple[str, ...]]:
    for route in ROUTES:
        found = route.pattern.fullmatch(path)
        if found and route.method == method:
            return route, found.groups()
    return None, ()


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _base_headers(request: ApiRequest) -> list[tuple[str, str]]:
    headers = [("Request-Id", f"req_{secrets.token_hex(7)}")]
    if "stripe-version" in request.headers:
        headers.append(("Stripe-Version", request.headers["stripe-version"]))
    if "idempotency-key" in request.headers:
        headers.append(("Idempotency-Key", request.headers["idempotency-key"]))
    return headers


def json_response(status: int, body: object, request: ApiRequest) -> ApiResponse:
    return ApiResponse(status, json.dumps(body).encode(), tuple(_base_headers(request)))


def error_response(error: StripeApiError, request: ApiRequest) -> ApiResponse:
    headers = _base_headers(request)
    if error.should_retry is not None:
        headers.append(("Stripe-Should-Retry", "true" if error.should_retry else "false"))
    return ApiResponse(error.status, json.dumps(error.to_stripe()).encode(), tuple(headers))
