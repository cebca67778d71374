"""The v2 meter event stream, for volumes past what v1 allows (METERSTREAM_STRIPE_STREAM=1).

A session (POST /v2/billing/meter_event_session, with the secret key) gives a token that lives
15 minutes; stream calls (on the meter_events host) carry up to 100 events and authenticate with
that token. The session is renewed ``renew_margin_s`` before it expires, and once more if Stripe
says it expired anyway (clock skew).

Stripe validates stream events asynchronously: a 200 means "accepted", not "valid". Rows are
therefore marked ``accepted`` (not ``sent``) and count as unconfirmed (status, billing lag)
until ``meterstream reconcile`` finds them in Stripe's summaries and marks them ``sent``. An
event Stripe refuses later stays ``accepted`` and shows as drift; consuming Stripe's
``v1.billing.meter.error_report_triggered`` events is not implemented.
A resend after a crash is harmless: each event's identifier is deduplicated by Stripe.

Sessions are created through the SDK. Stream calls are posted through the SDK's HTTP client
(``stripe.HTTPClient.request_with_retries``: its retries of lost connections, 409 and 5xx,
with one Idempotency-Key per call), with the JSON body and the headers the SDK itself sends
(tests/reporters/test_stream.py compares them byte for byte). Not through the SDK's request
builder: for a v2 call it also form-encodes all 100 events, only to log them at debug level,
which measured 1.5 of its 1.9 ms per call. Error answers become the SDK's own error classes
(:func:`stream_error`), as the SDK would raise them for the cases the ledger tells apart.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, cast

import stripe

from reporters.ledger import LedgerRow
from reporters.meters_check import StripeMeter
from reporters.payload import meter_event_payload
from reporters.stripe_push import Outcome, StripeGateway, classify

_log = logging.getLogger(__name__)
MAX_EVENTS_PER_CALL = 100
STREAM_PATH = "/v2/billing/meter_event_stream"


def stream_event(row: LedgerRow, meter: StripeMeter) -> dict[str, Any]:
    """One v2 event for a ledger row (RFC 3339 timestamp, value as a string)."""
    return {
        "event_name": row.event_name,
        "payload": meter_event_payload(row, meter),
        "identifier": row.identifier,
        "timestamp": row.timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
    }


def stream_body(rows: Sequence[LedgerRow], meters: Mapping[str, StripeMeter]) -> str:
    """The stream call's JSON body, as the SDK encodes ``{"events": [...]}``."""
    return json.dumps({"events": [stream_event(row, meters[row.meter]) for row in rows]})


# Error types answered the way the SDK's v1 mapping (by HTTP status) answers them.
_GENERIC_TYPES = frozenset(
    {
        None,
        "invalid_request",
        "invalid_request_error",
        "idempotency_error",
        "rate_limit",
        "rate_limit_error",
        "authentication_error",
        "permission_error",
        "api_error",
        "temporary_session_expired",
    }
)


def stream_error(
    content: str | bytes, status: int, headers: Mapping[str, str]
) -> stripe.StripeError:
    """The SDK's error for a stream call's error answer, for every case the ledger tells apart
    (stripe_push.classify): an expired session, a rate limit, an idempotency error, a refused
    request (400/404), a refused token (401/403). An error type not in _GENERIC_TYPES is a
    plain APIError, which classify() retries: the SDK maps many v2 types to classes of their
    own (which classify() retries too), and a type new to us must never reject rows unseen."""
    text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
    # The SDK keeps the transport's headers object (case-insensitive: it reads "request-id").
    found = cast(dict[str, str], headers)
    try:
        answer = json.loads(text)
    except ValueError:
        return stripe.APIError(
            f"Invalid response body from API: {text} (HTTP response code was {status})",
            http_body=text,
            http_status=status,
            headers=found,
        )
    try:
        error = answer["error"]
        kind, code, message = error.get("type"), error.get("code"), error.get("message")
    except (KeyError, TypeError, AttributeError):
        return stripe.APIError(
            f"Invalid response object from API: {text!r} (HTTP response code was {status})",
            http_body=text,
            http_status=status,
            headers=found,
        )
    common: dict[str, Any] = {
        "http_body": text,
        "http_status": status,
        "json_body": answer,
        "headers": found,
        "code": code,
    }
    if kind == "temporary_session_expired":
        return stripe.TemporarySessionExpiredError(message, **common)
    if kind == "rate_limit":
        return stripe.RateLimitError(message, **common)
    # A refused key or a rate limit, whatever the type: stop the cycle, or back off.
    if status == 401:
        return stripe.AuthenticationError(message, **common)
    if status == 403:
        return stripe.PermissionError(message, **common)
    if status == 429 or (status == 400 and code == "rate_limit"):
        return stripe.RateLimitError(message, **{**common, "code": None})  # as the SDK does
    if kind not in _GENERIC_TYPES:
        return stripe.APIError(message, **common)
    if kind == "idempotency_error":
        return stripe.IdempotencyError(message, **common)
    if status in (400, 404):
        invalid: stripe.StripeError = stripe.InvalidRequestError(  # type: ignore[no-untyped-call]  # SDK: unannotated
            message, error.get("param"), **common
        )
        return invalid
    return stripe.APIError(message, **common)


class StreamSender:
    """Sends ledger rows in batches of at most 100 over a renewed session."""

    def __init__(
        self,
        client: stripe.StripeClient,
        gateway: StripeGateway,
        http_client: stripe.HTTPClient,
        meter_events_base: str,
        clock: Callable[[], datetime],
        *,
        max_network_retries: int,
        renew_margin_s: float = 60.0,
    ) -> None:
        self._client = client
        self._gateway = gateway
        self._http = http_client
        self._url = meter_events_base.rstrip("/") + STREAM_PATH
        self._clock = clock
        self._max_network_retries = max_network_retries
        self._renew_margin = timedelta(seconds=renew_margin_s)
        self._headers: dict[str, str] | None = None
        self._expires_at = datetime.min.replace(tzinfo=UTC)
        # The sending lanes share the session: one renews it while the others wait for it.
        self._session_lock = threading.Lock()
        # What the SDK sends in these two headers, less its telemetry (a per-install id and
        # the platform string).
        self._user_agent = {
            "X-Stripe-Client-User-Agent": json.dumps(
                {
                    "bindings_version": stripe.VERSION,
                    "lang": "python",
                    "httplib": http_client.name,
                    "lang_version": platform.python_version(),
                }
            ),
            "User-Agent": f"Stripe/v2 PythonBindings/{stripe.VERSION}",
        }

    def ready(self) -> bool:
        """Open or renew the session if due, before rows are stamped for a call on it: False
        if Stripe would not open one (try again next cycle); raises StripeAuthError (the key
        is refused) or StoppedError."""
        try:
            self._session(force=False)
        except stripe.StripeError as exc:
            outcome = classify(exc, None)  # raises StripeAuthError for a refused key
            _log.warning("no meter event session (%s): sending waits", outcome.error)
            return False
        return True

    def send_batch(self, rows: Sequence[LedgerRow], meters: Mapping[str, StripeMeter]) -> Outcome:
        """Send up to 100 rows in one stream call; the outcome applies to all of them."""
        if len(rows) > MAX_EVENTS_PER_CALL:
            raise ValueError(f"at most {MAX_EVENTS_PER_CALL} events per call, got {len(rows)}")
        body = stream_body(rows, meters)
        for renewed in (False, True):
            try:
                self._gateway.call(partial(self._post, self._session(force=renewed), body))
            except stripe.TemporarySessionExpiredError:
                if renewed:
                    return Outcome("retry", error="meter event session expired twice in a row")
                _log.warning("meter event session expired before its time; renewing it")
                continue
            except stripe.StripeError as exc:
                return classify(exc, None)
            return Outcome("acknowledged")
        raise AssertionError("unreachable")  # pragma: no cover

    def _post(self, session_headers: Mapping[str, str], body: str) -> None:
        # One Idempotency-Key per call, kept across the SDK's retries of it, as the SDK does.
        headers = {**session_headers, "Idempotency-Key": str(uuid.uuid4())}
        content, status, answer_headers = self._http.request_with_retries(
            "post", self._url, headers, body, self._max_network_retries
        )
        if not 200 <= status < 300:
            raise stream_error(content, status, answer_headers)
        # As the SDK: a success must be a JSON object. A 2xx page from something else on the
        # way (a proxy, a gateway) is not Stripe's acceptance: retried, not marked accepted.
        try:
            accepted = json.loads(content)
        except ValueError:
            accepted = None
        if not isinstance(accepted, dict):
            raise stripe.APIError(
                f"Invalid response body from API: {content!r:.200} (HTTP response code was "
                f"{status})",
                http_body=content,
                http_status=status,
                headers=cast(dict[str, str], answer_headers),
            )

    def _session(self, force: bool) -> dict[str, str]:
        """The headers of a stream call on a live session (renewed when due or ``force``)."""
        with self._session_lock:
            return self._live_session(force)

    def _live_session(self, force: bool) -> dict[str, str]:
        now = self._clock()
        if self._headers is not None and not force and now < self._expires_at - self._renew_margin:
            return self._headers
        session = self._gateway.call(lambda: self._client.v2.billing.meter_event_session.create())
        self._expires_at = _parse_time(session.expires_at)
        # The token is a credential too: it is never logged.
        self._headers = {
            **self._user_agent,
            "Authorization": f"Bearer {session.authentication_token}",
            "Content-Type": "application/json",
            "Stripe-Version": stripe.api_version,
        }
        _log.info("meter event session %s renewed; expires at %s", session.id, session.expires_at)
        return self._headers


def _parse_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(UTC)
