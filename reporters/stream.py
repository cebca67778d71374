"""The v2 meter event stream, for volumes past what v1 allows (METERSTREAM_STRIPE_STREAM=1).

A session (POST /v2/billing/meter_event_session, with the secret key) gives a token that lives
15 minutes; stream calls (on the meter_events host) carry up to 100 events and authenticate with
that token. The session is renewed ``renew_margin_s`` before it expires, and once more if Stripe
says it expired anyway (clock skew).

Stripe validates stream events asynchronously: a 202 means "accepted", not "valid". Rows are
therefore marked ``accepted`` (not ``sent``) and count as unconfirmed (status, billing lag)
until ``meterstream reconcile`` finds them in Stripe's summaries and marks them ``sent``. An
event Stripe refuses later stays ``accepted`` and shows as drift; consuming Stripe's
``v1.billing.meter.error_report_triggered`` events is not implemented.
A resend after a crash is harmless: each event's identifier is deduplicated by Stripe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import stripe

from reporters.ledger import LedgerRow
from reporters.meters_check import StripeMeter
from reporters.stripe_push import Outcome, StripeGateway, classify

_log = logging.getLogger(__name__)
MAX_EVENTS_PER_CALL = 100


def stream_event(row: LedgerRow, meter: StripeMeter) -> dict[str, Any]:
    """One v2 event for a ledger row (RFC 3339 timestamp, value as a string)."""
    return {
        "event_name": row.event_name,
        "payload": {meter.customer_key: row.stripe_customer_id, meter.value_key: str(row.value)},
        "identifier": row.identifier,
        "timestamp": row.timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
    }


class StreamSender:
    """Sends ledger rows in batches of at most 100 over a renewed session."""

    def __init__(
        self,
        client: stripe.StripeClient,
        gateway: StripeGateway,
        session_client: Callable[[str], stripe.StripeClient],
        clock: Callable[[], datetime],
        renew_margin_s: float = 60.0,
    ) -> None:
        self._client = client
        self._gateway = gateway
        self._session_client = session_client
        self._clock = clock
        self._renew_margin = timedelta(seconds=renew_margin_s)
        self._stream: stripe.StripeClient | None = None
        self._expires_at = datetime.min.replace(tzinfo=UTC)

    def send_batch(self, rows: Sequence[LedgerRow], meters: Mapping[str, StripeMeter]) -> Outcome:
        """Send up to 100 rows in one stream call; the outcome applies to all of them."""
        if len(rows) > MAX_EVENTS_PER_CALL:
            raise ValueError(f"at most {MAX_EVENTS_PER_CALL} events per call, got {len(rows)}")
        params: Any = {"events": [stream_event(row, meters[row.meter]) for row in rows]}
        for renewed in (False, True):
            try:
                stream = self._session(force=renewed)
                self._gateway.call(
                    partial(stream.v2.billing.meter_event_stream.create, params=params)
                )
            except stripe.TemporarySessionExpiredError:
                if renewed:
                    return Outcome("retry", error="meter event session expired twice in a row")
                _log.warning("meter event session expired before its time; renewing it")
                continue
            except stripe.StripeError as exc:
                return classify(exc, None)
            return Outcome("acknowledged")
        raise AssertionError("unreachable")  # pragma: no cover

    def _session(self, force: bool) -> stripe.StripeClient:
        now = self._clock()
        if self._stream is not None and not force and now < self._expires_at - self._renew_margin:
            return self._stream
        session = self._gateway.call(lambda: self._client.v2.billing.meter_event_session.create())
        self._expires_at = _parse_time(session.expires_at)
        # The token is a credential too: it is never logged.
        self._stream = self._session_client(session.authentication_token)
        _log.info("meter event session %s renewed; expires at %s", session.id, session.expires_at)
        return self._stream


def _parse_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(UTC)
