"""Stripe's side of webhooks: sign each event and deliver it to one endpoint, retrying until
it answers 2xx.

Signing follows Stripe: ``Stripe-Signature: t=<unix s>,v1=<hex>`` with
v1 = HMAC-SHA256(secret, "<t>.<raw body>"), one ``v1=`` per secret while a secret is rolled.
Delivery follows Stripe too: a non-2xx answer or a lost connection is retried with
exponential backoff (Stripe spreads retries over three days; the emulator over seconds, so a
test sees them), events are not delivered in order, and a duplicate can arrive. One thread
delivers; an event waiting for its retry never holds the others back.
"""

from __future__ import annotations

import heapq
import hmac
import http.client
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from urllib.parse import urlsplit

_log = logging.getLogger(__name__)
USER_AGENT = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"


def signature_header(payload: bytes, secrets: Sequence[str], timestamp_s: int) -> str:
    """The ``Stripe-Signature`` value for ``payload``: ``t=...`` then a ``v1=`` per secret."""
    signed = b"%d." % timestamp_s + payload
    parts = [f"t={timestamp_s}"]
    parts += ["v1=" + hmac.new(secret.encode(), signed, sha256).hexdigest() for secret in secrets]
    return ",".join(parts)


@dataclass
class Delivery:
    """One event's delivery so far: the HTTP status of each attempt (None: no answer)."""

    event_id: str
    type: str
    body: bytes
    statuses: list[int | None] = field(default_factory=list)
    delivered: bool = False
    gave_up: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "event_id": self.event_id,
            "type": self.type,
            "attempts": len(self.statuses),
            "statuses": list(self.statuses),
            "delivered": self.delivered,
            "gave_up": self.gave_up,
        }


@dataclass(frozen=True)
class Endpoint:
    url: str
    secrets: tuple[str, ...]


class WebhookSender:
    """Delivers events to the configured endpoint on a background thread.

    ``retry_base_s`` doubles after each failed attempt up to ``retry_max_s``; after
    ``max_attempts`` the event is given up (Stripe disables nothing here, it only stops).
    ``signing_clock`` gives the ``t=`` of each attempt: the receiver checks it against its own
    wall clock, so it is not the account's (possibly manual) clock.
    """

    def __init__(
        self,
        *,
        retry_base_s: float = 0.1,
        retry_max_s: float = 2.0,
        max_attempts: int = 10,
        timeout_s: float = 10.0,
        signing_clock: Callable[[], float] = time.time,
    ) -> None:
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.signing_clock = signing_clock
        self._endpoint: Endpoint | None = None
        self._due: list[tuple[float, int, Delivery]] = []
        self._order = itertools.count()
        self._deliveries: list[Delivery] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="webhook-sender", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> Endpoint | None:
        with self._wake:
            return self._endpoint

    def configure(self, url: str | None, secrets: Sequence[str] = ()) -> None:
        """Send to ``url`` signed with each of ``secrets`` (None: stop sending; events made
        meanwhile are not kept, as Stripe sends nothing to an endpoint that does not exist)."""
        with self._wake:
            self._endpoint = Endpoint(url, tuple(secrets)) if url else None
            self._wake.notify()

    def send(self, event_id: str, type: str, body: bytes) -> None:
        """Queue one event for delivery (no endpoint configured: it is dropped, as Stripe)."""
        with self._wake:
            if self._endpoint is None:
                return
            delivery = Delivery(event_id, type, body)
            self._deliveries.append(delivery)
            heapq.heappush(self._due, (time.monotonic(), next(self._order), delivery))
            self._wake.notify()

    def resend(self, event_id: str) -> bool:
        """Deliver an event already sent once more: Stripe's duplicate delivery."""
        with self._wake:
            found = next((d for d in self._deliveries if d.event_id == event_id), None)
            if found is None:
                return False
            again = Delivery(found.event_id, found.type, found.body)
            self._deliveries.append(again)
            heapq.heappush(self._due, (time.monotonic(), next(self._order), again))
            self._wake.notify()
            return True

    def deliveries(self) -> list[Delivery]:
        with self._wake:
            return list(self._deliveries)

    def pending(self) -> int:
        """Deliveries still waiting for an attempt or a retry."""
        with self._wake:
            return len(self._due)

    def reset(self) -> None:
        with self._wake:
            self._due.clear()
            self._deliveries.clear()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=self.timeout_s + 1)

    def _next(self) -> tuple[Delivery, Endpoint] | None:
        with self._wake:
            while not self._closed:
                now = time.monotonic()
                if self._due and self._endpoint is not None and self._due[0][0] <= now:
                    delivery = heapq.heappop(self._due)[2]
                    return delivery, self._endpoint
                wait = self._due[0][0] - now if self._due else None
                self._wake.wait(timeout=wait if wait is None or wait > 0 else 0.05)
            return None

    def _run(self) -> None:
        while (taken := self._next()) is not None:
            delivery, endpoint = taken
            status = self._attempt(delivery, endpoint)
            with self._wake:
                delivery.statuses.append(status)
                if status is not None and 200 <= status < 300:
                    delivery.delivered = True
                elif len(delivery.statuses) >= self.max_attempts:
                    delivery.gave_up = True
                else:
                    backoff_s = min(
                        self.retry_max_s, self.retry_base_s * 2 ** (len(delivery.statuses) - 1)
                    )
                    due = time.monotonic() + backoff_s
                    heapq.heappush(self._due, (due, next(self._order), delivery))

    def _attempt(self, delivery: Delivery, endpoint: Endpoint) -> int | None:
        url = urlsplit(endpoint.url)
        header = signature_header(delivery.body, endpoint.secrets, int(self.signing_clock()))
        connection = http.client.HTTPConnection(
            url.hostname or "127.0.0.1", url.port or 80, timeout=self.timeout_s
        )
        try:
            connection.request(
                "POST",
                url.path or "/",
                body=delivery.body,
                headers={
                    "Content-Type": "application/json; charset=utf-8",
                    "Stripe-Signature": header,
                    "User-Agent": USER_AGENT,
                },
            )
            response = connection.getresponse()
            response.read()
            return response.status
        except OSError as exc:
            # A receiver that is down or restarting: retried like a non-2xx answer.
            _log.info("webhook %s to %s: no answer (%s)", delivery.event_id, endpoint.url, exc)
            return None
        finally:
            connection.close()
