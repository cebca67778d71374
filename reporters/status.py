"""Facts about the reporter for people: ``meterstream status`` and the billing-lag metric.

:func:`reporter_status` returns plain data, so other stages' status can be printed alongside.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, func, or_, select

from meterstream.meters import Catalogue
from meterstream.schema import ledger, window_totals
from reporters import carry
from reporters.customers import load_links, stripe_customer_for
from reporters.due import count_due_windows, due_windows
from reporters.held_keys import load_held_keys
from reporters.ledger import (
    ACKNOWLEDGED,
    FINAL,
    counts_by_status,
    last_sent_at,
    latest_row,
    recent_rejections,
    reported_window_value,
    rows_with_status,
)
from reporters.rows import (
    HELD_NEGATIVE_CORRECTION,
    HELD_NO_CUSTOMER_LINK,
    HELD_REVISION_WENT_BACK,
)

# Stripe bills a period's usage when the period ends (plus about an hour of grace): an event
# sent more than a day after its timestamp may belong to a period already invoiced.
LATE_AFTER = timedelta(days=1)


def billing_lag_s(engine: Engine, catalogue: Catalogue, now: datetime) -> float:
    """Seconds since the oldest closed window (window_end + grace_s <= now) whose newest
    revision is not final in the ledger (not sent, carried or rejected) ended; 0 when there is
    none. Held, pending, unknown and accepted-but-unconfirmed (v2 stream, until reconcile
    confirms it) usage all count: billing is behind on them."""
    oldest: datetime | None = None
    wt = window_totals.c
    with engine.connect() as connection:
        for meter in catalogue:
            found = connection.execute(
                select(func.min(wt.window_end))
                .select_from(
                    window_totals.outerjoin(
                        ledger,
                        and_(
                            ledger.c.customer_id == wt.customer_id,
                            ledger.c.meter == wt.meter,
                            ledger.c.window_start == wt.window_start,
                            ledger.c.revision == wt.revision,
                        ),
                    )
                )
                .where(
                    wt.meter == meter.name,
                    wt.window_end <= now - timedelta(seconds=meter.grace_s),
                    or_(ledger.c.status.is_(None), ledger.c.status.not_in(FINAL)),
                )
            ).scalar()
            # func.min takes its column's type, so this is already an aware UTC datetime.
            if found is not None and (oldest is None or found < oldest):
                oldest = found
    return 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())


def held_usage(engine: Engine, catalogue: Catalogue) -> list[dict[str, Any]]:
    """Due windows the reporter holds back: unlinked customers, forbidden negative corrections."""
    links = load_links(engine)
    held: list[dict[str, Any]] = []
    due = due_windows(engine, (m.name for m in catalogue))
    with engine.connect() as connection:
        for (customer_id, meter_name), windows in sorted(due.items()):
            meter = catalogue.meters[meter_name]
            linked = stripe_customer_for(customer_id, links) is not None
            latest = latest_row(connection, customer_id, meter_name)
            account = (
                carry.Account(latest.accounted_total, latest.units_total)
                if latest is not None
                else carry.Account()
            )
            for window in windows:
                reason = None if linked else HELD_NO_CUSTOMER_LINK
                reported, _ = reported_window_value(
                    connection, customer_id, meter_name, window.window_start
                )
                if reported > window.revision:
                    reason = HELD_REVISION_WENT_BACK
                if reason is None and meter.stripe_formula == "sum" and not meter.allow_negative:
                    _, previous = reported_window_value(
                        connection, customer_id, meter_name, window.window_start
                    )
                    value = carry.report(
                        "sum", account, previous, window.window_value, meter.unit_scale
                    )
                    if value.value < 0:
                        reason = HELD_NEGATIVE_CORRECTION
                if reason is not None:
                    held.append(
                        {
                            "customer_id": customer_id,
                            "meter": meter_name,
                            "window_start": window.window_start,
                            "revision": window.revision,
                            "total": window.window_value,
                            "reason": reason,
                        }
                    )
    return held


def reporter_status(engine: Engine, catalogue: Catalogue, now: datetime) -> dict[str, Any]:
    """The reporter's facts: ledger counts by status, the 10 newest rejections with Stripe's
    message, held usage, pending rows, due windows (changed, no ledger row yet), billing lag
    and when Stripe last acknowledged a row."""
    counts = counts_by_status(engine)
    return {
        "ledger": counts,
        "pending": counts.get("pending", 0),
        "due_windows": count_due_windows(engine, [meter.name for meter in catalogue]),
        "rejected": [
            {
                "customer_id": row.customer_id,
                "meter": row.meter,
                "window_start": row.window_start,
                "revision": row.revision,
                "value": row.value,
                "code": row.error_code,
                "message": row.last_error,
                "at": row.updated_at,
            }
            for row in recent_rejections(engine, 10)
        ],
        "held": held_usage(engine, catalogue),
        "held_keys": [
            {
                "customer_id": k.customer_id,
                "meter": k.meter,
                "reason": k.reason,
                "detail": k.detail,
                "at": k.held_at,
            }
            for k in load_held_keys(engine)
        ],
        "unknown": [
            {
                "customer_id": row.customer_id,
                "meter": row.meter,
                "window_start": row.window_start,
                "revision": row.revision,
                "value": row.value,
                "first_attempt_at": row.first_attempt_at,
            }
            for row in rows_with_status(engine, "unknown")
        ],
        "unconfirmed": counts.get("accepted", 0),
        "sent_late": sent_late(engine, catalogue),
        "billing_lag_s": billing_lag_s(engine, catalogue, now),
        "last_sent_at": last_sent_at(engine),
    }


def sent_late(engine: Engine, catalogue: Catalogue) -> int:
    """Rows Stripe acknowledged more than a day (plus the meter's grace) after their
    timestamp: their period may already be invoiced, so they may never be billed."""
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger.c.meter, ledger.c.timestamp, ledger.c.sent_at).where(
                ledger.c.status.in_(ACKNOWLEDGED), ledger.c.sent_at.is_not(None)
            )
        ).all()
    late = 0
    for meter_name, timestamp, sent_at in found:
        meter = catalogue.get(meter_name)
        grace = timedelta(seconds=meter.grace_s if meter else 0)
        late += sent_at - timestamp > LATE_AFTER + grace
    return late


def format_status(facts: dict[str, Any]) -> str:
    """The facts as lines a person reads."""
    lines = [
        "ledger: " + (", ".join(f"{k}={v}" for k, v in sorted(facts["ledger"].items())) or "empty")
    ]
    lines.append(f"pending rows: {facts['pending']}")
    lines.append(f"due windows (changed, not yet in the ledger): {facts['due_windows']:,}")
    lines.append(
        f"unconfirmed (v2 stream accepted, not yet confirmed by reconcile): {facts['unconfirmed']}"
        " (Stripe's error_report_triggered events are not consumed; run meterstream reconcile)"
    )
    lines.append(
        f"sent late: {facts['sent_late']} row(s) sent with a timestamp before the current "
        "billing period may not be invoiced (sent more than 1 day + grace after their timestamp)"
    )
    lines.append(f"unknown (not resent; run meterstream reconcile): {len(facts['unknown'])}")
    for item in facts["unknown"]:
        lines.append(
            f"  {item['customer_id']} {item['meter']} window {item['window_start'].isoformat()} "
            f"revision {item['revision']} value {item['value']}: first sent "
            f"{item['first_attempt_at'].isoformat() if item['first_attempt_at'] else '?'}"
        )
    lines.append(f"billing lag: {facts['billing_lag_s']:.0f} s")
    sent = facts["last_sent_at"]
    lines.append(f"last sent: {sent.isoformat() if sent else 'never'}")
    lines.append(f"held: {len(facts['held'])}")
    for item in facts["held"]:
        lines.append(
            f"  {item['reason']}: {item['customer_id']} {item['meter']} "
            f"window {item['window_start'].isoformat()} revision {item['revision']} "
            f"total {item['total']}"
        )
    lines.append(f"held customers and meters (a person must act): {len(facts['held_keys'])}")
    for item in facts["held_keys"]:
        lines.append(f"  {item['reason']}: {item['customer_id']} {item['meter']}: {item['detail']}")
    lines.append(f"rejected (newest {len(facts['rejected'])}):")
    for item in facts["rejected"]:
        lines.append(
            f"  {item['customer_id']} {item['meter']} window {item['window_start'].isoformat()} "
            f"revision {item['revision']} value {item['value']}: {item['code']}: {item['message']}"
        )
    return "\n".join(lines)
