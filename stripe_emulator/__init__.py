"""A local Stripe emulator for billing meters that the real `stripe` SDK talks to over HTTP.

It serves the meter slice of Stripe's API (v1 meter events, adjustments, meters, event
summaries, customers; v2 meter event sessions and streams) with Stripe's rules, limits and
error shapes, plus faults a test can inject. Modules, from the wire inwards:
`server` (HTTP, control API, running) -> `api` (auth, limits, idempotency, faults) ->
`routes` (endpoints; `params` reads their parameters) -> `state` (the account) ->
`rules` (Stripe's checks) -> `records`.
"""

from __future__ import annotations

from stripe_emulator.faults import FAULT_KINDS, FaultKind, Faults
from stripe_emulator.limits import RefusingRateLimit
from stripe_emulator.records import (
    AsyncError,
    Customer,
    Meter,
    MeterEvent,
    StripeApiError,
)
from stripe_emulator.server import (
    DEFAULT_RATE_LIMIT_PER_S,
    Emulator,
    run_stripe_emulator,
    serve_forever,
)
from stripe_emulator.state import EmulatorState, EpochSeconds, ManualClock

__all__ = [
    "DEFAULT_RATE_LIMIT_PER_S",
    "FAULT_KINDS",
    "AsyncError",
    "Customer",
    "Emulator",
    "EmulatorState",
    "EpochSeconds",
    "FaultKind",
    "Faults",
    "ManualClock",
    "Meter",
    "MeterEvent",
    "RefusingRateLimit",
    "StripeApiError",
    "run_stripe_emulator",
    "serve_forever",
]
