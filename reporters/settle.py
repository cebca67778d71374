"""Deciding ``unknown`` rows from Stripe's meter event summaries, only where the answer is certain.

An ``unknown`` row was first called more than 20 h ago with no answer: Stripe may hold it,
and a resend could bill twice. Stripe's summary of the row's minute (summaries are
minute-aligned, the finest Stripe gives) settles it when no other row of the same Stripe
customer and meter in that minute can blur the answer:

- a ``sum`` meter's summary is the sum of the events of the minute. Equal to the sent rows of
  the minute plus the row: Stripe has it (``sent``). Equal to them without it: Stripe never
  recorded it (``pending`` again, sent afresh next cycle). Other ``unknown`` rows of the minute
  whose values have the row's sign are decided with it, as a group (only all of them make the
  sum of all, only none of them make 0). Another undecided row in the minute (pending,
  accepted), values of both signs, or a value of 0: left ``unknown``.
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
    """A sum meter's unknown ``row`` given the other rows of its minute and Stripe's sum.

    Other ``unknown`` rows of the minute are decided with it, as a group, when all its values
    have one sign: then only "all of them" gives the sum of all, and only "none" gives 0, so
    the verdict holds for each (:func:`settle_rows` applies it to the whole group)."""
    undecided = [r for r in others if r.status in _UNDECIDED]
    if any(r.status != "unknown" for r in undecided):
        return Decision("unknown", "other undecided rows in its minute")
    if row.value == 0:
        return Decision("unknown", "its value is 0: Stripe's summary cannot tell")
    group = [row, *undecided]
    if not (all(r.value > 0 for r in group) or all(r.value < 0 for r in group)):
        return Decision("unknown", "other unknown rows in its minute, with values of both signs")
    known = sum(r.value for r in others if r.status == "sent")
    together = sum(r.value for r in group)
    with_others = " (with the other unknown rows of its minute)" if undecided else ""
    if summary == known + together:
        return Decision("sent", f"Stripe has it{with_others}")
    if summary == known:
        return Decision("pending", f"not in Stripe{with_others}")
    return Decision(
        "unknown",
        f"Stripe's summary {summary} for its minute matches neither {known} nor {known + together}",
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
    decided: set[str] = set()  # decided with another row of their minute (a sum group)
    for row in rows_with_status(engine, "unknown"):
        if row.timestamp >= end or row.meter not in stripe_meters or row.identifier in decided:
            continue
        meter = stripe_meters[row.meter]
        minute = minute_floor(row.timestamp)
        others = minute_rows(engine, row)
        if meter.formula == "sum" and any(
            r.status in _UNDECIDED and r.status != "unknown" for r in others
        ):
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
        group = [row]
        if meter.formula == "sum" and decision.verdict != "unknown":
            group += [r for r in others if r.status == "unknown"]
        for member in group:
            decided.add(member.identifier)
            done += _apply(engine, member.identifier, decision, now)
    return done


def _apply(engine: Engine, identifier: str, decision: Decision, now: datetime) -> list[str]:
    """Record ``decision`` for the unknown row ``identifier``; what was done, for people."""
    if decision.verdict == "sent":
        if ledger.mark_acknowledged(engine, identifier, "sent", None, now, "unknown"):
            return [f"{identifier}: {decision.reason}; marked sent"]
    elif decision.verdict == "pending":
        if ledger.mark_pending_again(engine, identifier, now):
            return [f"{identifier}: {decision.reason}; pending again, sent next cycle"]
    else:
        return [f"left {identifier} unknown: {decision.reason}; a person must decide"]
    return []
