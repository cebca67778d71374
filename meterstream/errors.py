"""The errors meterstream raises, all under one base so a caller can catch the family.

MeterstreamError
 +-- ConfigError               a setting or the meter catalogue is wrong; fix it and restart
 |    +-- CatalogueError       names the meter, the key and the reason
 |    +-- CatalogueChangedError a meter with stored totals was removed or redefined
 +-- InvalidEventError         a usage event broke a rule; names the field and the reason
 +-- BrokerUnavailableError    no Kafka broker answered at the configured bootstrap
 +-- BackpressureError         the producer queue stayed full past the configured wait
 +-- DeliveryError             events accepted by the SDK that Kafka refused for good
 +-- StripeRejectedError       Stripe answered 4xx for a meter event; not retried
 +-- ReplayError               dead letters Kafka did not take back; replaying again is safe
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class MeterstreamError(Exception):
    """Base of every error meterstream raises on purpose."""


class ConfigError(MeterstreamError):
    """A setting is missing or invalid. The message names the variable and what would be valid."""


class CatalogueError(ConfigError):
    """The meter catalogue is invalid: names the meter, the key and the reason."""

    def __init__(self, meter: str, key: str, reason: str) -> None:
        self.meter = meter
        self.key = key
        self.reason = reason
        super().__init__(f"meter {meter!r}: {key}: {reason}")


class CatalogueChangedError(ConfigError):
    """The catalogue no longer describes totals the database holds (aggregators.definitions)."""


class InvalidEventError(MeterstreamError):
    """A usage event broke a rule. Nothing of it was sent; ``field`` and ``reason`` say why."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class BrokerUnavailableError(MeterstreamError):
    """No Kafka broker answered at the configured bootstrap."""


class BackpressureError(MeterstreamError):
    """The producer's queue stayed full for longer than the configured wait; the event was not
    accepted, so the caller still owns it and may retry."""


@dataclass(frozen=True, slots=True)
class UndeliveredEvent:
    """An accepted event Kafka did not acknowledge, with the exact bytes that were produced."""

    event_id: str
    reason: str
    key: bytes
    payload: bytes


class DeliveryError(MeterstreamError):
    """Kafka refused events for good after the SDK had accepted them.

    ``event_ids`` lists every undelivered event; ``events`` holds their exact bytes. Hand them to
    ``UsageClient.resend()``: the same id *and* event time keep them deduplicated downstream
    (recording the id again with a new timestamp may count it twice).
    """

    def __init__(
        self, event_ids: Sequence[str], reason: str, events: Sequence[UndeliveredEvent] = ()
    ) -> None:
        self.event_ids = tuple(event_ids)
        self.events = tuple(events)
        self.reason = reason
        shown = ", ".join(self.event_ids[:5]) + (" ..." if len(self.event_ids) > 5 else "")
        super().__init__(
            f"{len(self.event_ids)} event(s) were not delivered to Kafka ({reason}): {shown}; "
            "pass exc.events to UsageClient.resend() once the broker is back"
        )


class StripeRejectedError(MeterstreamError):
    """Stripe refused a meter event with a 4xx that must not be retried."""


class ReplayError(MeterstreamError):
    """Kafka did not acknowledge every dead letter sent back; the replay can be run again."""
