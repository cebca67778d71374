"""Deciding ``unknown`` rows from Stripe's meter event summaries, only where the answer is certain.

An ``unknown`` row was first called more than 20 h ago with no answer: Stripe may hold it,
and a resend could bill twice. Stripe's summary of the row's minute (summaries are
minute-aligned, the finest Stripe gives) settles it when no other row of the same Stripe
customer and meter in that minute can blur the answer:

- a ``sum`` meter's summary is the sum of the events of the minute. Equal to the sent rows of
  the minute plus the row: Stripe has it (``sent``). Equal to them without it: Stripe never
  recorded it (``pending`` again, sent afresh next cycle). Another undecided row in the minute,
  or a value of 0: left ``unknown``.
- a ``last`` meter (meterstream's last, max and min meters) keeps the value of the event with
  the newest timestamp. The summary equal to the row's value, with no other row of the minute
  Stripe may hold carrying that value: the newest event Stripe holds is the row (``sent``).
  The summary different, with no other row Stripe may hold at the row's timestamp or later:
  had Stripe the row, it would show its value, so it does not (``pending`` again). A value of
  0 reads the same as "no event" and is left ``unknown``, as is anything else.

Each decision reads the rows of one minute of one Stripe customer and meter (ledger_by_time)
and makes one summary call: the cost is the unknown rows', not the ledger's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from sqlalchemy import Engine, select

from meterstream.schema import ledger as ledger_table
from reporters import ledger
from reporters.ledger import LedgerRow, rows_with_status
from reporters.ledger.model import row_from
from reporters.meters_check import StripeMeter

# (stripe meter id, stripe customer id, start_s, end_s) -> Stripe's aggregated value
FetchSummary = Callable[[str, str, int, int], Decimal]
MINUTE = timedelta(minutes=1)
Verdict = Literal["sent", "pending", "unknown"]
# Rows Stripe holds for certain (sent) or may hold (called, answer unknown or not final).
_MAY_BE_IN_STRIPE = ("sent", "accepted", "unknown")
_UNDECIDED = ("pending", "unknown", "accepted")


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str


def minute_floor(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _may_be_in_stripe(row: LedgerRow) -> bool:
    return row.status in _MAY_BE_IN_STRIPE or (row.status == "pending" and row.attempts > 0)


def decide_sum(row: LedgerRow, others: Sequence[LedgerRow], summary: Decimal) -> Decision:
    """A sum meter's unknown ``row`` given the other rows of its minute and Stripe's sum."""
    if any(r.status in _UNDECIDED for r in others):
        return Decision("unknown", "other undecided rows in its minute")
    if row.value == 0:
        return Decision("unknown", "its value is 0: Stripe's summary cannot tell")
    known = sum(r.value for r in others if r.status == "sent")
    if summary == known + row.value:
        return Decision("sent", "Stripe has it")
    if summary == known:
        return Decision("pending", "not in Stripe")
    return Decision(
        "unknown",
        f"Stripe's summary {summary} for its minute matches neither {known} nor "
        f"{known + row.value}",
    )


def decide_last(row: LedgerRow, others: Sequence[LedgerRow], summary: Decimal) -> Decision:
    """A last meter's unknown ``row``: Stripe's summary of the minute is the value of the
    event with the newest timestamp in it (0 when there is none)."""
    rivals = [r for r in others if _may_be_in_stripe(r)]
    if row.value == 0:
        return Decision("unknown", "its value is 0, which Stripe's summary shows for no event too")
    if summary == row.value:
        same = [r for r in rivals if r.value == row.value]
        if same:
            return Decision(
                "unknown",
                f"Stripe's last value {summary} for its minute could be another row's "
                f"({same[0].identifier} has the same value)",
            )
        return Decision("sent", "Stripe has it (the newest value of its minute is its own)")
    later = [r for r in rivals if r.timestamp >= row.timestamp]
    if later:
        return Decision(
            "unknown",
            f"Stripe's last value {summary} for its minute may come from a later row "
            f"({later[0].identifier}) that hides it",
        )
    return Decision("pending", f"not in Stripe (its minute's last value is {summary})")


def minute_rows(engine: Engine, row: LedgerRow) -> list[LedgerRow]:
    """The other rows of ``row``'s Stripe customer and meter timestamped in its minute."""
    minute = minute_floor(row.timestamp)
    c = ledger_table.c
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger_table).where(
                c.timestamp >= minute,
                c.timestamp < minute + MINUTE,
                c.stripe_customer_id == row.stripe_customer_id,
                c.meter == row.meter,
                c.identifier != row.identifier,
            )
        ).mappings()
        return [row_from(mapping) for mapping in found]


def settle_rows(
    engine: Engine,
    stripe_meters: Mapping[str, StripeMeter],
    fetch_summary: FetchSummary,
    end: datetime,
    now: datetime,
) -> list[str]:
    """Decide the ``unknown`` rows timestamped before ``end`` (Stripe's summaries are settled
    up to there); returns what it did, and why each row it left is left."""
    done: list[str] = []
    for row in rows_with_status(engine, "unknown"):
        if row.timestamp >= end or row.meter not in stripe_meters:
            continue
        meter = stripe_meters[row.meter]
        minute = minute_floor(row.timestamp)
        others = minute_rows(engine, row)
        if meter.formula == "sum" and any(r.status in _UNDECIDED for r in others):
            # No call needed: nothing Stripe says can decide it.
            done.append(f"left {row.identifier} unknown: other undecided rows in its minute")
            continue
        summary = fetch_summary(
            meter.id,
            row.stripe_customer_id,
            int(minute.timestamp()),
            int((minute + MINUTE).timestamp()),
        )
        decide = decide_sum if meter.formula == "sum" else decide_last
        decision = decide(row, others, summary)
        if decision.verdict == "sent":
            if ledger.mark_acknowledged(engine, row.identifier, "sent", None, now, "unknown"):
                done.append(f"{row.identifier}: {decision.reason}; marked sent")
        elif decision.verdict == "pending":
            if ledger.mark_pending_again(engine, row.identifier, now):
                done.append(f"{row.identifier}: {decision.reason}; pending again, sent next cycle")
        else:
            done.append(f"left {row.identifier} unknown: {decision.reason}; a person must decide")
    return done
