"""In-memory state of one fake Stripe account: customers, meters, events, sessions, replies.
Past 400 lines: one account behind one lock (a split would spread the lock across modules).

No HTTP here: the server parses a request and calls one method, which applies the rules in
`rules.py` and raises `StripeApiError` when one is broken. One re-entrant lock guards all
of it, because the server handles each call on its own thread. Values are `int` (Stripe
takes whole numbers only); times are Unix seconds from an injectable clock, so a test can
expire a session or age an event without sleeping.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from stripe_emulator import rules
from stripe_emulator.records import (
    AsyncError,
    CachedResponse,
    Customer,
    JsonObject,
    Meter,
    MeterEvent,
    Session,
    StripeApiError,
)

EpochSeconds = Callable[[], float]  # Stripe's clock: Unix seconds (time.time or a ManualClock)


class ManualClock:
    """A clock a test moves by hand: `clock()` gives Unix seconds, `advance(s)` moves it."""

    def __init__(self, now_s: float) -> None:
        self._now_s = now_s
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now_s

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now_s += seconds


@dataclass(frozen=True)
class StreamEvent:
    """One event of a v2 stream call, its shape already checked (not yet its rules)."""

    event_name: str
    payload: Mapping[str, str]
    identifier: str | None
    timestamp: int | None


class EmulatorState:
    """Everything one fake Stripe account holds; every method is thread-safe."""

    def __init__(self, clock: EpochSeconds = time.time) -> None:
        self.clock = clock
        self.lock = threading.RLock()
        # The duplicate-identifier answer's wording (a template with {identifier}); the
        # document fixes none, so a test can change it and check the reporter does not care.
        self.duplicate_message = rules.DUPLICATE_MESSAGE
        self.reset()

    def reset(self) -> None:
        """Forget everything, as if a new Stripe account had been opened."""
        with self.lock:
            self._customers: dict[str, Customer] = {}
            self._meters: dict[str, Meter] = {}
            self._events: list[MeterEvent] = []
            self._event_index: dict[str, int] = {}
            self._async_errors: list[AsyncError] = []
            self._sessions: dict[str, Session] = {}
            self._replies: dict[str, tuple[str, CachedResponse]] = {}
            self._in_flight: dict[str, str] = {}
            self._revoked: set[str] = set()
            self._v2_events: dict[str, JsonObject] = {}

    def revoke_key(self, key: str) -> None:
        """Refuse ``key`` from now on (401), as Stripe does once a key is rolled or deleted
        in the Dashboard; sessions it opened live on until they expire."""
        with self.lock:
            self._revoked.add(key)

    def is_revoked(self, key: str) -> bool:
        with self.lock:
            return key in self._revoked

    def now_s(self) -> int:
        return int(self.clock())

    @property
    def events(self) -> tuple[MeterEvent, ...]:
        """Every recorded meter event in arrival order, cancelled ones included (flagged)."""
        with self.lock:
            return tuple(self._events)

    @property
    def async_errors(self) -> tuple[AsyncError, ...]:
        """Stream events Stripe would have rejected after answering 200."""
        with self.lock:
            return tuple(self._async_errors)

    def totals(self) -> dict[tuple[str, str], int]:
        """Sum of the values of live (not cancelled) events per (event_name, customer_id)."""
        totals: dict[tuple[str, str], int] = {}
        for event in self.events:
            if not event.cancelled:
                key = (event.event_name, event.customer_id)
                totals[key] = totals.get(key, 0) + event.value
        return totals

    # -- customers and meters -----------------------------------------------------------------

    def create_customer(
        self, *, customer_id: str | None = None, name: str | None = None, email: str | None = None
    ) -> Customer:
        """Create a customer; choosing `customer_id` is an emulator extension for seeding."""
        with self.lock:
            new_id = customer_id or f"cus_{secrets.token_hex(7)}"
            if new_id in self._customers:
                raise StripeApiError(
                    400, f"Customer already exists: '{new_id}'.", code="resource_already_exists"
                )
            customer = Customer(new_id, name, email, self.now_s())
            self._customers[new_id] = customer
            return customer

    def customer(self, customer_id: str) -> Customer:
        with self.lock:
            if customer_id not in self._customers:
                raise rules.resource_missing("customer", customer_id, "id")
            return self._customers[customer_id]

    def customers(self) -> list[Customer]:
        with self.lock:
            newest = reversed(self._customers.values())
            return sorted(newest, key=lambda c: c.created, reverse=True)

    def create_meter(
        self,
        *,
        display_name: str | None,
        event_name: str | None,
        formula: str | None = "sum",
        customer_key: str = "stripe_customer_id",
        value_key: str = "value",
        event_time_window: str | None = None,
        customer_mapping_type: str = "by_id",
        dimension_payload_keys: Sequence[str] = (),
    ) -> Meter:
        """Create an active meter; an event name belongs to exactly one meter.

        ``event_time_window`` and ``customer_mapping_type`` are for seeding only: the emulator
        shows them on the meter but does not apply them (the API refuses them on create)."""
        for param, given in (
            ("display_name", display_name),
            ("event_name", event_name),
            ("default_aggregation[formula]", formula),
        ):
            if not given:
                raise rules.param_missing(param)
        if formula not in rules.FORMULAS:
            raise StripeApiError(
                400,
                f"Invalid default_aggregation[formula]: must be one of sum, count or last, "
                f"got '{formula}'.",
                param="default_aggregation[formula]",
            )
        with self.lock:
            if self._meter_for(str(event_name)) is not None:
                raise StripeApiError(
                    400,
                    f"A meter with event_name '{event_name}' already exists.",
                    code="resource_already_exists",
                    param="event_name",
                )
            now = self.now_s()
            meter = Meter(
                id=f"mtr_test_{secrets.token_hex(12)}",
                display_name=str(display_name),
                event_name=str(event_name),
                formula=formula,
                customer_key=customer_key,
                value_key=value_key,
                status="active",
                created=now,
                updated=now,
                deactivated_at=None,
                event_time_window=event_time_window,
                customer_mapping_type=customer_mapping_type,
                dimension_payload_keys=tuple(dimension_payload_keys),
            )
            self._meters[meter.id] = meter
            return meter

    def meter(self, meter_id: str) -> Meter:
        with self.lock:
            if meter_id not in self._meters:
                raise rules.resource_missing("billing.meter", meter_id, "id")
            return self._meters[meter_id]

    def meters(self, status: str | None = None) -> list[Meter]:
        with self.lock:
            # Newest first, as Stripe lists; within one second, the later created first.
            found = [m for m in reversed(self._meters.values()) if status in (None, m.status)]
        return sorted(found, key=lambda m: m.created, reverse=True)

    def update_meter(
        self, meter_id: str, *, active: bool | None = None, display_name: str | None = None
    ) -> Meter:
        """Deactivate, reactivate or rename; nothing else about a meter can change."""
        with self.lock:
            meter = self.meter(meter_id)
            now = self.now_s()
            if display_name:
                meter = replace(meter, display_name=display_name, updated=now)
            if active is not None:
                meter = replace(
                    meter,
                    status="active" if active else "inactive",
                    updated=now,
                    deactivated_at=None if active else now,
                )
            self._meters[meter_id] = meter
            return meter

    def _meter_for(self, event_name: str) -> Meter | None:
        return next((m for m in self._meters.values() if m.event_name == event_name), None)

    # -- meter events -------------------------------------------------------------------------

    def slot_key(self, event_name: str | None, payload: Mapping[str, str]) -> tuple[str, str]:
        """The (meter, customer) pair Stripe allows one concurrent call for.

        Falls back to the raw event name and customer value when no meter matches, so a
        call is still serialised with its twins even though it will be rejected.
        """
        with self.lock:
            meter = self._meter_for(event_name or "")
            key = meter.customer_key if meter else "stripe_customer_id"
            return (meter.id if meter else str(event_name)), payload.get(key, "")

    def record_event(
        self,
        *,
        event_name: str | None,
        payload: Mapping[str, str],
        identifier: str | None,
        timestamp: int | None,
        source: str,
    ) -> MeterEvent:
        """Apply every synchronous rule, then record the event; raises StripeApiError."""
        name = rules.check_names(event_name, identifier)
        with self.lock:
            now = self.now_s()
            meter = rules.check_meter_active(self._meter_for(name), name)
            raw_customer = payload.get(meter.customer_key)
            customer_id = rules.check_customer(
                raw_customer, meter, known=raw_customer in self._customers
            )
            value = rules.parse_value(payload.get(meter.value_key), meter)
            rules.check_dimensions(payload, meter)
            at = rules.check_timestamp(now if timestamp is None else timestamp, now)
            identifier = identifier or f"emu_{secrets.token_hex(12)}"
            known = self._event_index.get(identifier)
            if known is not None and now - self._events[known].created < rules.IDENTIFIER_KEPT_S:
                raise rules.duplicate_identifier(identifier, self.duplicate_message)
            event = MeterEvent(
                event_name=name,
                meter_id=meter.id,
                customer_id=customer_id,
                value=value,
                identifier=identifier,
                timestamp=at,
                created=now,
                payload=dict(payload),
                source=source,
            )
            self._event_index[identifier] = len(self._events)
            self._events.append(event)
            return event

    def record_stream(self, events: Sequence[StreamEvent]) -> None:
        """Record the valid events of one stream call; keep the others as async errors.

        Stripe answers a stream call with 200 before it validates the events, so a bad
        event cannot fail the call; Stripe reports it later, the emulator in `async_errors`.
        """
        with self.lock:
            for item in events:
                try:
                    self.record_event(
                        event_name=item.event_name,
                        payload=item.payload,
                        identifier=item.identifier,
                        timestamp=item.timestamp,
                        source="v2_stream",
                    )
                except StripeApiError as exc:
                    error = AsyncError(
                        exc.code or exc.type, exc.message, item.event_name, item.identifier
                    )
                    self._async_errors.append(error)

    def cancel_event(self, *, event_name: str | None, identifier: str | None) -> MeterEvent:
        """Cancel one event by identifier, only within 24 h of Stripe receiving it."""
        if not event_name:
            raise rules.param_missing("event_name")
        if not identifier:
            raise rules.param_missing("cancel[identifier]")
        with self.lock:
            index = self._event_index.get(identifier)
            if index is None or self._events[index].event_name != event_name:
                raise rules.resource_missing("meter event", identifier, "cancel[identifier]")
            rules.check_cancellable(self._events[index], self.now_s())
            self._events[index] = replace(self._events[index], cancelled=True)
            return self._events[index]

    def event_summaries(
        self,
        meter_id: str,
        *,
        customer_id: str,
        start_time: int,
        end_time: int,
        window: str | None,
        group_by: Sequence[str] = (),
    ) -> list[JsonObject]:
        """Stripe's `billing.meter_event_summary` objects for one customer; see rules.summarize."""
        with self.lock:
            meter = self.meter(meter_id)
            return rules.summarize(
                meter,
                self._events,
                customer_id=customer_id,
                start_time=start_time,
                end_time=end_time,
                window=window,
                group_by=group_by,
            )

    # -- v2 sessions --------------------------------------------------------------------------

    def create_session(self) -> Session:
        """A meter event session whose token authenticates stream calls for 15 minutes."""
        with self.lock:
            now = self.now_s()
            session = Session(
                id=f"mes_test_{secrets.token_hex(12)}",
                authentication_token=f"mes_tok_{secrets.token_urlsafe(24)}",
                created=now,
                expires_at=now + rules.SESSION_TTL_S,
            )
            self._sessions[session.authentication_token] = session
            return session

    def check_session(self, token: str) -> None:
        with self.lock:
            session = self._sessions.get(token)
            if session is None or self.now_s() >= session.expires_at:
                raise rules.session_expired()

    # -- v2 events (the full events behind thin webhook notifications) ------------------------

    def save_v2_event(self, event: JsonObject) -> None:
        with self.lock:
            self._v2_events[str(event["id"])] = event

    def v2_event(self, event_id: str) -> JsonObject:
        with self.lock:
            if event_id not in self._v2_events:
                raise rules.resource_missing("v2.core.event", event_id, "id")
            return self._v2_events[event_id]

    # -- idempotency --------------------------------------------------------------------------

    def begin_idempotent(self, key: str, fingerprint: str) -> CachedResponse | None:
        """The saved reply for a repeated key and request, or None once marked in flight."""
        with self.lock:
            saved = self._replies.get(key)
            if saved is not None:
                if saved[0] != fingerprint:
                    raise StripeApiError(
                        400,
                        "Keys for idempotent requests can only be used with the same "
                        "parameters they were first used with. Try using a key other than "
                        f"'{key}' if you meant to execute a different request.",
                        type="idempotency_error",
                    )
                return saved[1]
            if key in self._in_flight:
                raise StripeApiError(
                    409,
                    "There is currently another in-progress request using this "
                    f"Idempotency-Key '{key}'. Please try again later.",
                    type="idempotency_error",
                    code="idempotency_key_in_use",
                )
            self._in_flight[key] = fingerprint
            return None

    def finish_idempotent(self, key: str, reply: CachedResponse | None) -> None:
        """Save the reply to replay later (None: nothing ran, save nothing); clear in-flight."""
        with self.lock:
            fingerprint = self._in_flight.pop(key, None)
            if reply is not None and fingerprint is not None:
                self._replies[key] = (fingerprint, reply)
