"""Turning a due window into its ledger row: the value (with carry), timestamp and status.

Decided in one transaction with the read of the running totals, so the row and the totals it
was computed from cannot drift apart. One reporter process writes a (customer, meter) at a
time; the unique (customer, meter, sequence) index refuses a second writer instead of letting
it double-count.

A meter with dimensions has a window per combination of dimension values: the rows of all
combinations of a (customer, meter) share its sequence (the order its calls go out in), but
each combination has its own running totals (the newest row of that combination), so Stripe's
total per combination is the floor of that combination's exact total.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import Engine

from meterstream.horizon import CALL_MARGIN, oldest_sendable
from meterstream.meters import Meter
from reporters import carry
from reporters.due import DueWindow, settle
from reporters.ledger import (
    CombinationKey,
    KeyHead,
    LedgerRow,
    Status,
    WindowHead,
    combination_heads,
    identifier_for,
    insert_row,
    insert_rows,
    key_heads,
    latest_row,
    latest_window_row,
    reported_window_value,
    window_heads,
)

TOO_OLD_CODE = "timestamp_too_old"
HELD_NO_CUSTOMER_LINK = "no_customer_link"
HELD_NEGATIVE_CORRECTION = "negative_correction"
HELD_NO_LATER_TIMESTAMP = "no_later_timestamp"
HELD_REVISION_WENT_BACK = "revision_went_back"
# The reporter's side of the one horizon rule (meterstream/horizon.py): it sends anything
# newer than the horizon less CALL_MARGIN, and checks again before every call (a row can wait
# while Stripe is down). Intake keeps the larger HORIZON_MARGIN, so what it accepted is sendable.
SEND_MARGIN = CALL_MARGIN

# Failures that belong to one (customer, meter): the key is held (its later windows too, this
# cycle) and every other key is sent as usual. They need a person: the catalogue or the data.
HELD_METER_NOT_IN_CATALOGUE = "meter_not_in_catalogue"
HELD_VALUE_OUT_OF_RANGE = "value_out_of_range"
HELD_VALUE_NOT_EXACT = "value_not_exact"
HELD_CALL_FAILED = "call_failed"
KEY_FAILURES = frozenset(
    {HELD_METER_NOT_IN_CATALOGUE, HELD_VALUE_OUT_OF_RANGE, HELD_VALUE_NOT_EXACT, HELD_CALL_FAILED}
)
# The ledger's value and units_total are BIGINT (and Stripe's own integers are 64-bit).
_INT64 = range(-(2**63), 2**63)
_ONE_SECOND = timedelta(seconds=1)
_NOTHING_ACCOUNTED = carry.Account()  # frozen: one shared instance is safe
_ZERO = Decimal(0)


def send_limit(now: datetime, horizon_days: int) -> datetime:
    """The oldest timestamp the reporter still sends at ``now``."""
    return oldest_sendable(now, horizon_days)


def too_old_reason(
    window_start: datetime, window_end: datetime, timestamp: datetime, value: int, horizon_days: int
) -> str:
    return (
        f"too old for Stripe: the window [{window_start.isoformat()}, "
        f"{window_end.isoformat()}) has its event timestamp {timestamp.isoformat()}, within "
        f"{CALL_MARGIN.total_seconds() / 3600:g} h of the {horizon_days}-day limit "
        "(METERSTREAM_HORIZON_DAYS) or past it (the pipeline or Stripe was down longer than "
        "the intake margin); Stripe would refuse or drop it, so bill these "
        f"{value} units by hand (invoice item or credit note)"
    )


@dataclass(frozen=True, slots=True)
class Held:
    """A due window not sent, and why; it stays due, so it is looked at again every cycle."""

    window: DueWindow
    reason: str
    value: int = 0
    detail: str = ""


def event_timestamp(
    window: DueWindow, now: datetime, after: datetime | None = None
) -> datetime | None:
    """The window's newest event time, kept inside the window and never after ``now``;
    whole seconds (Stripe's unit).

    ``after``: the timestamp of this window's previous revision, for a ``last`` meter. Stripe
    keeps the event with the newest timestamp and does not say how it orders equal ones, so a
    revision must be at least a second later; None if that cannot fit in the window. A
    revision in the same second as the one before (stamped at ``now``'s second) takes the next
    second, at most one second past ``now``, well inside the 5 minutes Stripe allows: waiting
    for the clock instead would hold the window, set aside for the hourly re-check, for a
    reason gone a second later.
    """
    newest = window.last_event_time or window.window_start
    ceiling = now
    if after is not None:
        newest = max(newest, after + _ONE_SECOND)
        ceiling = max(now, min(after + _ONE_SECOND, now + _ONE_SECOND))
    last_second = min(window.window_end - _ONE_SECOND, ceiling).replace(microsecond=0)
    stamp = min(max(newest, window.window_start), last_second).replace(microsecond=0)
    if after is not None and stamp <= after:
        return None
    return stamp


def write_row(
    engine: Engine,
    window: DueWindow,
    meter: Meter,
    event_name: str,
    stripe_customer_id: str,
    now: datetime,
    horizon_days: int,
    deployment_id: str,
    stamped: bool = False,
) -> LedgerRow | Held | None:
    """Write (and commit) the ledger row for ``window``'s newest revision.

    Returns the row (status pending, carried or rejected), Held for a negative correction the
    meter does not allow, or None if another writer already reported this revision.
    ``stamped``: a pending row is written with its first attempt stamped (decide_row).
    """
    digest = window.combination_digest
    with engine.begin() as connection:
        latest = latest_row(connection, window.customer_id, window.meter)
        account = latest
        if digest:
            account = latest_row(connection, window.customer_id, window.meter, digest)
        reported_revision, previous_total = reported_window_value(
            connection, window.customer_id, window.meter, window.window_start, digest
        )
        previous = None
        if meter.stripe_formula == "last":
            previous = latest_window_row(
                connection, window.customer_id, window.meter, window.window_start, digest
            )
        head = None
        if reported_revision:
            head = WindowHead(
                reported_revision, previous_total, previous.timestamp if previous else now
            )
        job = RowJob(window, meter, event_name, stripe_customer_id, deployment_id)
        row = decide_row(job, latest, head, now, horizon_days, account, stamped)
        if isinstance(row, LedgerRow):
            insert_row(connection, row)
        if not isinstance(row, Held):
            settle(connection, [window])  # the ledger has its revision: off the queue
        return row


@dataclass(frozen=True, slots=True)
class RowJob:
    """A due window to write, with what its row needs besides the ledger."""

    window: DueWindow
    meter: Meter
    event_name: str
    stripe_customer_id: str
    deployment_id: str  # part of the row's identifier (meterstream/deployment.py)


def write_rows(
    engine: Engine,
    jobs: Sequence[RowJob],
    now: datetime,
    horizon_days: int,
    stamped: bool = False,
) -> list[LedgerRow | Held | None]:
    """write_row for many windows in one transaction (a few bulk statements), in order: the
    windows of one (customer, meter) must come oldest first, as due_windows gives them.
    ``stamped``: pending rows are written with their first attempt stamped (decide_row).

    Raises IntegrityError (nothing written) if another writer got to one of them first.
    """
    keys = [(j.window.customer_id, j.window.meter) for j in jobs]
    combinations: list[CombinationKey] = [
        (*key, j.window.combination_digest) for key, j in zip(keys, jobs, strict=True)
    ]
    starts = [
        (*key, j.window.window_start, j.window.combination_digest)
        for key, j in zip(keys, jobs, strict=True)
    ]
    results: list[LedgerRow | Held | None] = []
    failed: dict[tuple[str, str], Held] = {}
    with engine.begin() as connection:
        latest = key_heads(connection, set(keys))
        # A meter without dimensions has one combination (''): its pair's newest row is the
        # combination's, so only meters with dimensions cost this second read.
        accounts = combination_heads(connection, {c for c in combinations if c[2]})
        heads = window_heads(connection, set(starts))
        for job, key, combination, start in zip(jobs, keys, combinations, starts, strict=True):
            if key in failed:  # the key is held: its later windows wait with it
                results.append(Held(job.window, failed[key].reason, 0, failed[key].detail))
                continue
            account = accounts.get(combination) if combination[2] else latest.get(key)
            row = decide_row(
                job, latest.get(key), heads.get(start), now, horizon_days, account, stamped
            )
            if isinstance(row, Held) and row.reason in KEY_FAILURES:
                failed[key] = row
            if isinstance(row, LedgerRow):
                latest[key] = KeyHead(row.sequence, row.accounted_total, row.units_total)
                accounts[combination] = latest[key]
                heads[start] = WindowHead(row.revision, row.window_value, row.timestamp)
            results.append(row)
        # In the transaction of the rows: a window leaves the queue with its row committed.
        # Held windows stay queued. Before the insert, whose written-rows counter (a row per
        # connection's slot, which another writer may share) is then held only until the commit.
        settle(
            connection,
            [j.window for j, r in zip(jobs, results, strict=True) if not isinstance(r, Held)],
        )
        insert_rows(connection, (r for r in results if isinstance(r, LedgerRow)))
    return results


def decide_row(
    job: RowJob,
    latest: KeyHead | LedgerRow | None,
    head: WindowHead | None,
    now: datetime,
    horizon_days: int,
    combination_latest: KeyHead | LedgerRow | None,
    stamped: bool = False,
) -> LedgerRow | Held | None:
    """The row for ``job`` (not written), given the newest row of its (customer, meter) (the
    sequence), of its combination (the running totals; the same row without dimensions) and
    of its window; Held or None as write_row says.

    ``stamped``: a pending row comes with its first attempt stamped at ``now`` (the v2
    stream's rows, called within seconds: the stamp costs no write of its own; the stream
    takes it back from those it does not call)."""
    window, meter = job.window, job.meter
    formula = meter.stripe_formula
    account = (
        carry.Account(combination_latest.accounted_total, combination_latest.units_total)
        if combination_latest is not None
        else _NOTHING_ACCOUNTED
    )
    reported_revision, previous_total = (head.revision, head.window_value) if head else (0, _ZERO)
    if reported_revision == window.revision:
        return None
    if reported_revision > window.revision:
        # The aggregators' revision went backwards (table rebuilt?): the ledger's running
        # totals no longer describe window_totals. A person must look.
        return Held(window, HELD_REVISION_WENT_BACK)
    try:
        report = carry.report(
            formula, account, previous_total, window.window_value, meter.unit_scale
        )
    except ArithmeticError:
        # More digits than carry's exact context holds (a long unit_scale times a long total):
        # a rounded number must never be billed.
        return Held(
            window,
            HELD_VALUE_NOT_EXACT,
            detail=f"{window.window_value} x unit_scale {meter.unit_scale} cannot be computed "
            "exactly; check the usage (a unit_scale of a meter already billed cannot change: bill "
            "a new scale on a new meter)",
        )
    if report.value not in _INT64 or report.account.units_total not in _INT64:
        return Held(
            window,
            HELD_VALUE_OUT_OF_RANGE,
            detail=f"{report.value} units ({window.window_value} x unit_scale "
            f"{meter.unit_scale}; {report.account.units_total} in all) pass the 64-bit integers "
            "Stripe and the ledger hold; check the usage (a unit_scale of a meter already billed "
            "cannot change: bill a new scale on a new meter)",
        )
    if formula == "sum" and report.value < 0 and not meter.allow_negative:
        # Sending it would invent a credit the catalogue forbids; dropping it would lose
        # it. Hold it: the window stays due until its total rises again or a person acts.
        return Held(window, HELD_NEGATIVE_CORRECTION, report.value)
    previous = head.timestamp if head is not None and formula == "last" else None
    timestamp = event_timestamp(window, now, previous)
    if timestamp is None:
        return Held(window, HELD_NO_LATER_TIMESTAMP, report.value)
    status: Status = "pending"
    error_code = last_error = None
    if formula == "sum" and report.value == 0:
        status = "carried"
    elif timestamp < send_limit(now, horizon_days):
        status, error_code = "rejected", TOO_OLD_CODE
        last_error = too_old_reason(
            window.window_start, window.window_end, timestamp, report.value, horizon_days
        )
    return LedgerRow(
        customer_id=window.customer_id,
        meter=window.meter,
        window_start=window.window_start,
        window_end=window.window_end,
        revision=window.revision,
        sequence=(latest.sequence + 1) if latest is not None else 1,
        window_value=window.window_value,
        accounted_total=report.account.accounted_total,
        units_total=report.account.units_total,
        value=report.value,
        event_name=job.event_name,
        stripe_customer_id=job.stripe_customer_id,
        timestamp=timestamp,
        identifier=identifier_for(
            window.customer_id,
            window.meter,
            window.window_start,
            window.window_end,
            window.revision,
            deployment_id=job.deployment_id,
            combination=window.combination,
        ),
        status=status,
        attempts=1 if stamped and status == "pending" else 0,
        first_attempt_at=now if stamped and status == "pending" else None,
        error_code=error_code,
        last_error=last_error,
        stripe_request_id=None,
        created_at=now,
        updated_at=now,
        sent_at=None,
        unit_scale=meter.unit_scale,
        combination=window.combination,
        combination_digest=window.combination_digest,
    )
