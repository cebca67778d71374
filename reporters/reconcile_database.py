"""Reconcile's database side: per (Stripe customer, meter, combination), the units the
database holds and why some are not in Stripe (held, rejected, unknown, in flight).

A combination is meterstream.dimensions' canonical key, ``''`` for a meter without
dimensions. Each combination has its own running totals in the ledger (reporters/rows.py), so
its units are the floor of its own exact total, compared with Stripe's summary of it.

What it reads grows with the range and the work in hand, never with history: the rows not
final (ledger_by_status; ``rejected`` ones only if timestamped or rejected since the range's
start, through ledger_by_time and ledger_by_status: they are final and kept long, so all of them
grow with history), the report queue, and per (customer, meter, combination) found there or in
the range its newest row (ledger_by_combination), its due windows' reported revisions and, for a
``last`` meter, its newest window (each one index lookup).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    Connection,
    Engine,
    LargeBinary,
    String,
    and_,
    column,
    func,
    or_,
    select,
    values,
)

from meterstream.dimensions import combination_digest
from meterstream.meters import Catalogue
from meterstream.schema import has_combination, window_totals
from meterstream.schema import ledger as ledger_table
from reporters import ledger
from reporters.carry import exact_sum, whole_units
from reporters.customers import stripe_customer_for
from reporters.due import DueWindow, due_windows
from reporters.ledger import LedgerRow, latest_window_row, reported_window_value, rows_with_status
from reporters.ledger.model import row_from
from reporters.meters_check import StripeMeter

UNLINKED = "(unlinked)"
# (customer_id, meter, combination) and (stripe_customer_id, meter, combination)
AppKey = tuple[str, str, str]
StripeKey = tuple[str, str, str]


@dataclass
class Side:
    customer_ids: set[str] = field(default_factory=set)
    value: int = 0
    not_billed: list[str] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)


_OUTSTANDING: tuple[ledger.Status, ...] = ("rejected", "unknown", "pending")
# Not final: few, whatever the history (reconcile or the next cycle decides them).
_UNDECIDED: tuple[ledger.Status, ...] = ("unknown", "pending")


def database_side(
    engine: Engine,
    catalogue: Catalogue,
    stripe_meters: Mapping[str, StripeMeter],
    in_range: Collection[AppKey],
    links: Mapping[str, str],
    since: datetime,
) -> dict[StripeKey, Side]:
    """Per (Stripe customer, meter, combination): the database's units and why some are not
    in Stripe, for the keys with rows in the range (``in_range``), rows not final, rows
    rejected since ``since`` (or timestamped since) or due windows."""
    outstanding: dict[AppKey, list[LedgerRow]] = {}
    undecided = [row for status in _UNDECIDED for row in rows_with_status(engine, status)]
    for row in [*_rejected_since(engine, since), *undecided]:
        if row.meter in stripe_meters:
            key = (row.customer_id, row.meter, row.combination)
            outstanding.setdefault(key, []).append(row)
    due: dict[AppKey, list[DueWindow]] = {}
    for windows in due_windows(engine, stripe_meters, include_held=True).values():
        for window in windows:
            key = (window.customer_id, window.meter, window.combination)
            due.setdefault(key, []).append(window)
    app_keys = set(outstanding) | set(due) | set(in_range)
    sides: dict[StripeKey, Side] = {}
    with engine.connect() as connection:
        heads = _heads(connection, app_keys)
        for key in sorted(app_keys):
            customer_id, meter_name, combination = key
            head = heads.get(key)
            stripe_customer_id = stripe_customer_for(customer_id, links) or (
                head.stripe_customer_id if head else UNLINKED
            )
            side = sides.setdefault((stripe_customer_id, meter_name, combination), Side())
            side.customer_ids.add(customer_id)
            _add_key(
                connection,
                side,
                catalogue,
                key,
                head,
                outstanding.get(key, []),
                due.get(key, []),
                linked=stripe_customer_for(customer_id, links) is not None,
            )
    return sides


def _rejected_since(engine: Engine, since: datetime) -> list[LedgerRow]:
    """The rejected rows timestamped since ``since`` (the range's, ledger_by_time) or rejected
    since (an old window refused after an outage, ledger_by_status), not the older ones: they
    are never resent and outlive the sent rows (bill by hand; ``meterstream status`` lists the
    newest), so all of them grow with history."""
    c = ledger_table.c
    query = (
        select(ledger_table)
        .where(c.status == "rejected", or_(c.timestamp >= since, c.updated_at >= since))
        .order_by(c.customer_id, c.meter, c.sequence)
    )
    with engine.connect() as connection:
        return [row_from(mapping) for mapping in connection.execute(query).mappings()]


_HEADS_PER_QUERY = 1_000
_newer = ledger_table.alias("newer")


def _heads(connection: Connection, keys: Collection[AppKey]) -> dict[AppKey, LedgerRow]:
    """The newest row of each (customer, meter, combination) of ``keys``: one backward step of
    an index per key (ledger_sequence without dimensions, ledger_by_combination with them), a
    thousand keys per query (one query per key cost 3 ms each)."""
    heads: dict[AppKey, LedgerRow] = {}
    ordered = sorted((c, m, combination_digest(k)) for c, m, k in keys)
    for with_dimensions in (False, True):
        wanted_keys = [key for key in ordered if bool(key[2]) == with_dimensions]
        for first in range(0, len(wanted_keys), _HEADS_PER_QUERY):
            chunk = wanted_keys[first : first + _HEADS_PER_QUERY]
            for row in _heads_query(connection, chunk, with_dimensions):
                heads[(row.customer_id, row.meter, row.combination)] = row
    return heads


def _heads_query(
    connection: Connection, chunk: list[tuple[str, str, bytes]], with_dimensions: bool
) -> list[LedgerRow]:
    wanted = (
        values(column("c", String), column("m", String), column("d", LargeBinary), name="w")
        .data(chunk)
        .cte()
    )
    same_pair = and_(_newer.c.customer_id == wanted.c.c, _newer.c.meter == wanted.c.m)
    if with_dimensions:
        # ledger_by_combination's own predicate, so the index applies.
        same_pair = and_(
            same_pair, _newer.c.combination_digest == wanted.c.d, has_combination(_newer)
        )
    newest = select(func.max(_newer.c.sequence)).where(same_pair).scalar_subquery()
    c = ledger_table.c
    found = connection.execute(
        select(ledger_table).select_from(
            wanted.join(
                ledger_table,
                and_(c.customer_id == wanted.c.c, c.meter == wanted.c.m, c.sequence == newest),
            )
        )
    ).mappings()
    return [row_from(mapping) for mapping in found]


def _add_key(
    connection: Connection,
    side: Side,
    catalogue: Catalogue,
    key: AppKey,
    head: LedgerRow | None,
    own: list[LedgerRow],
    unreported: list[DueWindow],
    *,
    linked: bool,
) -> None:
    """Add one (customer, meter, combination)'s units and reasons to its Stripe side."""
    customer_id, meter_name, combination = key
    digest = combination_digest(combination)
    meter = catalogue.meters[meter_name]
    if meter.stripe_formula == "sum":
        units = whole_units(_exact_total(connection, key, head, unreported), meter.unit_scale)
    else:
        wt = window_totals.c
        newest = connection.execute(
            select(wt.window_start, wt.value)
            .where(
                wt.customer_id == customer_id,
                wt.meter == meter_name,
                wt.combination_digest == digest,
            )
            .order_by(wt.window_start.desc())
            .limit(1)
        ).first()
        if newest is not None:
            units = whole_units(newest.value, meter.unit_scale)
            row = latest_window_row(
                connection, customer_id, meter_name, newest.window_start, digest
            )
        else:
            # Every window pruned (retention): the newest row left stands for the newest one.
            row = head
            units = 0 if head is None else whole_units(head.window_value, meter.unit_scale)
        own = [] if row is None else [row]
    side.value += units
    for status in _OUTSTANDING:
        of_status = [r for r in own if r.status == status]
        if of_status:
            target = side.in_flight if status == "pending" else side.not_billed
            target.append(f"{customer_id} {status} {sum(r.value for r in of_status)}")
    if unreported:
        reason = "held: no_customer_link" if not linked else "due or held (see meterstream status)"
        issued = head.units_total if head is not None and meter.stripe_formula == "sum" else 0
        gap = units - issued if meter.stripe_formula == "sum" else units
        target = side.not_billed if reason.startswith("held") else side.in_flight
        target.append(f"{customer_id} {reason}: {len(unreported)} window(s), {gap} unit(s)")


def _exact_total(
    connection: Connection, key: AppKey, head: LedgerRow | None, unreported: list[DueWindow]
) -> Decimal:
    """A sum meter's exact total of one combination over all time: what the combination's
    newest ledger row accounted, plus how much each due window differs from its newest row.

    Every other window's newest revision is in the ledger (the report queue's invariant,
    reporters/due.py, checked by the backstop), so it adds nothing: the same as adding up every
    window, pruned ones included, without reading them.
    """
    customer_id, meter_name, combination = key
    digest = combination_digest(combination)
    parts = [Decimal(0) if head is None else head.accounted_total]
    for window in unreported:
        _, reported = reported_window_value(
            connection, customer_id, meter_name, window.window_start, digest
        )
        # copy_negate, not a subtraction: exact whatever the default context's precision.
        parts += [window.window_value, reported.copy_negate()]
    return exact_sum(parts)
