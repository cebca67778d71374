"""Faults a test injects to prove a client survives them: 500, 429, lost answers, stalls.

Kinds:
- `http_500`: answer 500 `api_error` before doing anything (the SDK retries it).
- `http_429`: answer 429 (code `rate_limit`) before doing anything (the SDK does not retry).
- `http_409`: answer 409 `idempotency_error` "another in-progress request" before doing
  anything, as Stripe does while an earlier call with the same Idempotency-Key still runs
  (a slow call the client timed out on and retried).
- `drop_connection`: do the work (record the event, save the idempotent reply), then close
  the socket without answering, as when a response is lost on the way back.
- `hold`: stall the call while it does its work (holding its customer-and-meter slot) until
  `release()`, so a test can make calls overlap without sleeping.

Rules fire on the API paths starting with `path_prefix` (all API paths if None), either on
the next `count` matching calls or, with `probability`, on each one by a seeded random draw.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Literal, get_args

FaultKind = Literal["http_500", "http_429", "http_409", "drop_connection", "hold"]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)


@dataclass
class _Rule:
    kind: FaultKind
    remaining: int | None
    probability: float | None
    path_prefix: str | None


class Faults:
    """The fault rules of one emulator; thread-safe."""

    def __init__(self, seed: int = 0, hold_timeout_s: float = 30.0) -> None:
        self._seed = seed
        self._hold_timeout_s = hold_timeout_s
        self._changed = threading.Condition()
        # Seeded, not cryptographic, on purpose: a failing fault run must be replayable.
        self._random = random.Random(seed)  # noqa: S311
        self._rules: list[_Rule] = []
        self._fired: list[tuple[FaultKind, str]] = []
        self._held = 0
        self._release_generation = 0

    def inject(
        self,
        kind: FaultKind,
        *,
        count: int | None = 1,
        probability: float | None = None,
        path_prefix: str | None = None,
    ) -> None:
        """Add a rule; `count=None` keeps it forever. Raises ValueError on bad arguments."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAULT_KINDS)}, got {kind!r}")
        if count is not None and count < 1:
            raise ValueError(f"count must be >= 1 or None, got {count}")
        if probability is not None and not 0 < probability <= 1:
            raise ValueError(f"probability must be in (0, 1], got {probability}")
        with self._changed:
            self._rules.append(_Rule(kind, count, probability, path_prefix))

    def clear(self) -> None:
        """Drop every rule, forget what fired, reseed, and release stalled calls."""
        with self._changed:
            self._rules.clear()
            self._fired.clear()
            self._random = random.Random(self._seed)  # noqa: S311
        self.release()

    @property
    def fired(self) -> tuple[tuple[FaultKind, str], ...]:
        """(kind, path) of every fault that fired, in order."""
        with self._changed:
            return tuple(self._fired)

    def take(self, path: str) -> FaultKind | None:
        """The fault this call should suffer, if any; consumes one use of its rule."""
        with self._changed:
            for rule in self._rules:
                if rule.path_prefix is not None and not path.startswith(rule.path_prefix):
                    continue
                if rule.probability is not None and self._random.random() >= rule.probability:
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._rules.remove(rule)
                self._fired.append((rule.kind, path))
                return rule.kind
            return None

    def stall(self) -> None:
        """Block the calling request until `release()` (or the hold timeout)."""
        with self._changed:
            generation = self._release_generation
            self._held += 1
            self._changed.notify_all()
            try:
                self._changed.wait_for(
                    lambda: self._release_generation != generation, self._hold_timeout_s
                )
            finally:
                self._held -= 1
                self._changed.notify_all()

    def wait_held(self, count: int = 1, timeout_s: float = 10.0) -> bool:
        """Wait until `count` calls are stalled; False if that did not happen in time."""
        with self._changed:
            return self._changed.wait_for(lambda: self._held >= count, timeout_s)

    def release(self) -> None:
        """Let every stalled call go on."""
        with self._changed:
            self._release_generation += 1
            self._changed.notify_all()
