"""Verify a Stripe webhook with the stripe SDK and read what the inbox keys it by.

The signature is checked first, over the raw bytes, against each configured secret (several
while one is rolled), with Stripe's 300 s tolerance; only then is the body parsed, by the
SDK's own parsers: ``Webhook.construct_event`` for snapshot events, the StripeClient's
``parse_event_notification`` for thin (v2) ones. Nothing here quotes the body, the header or
a secret in an error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import stripe

from meterstream.errors import WebhookError, WebhookSignatureError

TOLERANCE_S = 300  # Stripe's own default: a replayed old delivery is refused
PayloadKind = Literal["snapshot", "thin"]
_MAX_ID = 255
_MAX_TYPE = 100


@dataclass(frozen=True)
class VerifiedEvent:
    """A webhook whose signature checked out: its Stripe id, type, kind and time."""

    event_id: str
    type: str
    payload_kind: PayloadKind
    created: datetime
    body: str


def verify(
    body: bytes, header: str | None, secrets: Sequence[str], client: stripe.StripeClient
) -> VerifiedEvent:
    """The verified event; raises WebhookSignatureError (no secret matched, stale, missing
    header) or WebhookError (signed, but not an event the SDK can read)."""
    secret = _matching_secret(body, header, secrets)
    try:
        text = body.decode("utf-8")
        kind = json.loads(text).get("object")
        if kind == "v2.core.event":
            notification = client.parse_event_notification(text, header, secret, TOLERANCE_S)
            event_id, type_ = str(notification.id), str(notification.type)
            created = datetime.fromisoformat(str(notification.created))
            payload_kind: PayloadKind = "thin"
        else:
            event = stripe.Webhook.construct_event(text, header, secret, TOLERANCE_S)
            event_id, type_ = str(event.id), str(event.type)
            created = datetime.fromtimestamp(int(event.created), UTC)
            payload_kind = "snapshot"
    except stripe.SignatureVerificationError as exc:
        raise WebhookSignatureError(_reason(exc)) from None
    # RecursionError: JSON nested deeper than the parser goes (a few KiB of brackets).
    except (
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        OverflowError,
        OSError,
        RecursionError,
    ) as exc:
        raise WebhookError(
            f"a signed body that is not a Stripe event ({type(exc).__name__})"
        ) from None
    if created.tzinfo is None:
        raise WebhookError("the event's created time has no UTC offset")
    if not 0 < len(event_id) <= _MAX_ID or not 0 < len(type_) <= _MAX_TYPE:
        raise WebhookError(f"event id or type out of bounds ({len(event_id)}, {len(type_)})")
    return VerifiedEvent(event_id, type_, payload_kind, created.astimezone(UTC), text)


def _matching_secret(body: bytes, header: str | None, secrets: Sequence[str]) -> str:
    if not secrets:
        raise WebhookSignatureError(
            "no signing secret configured: set METERSTREAM_STRIPE_WEBHOOK_SECRET"
        )
    first: stripe.SignatureVerificationError | None = None
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(body, header, secret, TOLERANCE_S)
            return secret
        except stripe.SignatureVerificationError as exc:
            first = first or exc
        except UnicodeDecodeError:
            raise WebhookSignatureError("the body is not UTF-8") from None
    raise WebhookSignatureError(_reason(first) if first else "Stripe-Signature refused")


def _reason(exc: stripe.SignatureVerificationError) -> str:
    """The SDK's message names the failed check; its sig_header and payload stay out."""
    message = str(exc.user_message or exc).split(". Read it", 1)[0]
    return f"Stripe-Signature refused: {message[:200]}"
