"""Facts about the reporter for people: ``meterstream status`` and the billing-lag metric.

:func:`reporter_status` returns plain data, so other stages' status can be printed alongside.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, func, or_, select

from meterstream.horizon import STRIPE_HORIZON_DAYS
from meterstream.meters import Catalogue
from meterstream.schema import ledger, window_totals
from reporters import carry
from reporters.customers import load_links, stripe_customer_for
from reporters.due import count_due_windows, due_windows
from reporters.invoiced import INVOICE_GRACE, possibly_invoiced
from reporters.ledger import (
    FINAL,
    counts_by_status,
    last_sent_at,
    latest_row,
    recent_rejections,
    reported_window_value,
    rows_with_status,
)
from reporters.restore import restore_hold
from reporters.rows import (
    HELD_NEGATIVE_CORRECTION,
    HELD_NO_CUSTOMER_LINK,
    HELD_REVISION_WENT_BACK,
)


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


def reporter_status(
    engine: Engine, catalogue: Catalogue, now: datetime, horizon_days: int = STRIPE_HORIZON_DAYS
) -> dict[str, Any]:
    """The reporter's facts: ledger counts by status, the 10 newest rejections with Stripe's
    message, held usage, pending rows, due windows (changed, no ledger row yet), billing lag
    and when Stripe last acknowledged a row."""
    counts = counts_by_status(engine)
    hold = restore_hold(engine)
    return {
        "restore_hold": None
        if hold is None
        else {
            "held_at": hold.held_at,
            "ledger_rows": hold.ledger_rows,
            "mark_rows": hold.mark_rows,
        },
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
        "possibly_invoiced": [
            {
                "customer_id": item.customer_id,
                "stripe_customer_id": item.stripe_customer_id,
                "meter": item.meter,
                "rows": item.rows,
                "units": item.units,
                "oldest_timestamp": item.oldest,
                "newest_timestamp": item.newest,
            }
            for item in possibly_invoiced(engine, now, horizon_days)
        ],
        "billing_lag_s": billing_lag_s(engine, catalogue, now),
        "last_sent_at": last_sent_at(engine),
    }


def format_status(facts: dict[str, Any]) -> str:
    """The facts as lines a person reads."""
    lines = [
        "ledger: " + (", ".join(f"{k}={v}" for k, v in sorted(facts["ledger"].items())) or "empty")
    ]
    hold = facts.get("restore_hold")
    if hold:
        lines.insert(
            0,
            f"SENDING HELD since {hold['held_at'].isoformat()}: the ledger has "
            f"{hold['ledger_rows']} row(s), its mark in Kafka {hold['mark_rows']}: the database "
            "was restored. Run meterstream reconcile, correct what Stripe already has, then "
            "meterstream report --accept-restore",
        )
    if "deployment_id" in facts:  # the CLI adds it: the setting may override the stored id
        lines.insert(0, f"deployment id: {facts['deployment_id']} (in every new identifier)")
    lines.append(f"pending rows: {facts['pending']}")
    lines.append(f"due windows (changed, not yet in the ledger): {facts['due_windows']:,}")
    lines.append(
        f"unconfirmed (v2 stream accepted, not yet confirmed by reconcile): {facts['unconfirmed']}"
        " (Stripe's error_report_triggered events are not consumed; run meterstream reconcile)"
    )
    lines.extend(_possibly_invoiced_lines(facts["possibly_invoiced"]))
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
    lines.append(f"rejected (newest {len(facts['rejected'])}):")
    for item in facts["rejected"]:
        lines.append(
            f"  {item['customer_id']} {item['meter']} window {item['window_start'].isoformat()} "
            f"revision {item['revision']} value {item['value']}: {item['code']}: {item['message']}"
        )
    return "\n".join(lines)


def _possibly_invoiced_lines(items: list[dict[str, Any]]) -> list[str]:
    rows = sum(item["rows"] for item in items)
    units = sum(item["units"] for item in items)
    lines = [
        f"possibly invoiced without them: {rows} row(s), {units} Stripe unit(s) reached "
        f"Stripe more than {INVOICE_GRACE.total_seconds() / 3600:g} h after their timestamp "
        "(acknowledged within METERSTREAM_HORIZON_DAYS); if the invoice of the period "
        "holding a timestamp was already finalized, bill those units by hand (invoice item "
        "on the next invoice)"
    ]
    for item in items:
        lines.append(
            f"  {item['customer_id']} ({item['stripe_customer_id']}) {item['meter']}: "
            f"{item['rows']} row(s), {item['units']} unit(s), timestamps "
            f"{item['oldest_timestamp'].isoformat()} to {item['newest_timestamp'].isoformat()}"
        )
    return lines
