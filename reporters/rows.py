"""Turning a due window into its ledger row: the value (with carry), timestamp and status.

Decided in one transaction with the read of the running totals, so the row and the totals it
was computed from cannot drift apart. One reporter process writes a (customer, meter) at a
time; the unique (customer, meter, sequence) index refuses a second writer instead of letting
it double-count.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine

from meterstream.meters import Meter
from reporters import carry
from reporters.ledger import (
    LedgerRow,
    Status,
    identifier_for,
    insert_row,
    latest_row,
    window_total,
)
from reporters.scheduler import DueWindow

TOO_OLD_CODE = "timestamp_too_old"
HELD_NO_CUSTOMER_LINK = "no_customer_link"
HELD_NEGATIVE_CORRECTION = "negative_correction"


@dataclass(frozen=True, slots=True)
class Held:
    """A due window not sent, and why; it stays due, so it is looked at again every cycle."""

    window: DueWindow
    reason: str
    value: int = 0


def event_timestamp(window: DueWindow, now: datetime) -> datetime:
    """The window's newest event time, kept inside the window and never after ``now``;
    whole seconds (Stripe's unit)."""
    newest = window.last_event_time or window.window_start
    inside = min(max(newest, window.window_start), window.window_end - timedelta(seconds=1))
    return min(inside, now).replace(microsecond=0)


def write_row(
    engine: Engine,
    window: DueWindow,
    meter: Meter,
    event_name: str,
    stripe_customer_id: str,
    now: datetime,
    horizon_days: int,
) -> LedgerRow | Held | None:
    """Write (and commit) the ledger row for ``window``'s newest revision.

    Returns the row (status pending, carried or rejected), Held for a negative correction the
    meter does not allow, or None if another writer already reported this revision.
    """
    with engine.begin() as connection:
        latest = latest_row(connection, window.customer_id, window.meter)
        account = (
            carry.Account(latest.accounted_total, latest.units_total)
            if latest is not None
            else carry.Account()
        )
        reported_revision, previous_total = window_total(
            connection, window.customer_id, window.meter, window.window_start
        )
        if reported_revision >= window.revision:
            return None
        report = carry.report(
            meter.stripe_formula, account, previous_total, window.total, meter.unit_scale
        )
        if meter.stripe_formula == "sum" and report.value < 0 and not meter.allow_negative:
            # Sending it would invent a credit the catalogue forbids; dropping it would lose
            # it. Hold it: the window stays due until its total rises again or a person acts.
            return Held(window, HELD_NEGATIVE_CORRECTION, report.value)
        timestamp = event_timestamp(window, now)
        status: Status = "pending"
        error_code = last_error = None
        if meter.stripe_formula == "sum" and report.value == 0:
            status = "carried"
        elif timestamp < now - timedelta(days=horizon_days):
            status, error_code = "rejected", TOO_OLD_CODE
            last_error = (
                f"too old for Stripe: the window [{window.window_start.isoformat()}, "
                f"{window.window_end.isoformat()}) has its newest event at "
                f"{timestamp.isoformat()}, more than {horizon_days} days ago "
                "(METERSTREAM_HORIZON_DAYS); Stripe refuses it, so bill these "
                f"{report.value} units by hand (invoice item or credit note)"
            )
        row = LedgerRow(
            customer_id=window.customer_id,
            meter=window.meter,
            window_start=window.window_start,
            window_end=window.window_end,
            revision=window.revision,
            sequence=(latest.sequence + 1) if latest is not None else 1,
            total=window.total,
            accounted_total=report.account.accounted_total,
            units_total=report.account.units_total,
            value=report.value,
            event_name=event_name,
            stripe_customer_id=stripe_customer_id,
            timestamp=timestamp,
            identifier=identifier_for(
                window.customer_id,
                window.meter,
                window.window_start,
                window.window_end,
                window.revision,
            ),
            status=status,
            attempts=0,
            error_code=error_code,
            last_error=last_error,
            stripe_request_id=None,
            created_at=now,
            updated_at=now,
            sent_at=None,
        )
        insert_row(connection, row)
        return row
