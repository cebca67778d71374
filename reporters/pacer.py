"""The reporter's own pace: at most METERSTREAM_STRIPE_RATE calls per second, every call.

Stripe answers 429 rather than queueing, so the reporter keeps under the rate itself instead of
spending calls to learn it. The Pacer waits (a token bucket of one token): calls are spaced at
least 1/rate apart, so no burst can exceed the rate over any window, whatever Stripe's own
bucket size is. (The emulator's RefusingRateLimit is Stripe's side: it refuses, never waits.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

MonotonicSeconds = Callable[[], float]  # time.monotonic or a test's fake
Wait = Callable[[float], bool]  # waits up to n seconds; True if the process is stopping


class Pacer:
    """``rate_per_s`` calls a second, spaced evenly; thread-safe.

    ``clock`` is monotonic seconds and ``wait`` sleeps (e.g. ``threading.Event().wait``, so a
    stop request ends the wait); both are seams for tests.
    """

    def __init__(
        self, rate_per_s: float, clock: MonotonicSeconds = time.monotonic, wait: Wait | None = None
    ):
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
        self.interval_s = 1.0 / rate_per_s
        self._clock = clock
        self._wait = wait if wait is not None else threading.Event().wait
        self._lock = threading.Lock()
        self._next_s: float | None = None

    def acquire(self) -> bool:
        """Block until the next call may go; False if the wait was cut short by a stop."""
        with self._lock:
            now = self._clock()
            slot = now if self._next_s is None else max(now, self._next_s)
            self._next_s = slot + self.interval_s
        delay = slot - now
        stopping = delay > 0 and self._wait(delay)
        return not stopping
