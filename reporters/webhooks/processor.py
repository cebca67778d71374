"""Act on the stored Stripe events, from the table, one transaction per event.

Each due event is read back from ``stripe_webhook_events``; what needs Stripe (a thin
event's full body and its meter, through the SDK) is fetched first, then the event is claimed
and its effects written in one transaction, so they are committed once whatever crashes, and a
duplicate or a second process changes nothing. Any failure of one event is logged, counted and
kept on the event (retried with backoff, shown by ``meterstream status``); it never stops the
others.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe
from sqlalchemy import Connection, Engine

from meterstream.errors import ConfigError
from meterstream.metrics import WebhookMetrics
from reporters.webhooks import alerts, inbox, meter_errors, payments, retention
from reporters.webhooks.inbox import StoredEvent

_log = logging.getLogger(__name__)
IDLE_WAIT_S = 1.0  # how often due retries are looked for when nothing new arrives
PRUNE_EVERY = timedelta(hours=1)
ERROR_REPORT = "v1.billing.meter.error_report_triggered"
NO_METER_FOUND = "v1.billing.meter.no_meter_found"
# Stripe's API is unreachable, failing or throttling: every fetch would fail the same way.
STRIPE_UNAVAILABLE = (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError)
_INVOICE_TYPES = (
    "invoice.payment_failed",
    "invoice.payment_action_required",
    "invoice.paid",
    "invoice.marked_uncollectible",
    "invoice.voided",
)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Effects:
    """What applying one event did, for the metrics once it is committed."""

    outcome: str = "applied"
    meter_errors: list[meter_errors.Applied] = field(default_factory=list)
    failure_code: str | None = None
    alert_id: str | None = None


Apply = Callable[[Connection, datetime], _Effects]


class WebhookProcessor:
    """Processes due events on ``run_once()``; ``run()`` loops until ``stop`` is set,
    woken early by ``wake()`` (the route calls it after storing an event)."""

    def __init__(
        self,
        engine: Engine,
        client: stripe.StripeClient,
        metrics: WebhookMetrics,
        clock: Callable[[], datetime] = _utcnow,
        *,
        can_fetch: bool = True,
        prune_batch_rows: int = 1_000,
        retention_days: retention.WebhookRetention | None = None,
    ) -> None:
        self.engine = engine
        self.can_fetch = can_fetch  # False: no API key, so thin events wait (failing, shown)
        self.client = client
        self.metrics = metrics
        self.clock = clock
        self._wake = threading.Event()
        self._currencies: set[str] = set()
        self.prune_batch_rows = prune_batch_rows
        self.retention_days = retention_days or retention.WebhookRetention()
        self._pruned_at: datetime | None = None

    def wake(self) -> None:
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:
                # The loop's edge: the database may be away; the events wait in the table.
                _log.exception("processing Stripe webhook events failed; retrying")
            self._wake.wait(IDLE_WAIT_S)
            self._wake.clear()

    def run_once(self, limit: int = 100) -> int:
        """Process up to ``limit`` due events of each kind; the number processed (applied,
        stale or ignored), failures apart. Then refresh the gauges.

        Snapshot events (payments, alerts) need no call to Stripe and go first: they never
        wait behind thin ones, each a fetch that may hang for the client's timeout while
        Stripe is unwell. The first thin event that finds Stripe unavailable ends the pass's
        thin events (one failed call per pass, not one per event); the rest wait, due."""
        done = 0
        for event in inbox.due(self.engine, self.clock(), limit, "snapshot"):
            done += self._process(event)[0]
        for event in inbox.due(self.engine, self.clock(), limit, "thin"):
            processed, error = self._process(event)
            done += processed
            if isinstance(error, STRIPE_UNAVAILABLE):
                break
        self.refresh_gauges()
        self._prune_now_and_then()
        return done

    def _prune_now_and_then(self) -> None:
        now = self.clock()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = now
        pruned = retention.prune(
            self.engine,
            now,
            self.prune_batch_rows,
            self.retention_days,
        )
        for table, rows in pruned.items():
            if rows:
                self.metrics.pruned_rows.labels(table=table).inc(rows)
                _log.info("pruned %d row(s) of %s past retention", rows, table)

    def refresh_gauges(self) -> None:
        counts = inbox.counts(self.engine)
        self.metrics.pending.set(counts.pending)
        self.metrics.failing.set(counts.failing)
        oldest = counts.oldest_pending_at
        age_s = (self.clock() - oldest).total_seconds() if oldest is not None else 0.0
        self.metrics.oldest_pending.set(max(age_s, 0.0))
        with self.engine.connect() as connection:
            count, amounts = payments.at_risk(connection)
        self.metrics.open_failures.set(count)
        # A currency whose last failure closed reads 0, not its last amount.
        for currency in self._currencies | amounts.keys():
            self.metrics.amount_at_risk.labels(currency=currency).set(amounts.get(currency, 0))
        self._currencies |= amounts.keys()

    def _process(self, event: StoredEvent) -> tuple[int, Exception | None]:
        """(1 if the event was processed here, else 0; the error its action failed with)."""
        try:
            apply = self._prepare(event)
            now = self.clock()
            with self.engine.begin() as connection:
                # Claim first: a second process waits on the event's row lock, then finds it
                # taken and applies nothing.
                if not inbox.claim(connection, event.event_id, now):
                    return 0, None
                effects = apply(connection, now) if apply else _Effects("ignored")
                inbox.set_outcome(connection, event.event_id, effects.outcome)
        except Exception as exc:
            attempts = inbox.record_failure(
                self.engine, event.event_id, _describe(exc), self.clock()
            )
            self.metrics.events.labels(type=event.type, outcome="failed").inc()
            _log.warning(
                "Stripe event %s (%s): action failed (attempt %d), retried later: %s",
                event.event_id,
                event.type,
                attempts,
                _describe(exc),
            )
            return 0, exc
        self._count(event, effects)
        return 1, None

    def _count(self, event: StoredEvent, effects: _Effects) -> None:
        self.metrics.events.labels(type=event.type, outcome=effects.outcome).inc()
        for applied in effects.meter_errors:
            self.metrics.meter_errors.labels(event_name=applied.event_name, code=applied.code).inc(
                applied.errors
            )
            self.metrics.rows_rejected.labels(code=applied.code).inc(applied.rows_rejected)
            _log.warning(
                "Stripe refused %d meter event(s) of %s after accepting them: %s "
                "(%d ledger row(s) now rejected, the rest for reconcile to find)",
                applied.errors,
                applied.event_name,
                applied.code,
                applied.rows_rejected,
            )
        if effects.failure_code is not None:
            self.metrics.payment_failures.labels(code=effects.failure_code).inc()
        if effects.alert_id is not None:
            self.metrics.billing_alerts.inc()

    def _prepare(self, event: StoredEvent) -> Apply | None:
        """How to apply ``event`` (None: nothing acts on its type), with what it needs from
        Stripe fetched now, outside the transaction."""
        if event.type in (ERROR_REPORT, NO_METER_FOUND):
            return self._prepare_error_report(event)
        if event.payload_kind != "snapshot":
            return None
        obj = self.client.construct_event_without_verification(event.body).data.object
        body: dict[str, Any] = obj.to_dict()
        if event.type in _INVOICE_TYPES:
            return self._payment(event, payments.invoice_facts(event.type, body))
        if event.type == "customer.subscription.updated":
            facts = payments.subscription_facts(body)
            return self._payment(event, facts) if facts else None
        if event.type == "billing.alert.triggered":
            alert = alerts.triggered_alert(body)

            def count(connection: Connection, now: datetime) -> _Effects:
                alerts.count_alert(connection, alert, now)
                return _Effects(alert_id=alert.alert_id)

            return count
        return None

    def _payment(self, event: StoredEvent, facts: payments.InvoiceFacts) -> Apply:
        def apply(connection: Connection, now: datetime) -> _Effects:
            outcome = payments.apply(connection, facts, event.event_id, event.created, now)
            failed = outcome == "applied" and facts.reason in payments.FAILED.values()
            return _Effects(outcome, failure_code=facts.failure_code if failed else None)

        return apply

    def _prepare_error_report(self, event: StoredEvent) -> Apply:
        if not self.can_fetch:
            raise ConfigError(
                "METERSTREAM_STRIPE_API_KEY is not set: a thin event is fetched in full through "
                "Stripe's API; set it and restart, the event is retried"
            )
        notification: Any = self.client.parse_event_notification_without_verification(event.body)
        full = notification.fetch_event()
        event_name = meter_id = None
        if event.type == ERROR_REPORT:
            meter = notification.fetch_related_object()
            event_name, meter_id = str(meter.event_name), str(meter.id)
        data = full.data.to_dict()
        report = meter_errors.read_report(data, event_name, meter_id)

        def apply(connection: Connection, now: datetime) -> _Effects:
            return _Effects(meter_errors=meter_errors.apply_report(connection, report, now))

        return apply


def _describe(exc: BaseException) -> str:
    """The error for the log and the table: its class and message (Stripe's SDK errors carry
    no key; our database URLs are never in messages of ours)."""
    return f"{type(exc).__name__}: {exc}"[:2000]
