"""What ``meterstream status`` and ``meterstream payments`` show of Stripe's webhooks: events
waiting or failing, meter events Stripe refused after accepting them, open payment failures.
Each read goes through an index or a table whose size is bounded (one row per meter and code,
per open failure), never the history of events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from reporters.webhooks import inbox
from reporters.webhooks.meter_errors import error_counts
from reporters.webhooks.payments import at_risk, open_failures


def webhook_status(engine: Engine, now: datetime) -> dict[str, Any]:
    """The facts: stored events pending and failing (with their errors), Stripe's meter error
    counts, open payment failures and what they owe per currency (minor units)."""
    counts = inbox.counts(engine)
    with engine.connect() as connection:
        meter_errors = error_counts(connection)
        failures, amounts = at_risk(connection)
    oldest = counts.oldest_pending_at
    return {
        "events_pending": counts.pending,
        "events_failing": [
            {"event_id": event_id, "type": type_, "attempts": attempts, "error": error}
            for event_id, type_, attempts, error in inbox.failing(engine)
        ],
        "oldest_pending_s": (now - oldest).total_seconds() if oldest else 0.0,
        "meter_errors": [
            {
                "event_name": row["event_name"],
                "code": row["code"],
                "errors": int(row["errors_total"]),
                "rows_rejected": int(row["rows_rejected"]),
                "unidentified": int(row["unidentified"]),
                "last_message": row["last_message"],
                "last_report_at": row["last_report_at"],
            }
            for row in meter_errors
        ],
        "payment_failures_open": failures,
        "amount_at_risk": amounts,
    }


def format_webhook_status(facts: dict[str, Any]) -> list[str]:
    lines = [
        f"Stripe events waiting to be acted on: {facts['events_pending']} "
        f"(oldest {facts['oldest_pending_s']:.0f} s), failing: {len(facts['events_failing'])}"
    ]
    for item in facts["events_failing"]:
        lines.append(
            f"  {item['event_id']} {item['type']}: {item['attempts']} attempt(s): {item['error']}"
        )
    lines.append("rejected by Stripe after accepting them (its error reports), by code:")
    for item in facts["meter_errors"]:
        lines.append(
            f"  {item['event_name']} {item['code']}: {item['errors']} error(s), "
            f"{item['rows_rejected']} ledger row(s) rejected, {item['unidentified']} not named "
            f"by Stripe (run meterstream reconcile): {item['last_message'] or ''}"
        )
    if not facts["meter_errors"]:
        lines.append("  none")
    owed = ", ".join(f"{amount} {currency}" for currency, amount in facts["amount_at_risk"].items())
    lines.append(
        f"open payment failures: {facts['payment_failures_open']}"
        + (f" (owed, minor units: {owed}; meterstream payments lists them)" if owed else "")
    )
    return lines


def payments_document(engine: Engine, limit: int | None = None) -> list[dict[str, Any]]:
    """The open payment failures, oldest first, for ``meterstream payments``."""
    with engine.connect() as connection:
        found = open_failures(connection, limit)
    return [
        {
            "invoice_id": f.invoice_id,
            "customer_id": f.customer_id,
            "stripe_customer_id": f.stripe_customer_id,
            "reason": f.reason,
            "failure_code": f.failure_code,
            "amount_remaining": f.amount_remaining,
            "currency": f.currency,
            "attempts": f.attempts,
            "next_payment_attempt": f.next_payment_attempt,
            "opened_at": f.opened_at,
        }
        for f in found
    ]


def format_payments(items: list[dict[str, Any]]) -> str:
    """One line per open failure; amounts in the currency's minor unit (4990 usd = $49.90)."""
    if not items:
        return "no open payment failures"
    rows = [("invoice", "customer", "owed", "cur", "attempts", "next retry", "reason (code)")]
    for item in items:
        retry = item["next_payment_attempt"]
        rows.append(
            (
                item["invoice_id"],
                item["customer_id"] or item["stripe_customer_id"],
                str(item["amount_remaining"]),
                item["currency"],
                str(item["attempts"]),
                retry.isoformat() if retry else "none",
                f"{item['reason']} ({item['failure_code'] or '-'})",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    right = {2, 4}  # numbers
    return "\n".join(
        "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row[:6])
        )
        + "  "
        + row[6]
        for row in rows
    )
