"""Facts about the reporter for people: ``meterstream status`` and the billing-lag metric.

:func:`reporter_status` returns plain data, so other stages' status can be printed alongside.
Every query here reads the work in hand (the report queue, rows of a status that is not final,
one key or window by index), never all of the ledger or window_totals, so status costs the
same after years of history; tests/reporters/test_report_queue.py checks their plans.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, get_args

from sqlalchemy import Engine, Select, and_, case, exists, func, literal, or_, select

from meterstream.dimensions import combination_values
from meterstream.horizon import STRIPE_HORIZON_DAYS
from meterstream.meters import Catalogue
from meterstream.schema import UTCDateTime, held_keys, ledger, report_queue, window_totals
from reporters.due import NOT_HELD, count_due_windows
from reporters.held_keys import load_held_keys
from reporters.held_windows import held_usage_summary, held_windows
from reporters.invoiced import INVOICE_GRACE, possibly_invoiced
from reporters.ledger import (
    FINAL,
    Status,
    counts_by_status,
    last_sent_at,
    recent_rejections,
    rows_with_status,
)
from reporters.restore import restore_hold

# Ledger rows per status are counted up to this many (a count of history would grow with it).
COUNT_UP_TO = 100_000
# Held windows listed one by one (all are counted).
HELD_SHOWN = 100


_q, _wt, _l, _hk = report_queue.c, window_totals.c, ledger.c, held_keys.c
_NOT_FINAL: tuple[str, ...] = tuple(s for s in get_args(Status) if s not in FINAL)
# Rows billing is behind on and that could go out: an ``unknown`` row is never resent until
# reconcile or a person decides, so it has its own gauge and alert instead.
_LAGGING: tuple[str, ...] = tuple(s for s in _NOT_FINAL if s != "unknown")
_NEWER = ledger.alias("newer")


def billing_lag_s(engine: Engine, catalogue: Catalogue, now: datetime) -> float:
    """Seconds since the oldest closed window (window_end + grace_s <= now) whose newest
    revision is not final in the ledger (not sent, carried or rejected) ended; 0 when there is
    none. Pending and accepted-but-unconfirmed (v2 stream, until reconcile confirms it) usage
    count: billing is behind on them. Held usage does not (windows set aside, and the
    (customer, meter) pairs the last cycle held), nor do ``unknown`` rows: neither is sent
    until reconcile or a person acts, and each has its own gauges and alerts; counted here,
    they would pin the lag and hide real lag.

    Bounded by the work in hand, not by history: such a window is either in the report queue
    (changed, not written yet, or held) or has a ledger row in a status that is not final
    (found through ledger_by_status), each looked up by key."""
    cutoffs = {meter.name: now - timedelta(seconds=meter.grace_s) for meter in catalogue}
    if not cutoffs:
        return 0.0
    queries = [*(_queued_lag(m, cutoff) for m, cutoff in cutoffs.items()), _unsettled_lag(cutoffs)]
    oldest: datetime | None = None
    with engine.connect() as connection:
        for query in queries:
            found = connection.execute(query).scalar()
            # func.min takes its column's type, so this is already an aware UTC datetime.
            if found is not None and (oldest is None or found < oldest):
                oldest = found
    return 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())


def _queued_lag(meter: str, cutoff: datetime) -> Select[Any]:
    """The oldest closed queued window whose current revision has no final ledger row."""
    return (
        select(func.min(_wt.window_end))
        .select_from(
            report_queue.join(
                window_totals,
                and_(
                    _wt.customer_id == _q.customer_id,
                    _wt.meter == _q.meter,
                    _wt.window_start == _q.window_start,
                    _wt.combination_digest == _q.combination_digest,
                ),
            ).outerjoin(
                ledger,
                and_(
                    _l.customer_id == _wt.customer_id,
                    _l.meter == _wt.meter,
                    _l.window_start == _wt.window_start,
                    _l.combination_digest == _wt.combination_digest,
                    _l.revision == _wt.revision,
                ),
            )
        )
        .where(
            _q.meter == meter,
            _wt.window_end <= cutoff,
            or_(_l.status.is_(None), _l.status.in_(_LAGGING)),
            NOT_HELD,
            ~_key_held(_q.customer_id, _q.meter),
        )
    )


def _key_held(customer_id: Any, meter: Any) -> Any:
    """The (customer, meter) is in held_keys (a handful of rows: what the last cycle held)."""
    return exists().where(_hk.customer_id == customer_id, _hk.meter == meter)


def _unsettled_lag(cutoffs: Mapping[str, datetime]) -> Select[Any]:
    """The oldest closed window (by its meter's cutoff) whose newest ledger row is not final.
    One pass over the rows not final for every meter: a query a meter read every accepted
    row (the stream's, until reconcile confirms them) once per meter of the catalogue."""
    newer = _NEWER.c
    cutoff = case(
        *((_l.meter == meter, literal(at, UTCDateTime())) for meter, at in cutoffs.items())
    )
    return select(func.min(_l.window_end)).where(
        _l.status.in_(_LAGGING),
        _l.meter.in_(list(cutoffs)),
        _l.window_end <= cutoff,
        ~exists().where(
            newer.customer_id == _l.customer_id,
            newer.meter == _l.meter,
            newer.window_start == _l.window_start,
            newer.revision > _l.revision,
        ),
        ~_key_held(_l.customer_id, _l.meter),
    )


def held_usage(engine: Engine, catalogue: Catalogue) -> list[dict[str, Any]]:
    """The oldest HELD_SHOWN windows set aside (reporters/held_windows.py): unlinked
    customers, forbidden negative corrections, revisions that went back."""
    return [
        {
            "customer_id": w.customer_id,
            "meter": w.meter,
            "dimensions": combination_values(w.combination),
            "window_start": w.window_start,
            "revision": w.revision,
            "total": w.total,
            "reason": w.reason,
            "held_since": w.held_since,
        }
        for w in held_windows(engine, [m.name for m in catalogue], HELD_SHOWN)
    ]


def reporter_status(
    engine: Engine, catalogue: Catalogue, now: datetime, horizon_days: int = STRIPE_HORIZON_DAYS
) -> dict[str, Any]:
    """The reporter's facts: ledger counts by status, the 10 newest rejections with Stripe's
    message, held usage, pending rows, due windows (changed, no ledger row yet), billing lag
    and when Stripe last acknowledged a row."""
    counts = counts_by_status(engine, COUNT_UP_TO)
    hold = restore_hold(engine)
    summary = held_usage_summary(engine, [meter.name for meter in catalogue])
    return {
        "restore_hold": None
        if hold is None
        else {
            "held_at": hold.held_at,
            "ledger_rows": hold.ledger_rows,
            "mark_rows": hold.mark_rows,
        },
        "ledger": counts,
        "ledger_counted_up_to": COUNT_UP_TO,
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
        "held_windows": summary.windows,
        "held_oldest_since": summary.oldest_since,
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
        "ledger: "
        + (
            ", ".join(
                f"{k}={v}" + ("+" if v >= facts["ledger_counted_up_to"] else "")
                for k, v in sorted(facts["ledger"].items())
            )
            or "empty"
        )
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
        " (Stripe's error reports reject the rows they name; run meterstream reconcile)"
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
    held = sum(facts["held_windows"].values())
    since = facts["held_oldest_since"]
    lines.append(
        f"held windows (not sent until a person acts; not in the billing lag): {held}"
        + (f", the oldest held since {since.isoformat()}" if since else "")
        + "".join(f"; {reason} {n}" for reason, n in sorted(facts["held_windows"].items()))
    )
    if held > len(facts["held"]):
        lines.append(f"  the oldest {len(facts['held'])}:")
    for item in facts["held"]:
        lines.append(
            f"  {item['reason']}: {item['customer_id']} {item['meter']} "
            + "".join(f"{d}={v} " for d, v in item["dimensions"].items())
            + f"window {item['window_start'].isoformat()} revision {item['revision']} "
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
