"""The events Stripe sends back to the account's webhook endpoint, made by the emulator.

- Meter error reports: the stream events the state rejected after answering 202 are
  gathered per validation window (``report_interval_s``) and sent as thin v2 events
  (``v1.billing.meter.error_report_triggered``, or ``v1.billing.meter.no_meter_found`` for
  an unknown event name). As Stripe does, a report carries a count per error code and only a
  few samples with their identifiers (``samples_per_code``); the full event is served at
  ``GET /v2/core/events/{id}``, which the SDK's ``fetch_event()`` calls.
- Invoice, subscription and billing-alert events on request (the control API), as snapshot
  events (``object: event``, the object in ``data.object``).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from stripe_emulator.records import AsyncError, JsonObject, Meter, StripeApiError, rfc3339
from stripe_emulator.state import EmulatorState
from stripe_emulator.webhooks import WebhookSender

API_VERSION = "2026-10-28.endive"
INVOICE_OUTCOMES = ("payment_failed", "payment_action_required", "paid", "marked_uncollectible")
_NEXT_ATTEMPT_S = 3 * 86_400  # Smart Retries' next try, roughly


def _event_id() -> str:
    return f"evt_test_{secrets.token_hex(12)}"


@dataclass
class _Invoice:
    id: str
    customer: str
    amount_due: int
    currency: str
    attempt_count: int = 0
    status: str = "open"


class Notifier:
    """Makes the account's events and hands them to the sender; thread-safe."""

    def __init__(
        self,
        state: EmulatorState,
        sender: WebhookSender,
        *,
        report_interval_s: float = 0.2,
        samples_per_code: int = 3,
    ) -> None:
        self.state = state
        self.sender = sender
        self.report_interval_s = report_interval_s
        self.samples_per_code = samples_per_code
        self._lock = threading.Lock()
        self._reported = 0  # async errors already reported
        self._window_start = state.now_s()
        self._invoices: dict[str, _Invoice] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="error-reports", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def reset(self) -> None:
        with self._lock:
            self._reported = 0
            self._invoices.clear()

    # -- meter error reports ----------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.report_interval_s):
            self.report_errors()

    def report_errors(self) -> int:
        """Send the reports of the async errors not yet reported; the number of reports."""
        with self._lock:
            errors = self.state.async_errors
            if len(errors) < self._reported:  # the state was reset
                self._reported = 0
            fresh = errors[self._reported :]
            self._reported = len(errors)
            start, end = self._window_start, self.state.now_s()
            self._window_start = end
        by_meter: dict[str | None, list[AsyncError]] = defaultdict(list)
        meters = {m.event_name: m for m in self.state.meters()}
        for error in fresh:
            meter = meters.get(error.event_name or "") if error.code != "no_meter" else None
            by_meter[meter.id if meter else None].append(error)
        if self.sender.endpoint is None:
            return 0  # no endpoint: Stripe has nowhere to send them, and keeps nothing to send
        for meter_id, found in by_meter.items():
            meter = self.state.meter(meter_id) if meter_id else None
            self._send_thin(self._error_report(meter, found, start, end))
        return len(by_meter)

    def _error_report(
        self, meter: Meter | None, errors: list[AsyncError], start: int, end: int
    ) -> JsonObject:
        by_code: dict[str, list[AsyncError]] = defaultdict(list)
        for error in errors:
            by_code[error.code].append(error)
        event: JsonObject = {
            "id": _event_id(),
            "object": "v2.core.event",
            "type": "v1.billing.meter.error_report_triggered"
            if meter
            else "v1.billing.meter.no_meter_found",
            "created": rfc3339(self.state.now_s()),
            "livemode": False,
            "context": None,
            "data": {
                "developer_message_summary": f"{len(errors)} meter event(s) failed validation",
                "reason": {
                    "error_count": len(errors),
                    "error_types": [
                        {
                            "code": code,
                            "error_count": len(found),
                            "sample_errors": [
                                {
                                    "error_message": e.message,
                                    "request": {"identifier": e.identifier or ""},
                                }
                                for e in found[: self.samples_per_code]
                            ],
                        }
                        for code, found in sorted(by_code.items())
                    ],
                },
                "validation_start": rfc3339(start),
                "validation_end": rfc3339(end),
            },
        }
        if meter is not None:
            event["related_object"] = {
                "id": meter.id,
                "type": "billing.meter",
                "url": f"/v1/billing/meters/{meter.id}",
            }
        return event

    def _send_thin(self, event: JsonObject) -> None:
        self.state.save_v2_event(event)
        thin = {key: value for key, value in event.items() if key != "data"}
        self.sender.send(event["id"], event["type"], json.dumps(thin).encode())

    # -- snapshot events --------------------------------------------------------------------

    def _send_snapshot(self, type: str, obj: JsonObject) -> JsonObject:
        event: JsonObject = {
            "id": _event_id(),
            "object": "event",
            "api_version": API_VERSION,
            "created": self.state.now_s(),
            "data": {"object": obj},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": type,
        }
        self.sender.send(event["id"], type, json.dumps(event).encode())
        return event

    def invoice_event(self, spec: dict[str, Any]) -> JsonObject:
        """Fail, pay, or write off an invoice of ``spec["customer"]`` and send its event.

        ``spec``: ``customer``, ``outcome`` (one of INVOICE_OUTCOMES), optional ``invoice``
        (an id: the same invoice again), ``amount_due`` (minor units), ``currency``,
        ``failure_code`` (the payment's decline code on a failure). Returns the event."""
        outcome = spec.get("outcome")
        if outcome not in INVOICE_OUTCOMES:
            raise StripeApiError(400, f"outcome must be one of {INVOICE_OUTCOMES}, got {outcome!r}")
        customer = self.state.customer(str(spec.get("customer"))).id
        with self._lock:
            invoice_id = str(spec.get("invoice") or f"in_test_{secrets.token_hex(12)}")
            invoice = self._invoices.setdefault(
                invoice_id,
                _Invoice(
                    invoice_id,
                    customer,
                    int(spec.get("amount_due", 1000)),
                    str(spec.get("currency", "usd")),
                ),
            )
            if outcome in ("payment_failed", "payment_action_required"):
                invoice.attempt_count += 1
            invoice.status = {"paid": "paid", "marked_uncollectible": "uncollectible"}.get(
                outcome, "open"
            )
            obj = self._invoice_object(invoice, outcome, spec.get("failure_code"))
        return self._send_snapshot(f"invoice.{outcome}", obj)

    def _invoice_object(self, invoice: _Invoice, outcome: str, failure_code: object) -> JsonObject:
        now = self.state.now_s()
        paid = invoice.status == "paid"
        failed = outcome in ("payment_failed", "payment_action_required")
        obj: JsonObject = {
            "id": invoice.id,
            "object": "invoice",
            "customer": invoice.customer,
            "currency": invoice.currency,
            "amount_due": invoice.amount_due,
            "amount_paid": invoice.amount_due if paid else 0,
            "amount_remaining": 0 if paid else invoice.amount_due,
            "attempt_count": invoice.attempt_count,
            "attempted": invoice.attempt_count > 0 or paid,
            "next_payment_attempt": now + _NEXT_ATTEMPT_S if failed else None,
            "status": invoice.status,
            "created": now,
            "livemode": False,
        }
        if failed:
            # Stripe puts the decline on the payment; the event carries it when the
            # invoice's payments are expanded, which an endpoint can ask for.
            code = str(failure_code or "card_declined")
            obj["payments"] = {
                "object": "list",
                "data": [
                    {
                        "object": "invoice_payment",
                        "status": "open",
                        "payment": {
                            "type": "payment_intent",
                            "payment_intent": {
                                "object": "payment_intent",
                                "last_payment_error": {"code": code, "type": "card_error"},
                            },
                        },
                    }
                ],
                "has_more": False,
            }
        return obj

    def subscription_event(self, spec: dict[str, Any]) -> JsonObject:
        """``customer.subscription.updated`` with ``spec["status"]`` (e.g. past_due, unpaid)
        and ``latest_invoice``; returns the event."""
        customer = self.state.customer(str(spec.get("customer"))).id
        obj: JsonObject = {
            "id": str(spec.get("subscription") or f"sub_test_{secrets.token_hex(12)}"),
            "object": "subscription",
            "customer": customer,
            "status": str(spec.get("status", "past_due")),
            "latest_invoice": spec.get("latest_invoice"),
            "currency": str(spec.get("currency", "usd")),
            "livemode": False,
        }
        return self._send_snapshot("customer.subscription.updated", obj)

    def billing_alert_event(self, spec: dict[str, Any]) -> JsonObject:
        """``billing.alert.triggered`` for ``spec["customer"]`` and ``spec["alert"]``."""
        customer = self.state.customer(str(spec.get("customer"))).id
        obj: JsonObject = {
            "object": "billing.alert_triggered",
            "alert": {
                "id": str(spec.get("alert") or f"alrt_test_{secrets.token_hex(12)}"),
                "object": "billing.alert",
                "alert_type": "usage_threshold",
                "title": str(spec.get("title", "usage threshold")),
            },
            "created": self.state.now_s(),
            "customer": customer,
            "livemode": False,
            "value": int(spec.get("value", 0)),
        }
        return self._send_snapshot("billing.alert.triggered", obj)
