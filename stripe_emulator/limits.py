"""Stripe's call limits: a per-account rate (RefusingRateLimit, a token bucket that refuses)
and one call per customer and meter.

Both answer "no" instead of waiting, because Stripe answers 429 instead of queueing; the
client is the one that must back off.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

from stripe_emulator.records import StripeApiError


class RefusingRateLimit:
    """`rate_per_s` calls a second with bursts of the same size; None means no limit.

    The clock is monotonic seconds and separate from the emulator's Stripe clock, so a test
    can freeze Stripe time without starving the bucket (or freeze this one to test 429s).
    """

    def __init__(self, rate_per_s: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s is not None and rate_per_s < 1:
            raise ValueError(f"rate_limit_per_s must be >= 1 or None, got {rate_per_s}")
        self.rate_per_s = rate_per_s
        self._clock = clock
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._tokens = float(self.rate_per_s or 0)
            self._last_s = self._clock()

    def take(self) -> bool:
        """Spend one token if there is one; False means answer 429."""
        if self.rate_per_s is None:
            return True
        with self._lock:
            now = self._clock()
            elapsed_s = max(0.0, now - self._last_s)
            self._tokens = min(float(self.rate_per_s), self._tokens + elapsed_s * self.rate_per_s)
            self._last_s = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True


class CallSlots:
    """One in-flight call per key; a second caller is refused, never queued."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: set[Hashable] = set()

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        """Occupy `key` for the body of the `with`; raises the 429 if it is occupied."""
        with self._lock:
            if key in self._busy:
                raise concurrent_call_error()
            self._busy.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(key)


def rate_limit_error() -> StripeApiError:
    # No Stripe-Should-Retry header: stripe-python then does not retry a 429, like Stripe.
    # The document's error types are api_error, card_error, idempotency_error and
    # invalid_request_error: a 429 is an invalid_request_error with code rate_limit (the SDK
    # tells it apart by its HTTP status).
    return StripeApiError(
        429,
        "Request rate limit exceeded. You can make requests at a limited rate; back off "
        "with jitter and retry. Learn more about rate limits: https://stripe.com/docs/rate-limits.",
        code="rate_limit",
    )


def concurrent_call_error() -> StripeApiError:
    return StripeApiError(
        429,
        "Too many concurrent requests for this customer and meter: Stripe allows one meter "
        "event call at a time per customer per meter. Wait for the call in flight, then retry.",
        code="rate_limit",
    )
