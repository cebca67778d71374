"""The errors meterstream raises, all under one base so a caller can catch the family.

MeterstreamError
 +-- ConfigError               a setting or the meter catalogue is wrong; fix it and restart
 |    +-- CatalogueError       names the meter, the key and the reason
 |    +-- MeterCheckError      Stripe's meters do not fit the catalogue; lists every problem
 |    +-- CatalogueChangedError a meter with stored totals was removed or redefined
 |    +-- ApiKeyError          an api-keys command was given a bad name, source or scope
 +-- InvalidEventError         a usage event broke a rule; names the field and the reason
 |    +-- HeaderError          a Kafka message's headers break the CloudEvents binding
 |    +-- MissingDimensionError a meter's dimension has no value and no default
 +-- InvalidQueryError         a read of the totals (meterstream totals, GET /v1/usage) asked
 |                             what they cannot answer exactly; names the parameter and the
 |                             reason
 +-- BrokerUnavailableError    no Kafka broker answered at the configured bootstrap
 +-- BackpressureError         the producer queue stayed full past the configured wait
 +-- KafkaNotAcknowledgedError Kafka did not acknowledge every event of an HTTP request in
 |                             time (the answer is 503); a retry of the request is deduplicated
 +-- KeysUnavailableError      the database did not answer when the HTTP API needed its keys
 |                             (the answer is 503 with Retry-After)
 +-- DeliveryError             events accepted by the SDK that Kafka refused for good
 +-- ClientClosedError         record() on a UsageClient after close(); make a new client
 +-- ReplayError               dead letters Kafka did not take back; replaying again is safe
 +-- BatchError                an aggregator batch was not applied; the worker sends it again
 |    +-- OutOfOrderError      it reached the applying child before its predecessor committed
 |    +-- BatchFailedError     the child could not apply it; nothing of it was kept
 +-- StripeCallError           a call to Stripe failed for a reason no row is to blame for
 |    +-- StripeAuthError      Stripe refused the API key (401/403); fix the key
 |    +-- StoppedError         a stop was requested before the call (nothing was sent), or
 |                             while a call made backed off a 429 (``after_a_call``)
 +-- WebhookError              a Stripe webhook was not taken: answered 400, nothing stored
 |    +-- WebhookSignatureError  its Stripe-Signature matches no configured secret, or is stale
 +-- LedgerError               the ledger refused a write that would break its rules
      +-- AcknowledgementMismatchError  an acknowledgement touched other rows than it found
      |                        pending; rolled back, the rows stay pending
      +-- RestoredLedgerError  the ledger has fewer rows than its mark in Kafka: the database
                               was restored; nothing is sent until a person accepts it

The reporter's answers from Stripe are otherwise no exceptions: a row's fate (acknowledged,
rejected, retry) is an ``Outcome`` recorded in the ledger. Errors of the stripe SDK itself
(``stripe.StripeError``) are not in this tree; the reporter turns them into Outcomes, or into
StripeAuthError for a refused key.
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


class ApiKeyError(ConfigError):
    """An ``api-keys`` command was given a bad name, source or scope, or a name taken."""


class InvalidEventError(MeterstreamError):
    """A usage event broke a rule. Nothing of it was sent; ``field`` and ``reason`` say why."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class HeaderError(InvalidEventError):
    """A Kafka message's headers break the CloudEvents Kafka binding (both content modes at
    once, a header twice, a header value absent or not UTF-8, data whose type is not JSON);
    ``field`` names the header (meterstream/content_modes.py)."""


class MissingDimensionError(InvalidEventError):
    """An event of a meter with dimensions lacks one of them, and the meter has no default for
    it; ``field`` is ``properties.<dimension>``."""


class InvalidQueryError(MeterstreamError):
    """A read of the stored totals (``meterstream totals``, the usage API) asked for something
    they cannot answer exactly (an unknown meter or dimension, a range too wide or off the
    window boundaries, a merge that cannot be exact); ``parameter`` names the parameter at
    fault and ``reason`` says why and what to ask instead."""

    def __init__(self, parameter: str, reason: str) -> None:
        self.parameter = parameter
        self.reason = reason
        super().__init__(f"{parameter}: {reason}")


class BrokerUnavailableError(MeterstreamError):
    """No Kafka broker answered at the configured bootstrap."""


class BackpressureError(MeterstreamError):
    """The producer's queue stayed full for longer than the configured wait; the event was not
    accepted, so the caller still owns it and may retry."""


class KafkaNotAcknowledgedError(MeterstreamError):
    """Kafka did not acknowledge every event of an HTTP request within
    ``METERSTREAM_HTTP_PRODUCE_TIMEOUT_S`` (or refused one, or the queue was full). The request
    is answered 503 with Retry-After; events of it that did reach Kafka are counted once when
    the producer sends the request again, since the workers deduplicate by event."""


class KeysUnavailableError(MeterstreamError):
    """The HTTP API had to read its API keys and the database did not answer. The request is
    answered 503 with Retry-After: nothing was taken, the client sends it again."""


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


class ClientClosedError(MeterstreamError):
    """``record()`` was called on a closed ``UsageClient``; nothing was queued."""


class MeterCheckError(ConfigError):
    """Stripe's meters do not fit the catalogue; the message lists every problem."""


class StripeCallError(MeterstreamError):
    """A call to Stripe failed, or was not made, for a reason no ledger row is to blame for."""


class StripeAuthError(StripeCallError):
    """Stripe refused the API key itself (401/403): no row is at fault; fix the key."""


class StoppedError(StripeCallError):
    """A stop was requested while waiting to call Stripe. Nothing was sent, unless
    ``after_a_call``: the stop came while a call made backed off a 429, and an earlier try of
    it (the SDK retries a lost answer or a 5xx) may have reached Stripe, so its rows keep
    their stamps."""

    def __init__(self, message: str, *, after_a_call: bool = False) -> None:
        super().__init__(message)
        self.after_a_call = after_a_call


class LedgerError(MeterstreamError):
    """The ledger refused a write that would break its rules; nothing of it was written."""


class AcknowledgementMismatchError(LedgerError):
    """mark_all_acknowledged updated another number of rows than it found pending."""


class ReplayError(MeterstreamError):
    """Kafka did not acknowledge every dead letter sent back; the replay can be run again."""


class BatchError(MeterstreamError):
    """An aggregator batch was not applied (nothing of it was kept); the worker sends it again."""


class OutOfOrderError(BatchError):
    """A batch reached the child before its predecessor committed; send it again after it."""

    def __init__(self, sequence: int, expected: int) -> None:
        super().__init__(f"batch {sequence} arrived before batch {expected} was applied")
        self.sequence = sequence
        self.expected = expected

    def __reduce__(self) -> tuple[type[OutOfOrderError], tuple[int, int]]:
        # It travels back from the child pickled; the default would call __init__(message).
        return (OutOfOrderError, (self.sequence, self.expected))


class BatchFailedError(BatchError):
    """The child could not apply a batch (nothing of it was kept); the worker retries it."""


class RestoredLedgerError(LedgerError):
    """The ledger is behind the high-water mark kept outside the database (a restore).

    ``ledger_rows`` and ``mark_rows`` say how far; the message says what to do.
    """

    def __init__(self, deployment_id: str, ledger_rows: int, mark_rows: int) -> None:
        self.deployment_id = deployment_id
        self.ledger_rows = ledger_rows
        self.mark_rows = mark_rows
        super().__init__(
            f"deployment {deployment_id}: the ledger has {ledger_rows} row(s) but the reporter "
            f"had already written {mark_rows} (the mark in Kafka): the database was restored "
            "from an older copy, and Stripe may hold usage this ledger does not know. Sending "
            "is held. Run meterstream reconcile to see, per customer and meter, what Stripe "
            "already has; correct what it lists; then meterstream report --accept-restore"
        )


class WebhookError(MeterstreamError):
    """A request to the Stripe webhook route was refused (400) and nothing of it was stored.

    ``reason`` says why without quoting the body, the header or any secret.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class WebhookSignatureError(WebhookError):
    """The body's Stripe-Signature matches none of METERSTREAM_STRIPE_WEBHOOK_SECRET's secrets,
    or its timestamp is older than the 300 s tolerance. Check that the endpoint's signing
    secret in the Stripe Dashboard is among them (both, while one is rolled) and that this
    host's clock is right."""
