"""Reads of the ledger: one row, a window's newest revision, the rows of a status; and the
same running totals and window heads for many (customer, meter) pairs in one statement."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, get_args

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    LargeBinary,
    Select,
    String,
    and_,
    bindparam,
    column,
    func,
    select,
    text,
    values,
)

from meterstream.db import BinaryStrings
from meterstream.schema import ExactDecimal, has_combination, ledger
from reporters.ledger.model import ACKNOWLEDGED, LedgerRow, Status, row_from


def latest_row(
    connection: Connection, customer_id: str, meter: str, combination_digest: bytes | None = None
) -> LedgerRow | None:
    """The newest row of one (customer, meter); with a ``combination_digest`` (not empty), of
    that combination: it carries the combination's running totals."""
    query = select(ledger).where(ledger.c.customer_id == customer_id, ledger.c.meter == meter)
    if combination_digest:
        # ledger_by_combination's own predicate: the index applies, not a walk back through
        # the pair's rows of other combinations.
        query = query.where(
            ledger.c.combination_digest == combination_digest, has_combination(ledger)
        )
    found = connection.execute(query.order_by(ledger.c.sequence.desc()).limit(1)).mappings().first()
    return None if found is None else row_from(found)


def reported_window_value(
    connection: Connection,
    customer_id: str,
    meter: str,
    window_start: datetime,
    combination_digest: bytes = b"",
) -> tuple[int, Decimal]:
    """(revision, exact window value) of a window's (and combination's) newest row; (0, 0) if
    it was never reported."""
    found = connection.execute(
        select(ledger.c.revision, ledger.c.total)
        .where(
            ledger.c.customer_id == customer_id,
            ledger.c.meter == meter,
            ledger.c.window_start == window_start,
            ledger.c.combination_digest == combination_digest,
        )
        .order_by(ledger.c.revision.desc())
        .limit(1)
    ).first()
    return (0, Decimal(0)) if found is None else (int(found[0]), found[1])


def latest_window_row(
    connection: Connection,
    customer_id: str,
    meter: str,
    window_start: datetime,
    combination_digest: bytes = b"",
) -> LedgerRow | None:
    """The newest row of one window and combination (its highest revision)."""
    found = (
        connection.execute(
            select(ledger)
            .where(
                ledger.c.customer_id == customer_id,
                ledger.c.meter == meter,
                ledger.c.window_start == window_start,
                ledger.c.combination_digest == combination_digest,
            )
            .order_by(ledger.c.revision.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    return None if found is None else row_from(found)


_l = ledger.c
_OTHER = ledger.alias("newer")


def _key_heads_query(keys: Collection[tuple[str, str]]) -> Select[Any]:
    """Per key, its newest row found by one backward step of ledger_sequence (max of the
    key's sequence), so the cost is the keys', not their history's (IN lists of customers
    and meters would read every row of those keys)."""
    wanted = (
        values(column("c", String), column("m", String), name="wanted").data(sorted(keys)).cte()
    )
    newest = (
        select(func.max(_OTHER.c.sequence))
        .where(_OTHER.c.customer_id == wanted.c.c, _OTHER.c.meter == wanted.c.m)
        .scalar_subquery()
    )
    # Only the running totals: reading whole rows (seven times to parse, 23 columns to map)
    # cost about 10 us of the 54 us of CPU that writing a row took once its key had one.
    return select(
        _l.customer_id, _l.meter, _l.sequence, _l.accounted_total, _l.units_total
    ).select_from(
        wanted.join(
            ledger,
            and_(_l.customer_id == wanted.c.c, _l.meter == wanted.c.m, _l.sequence == newest),
        )
    )


def _combination_heads_query(keys: Collection[CombinationKey]) -> Select[Any]:
    """_key_heads_query per (customer, meter, combination) of a meter with dimensions (a
    digest not empty): the newest row of each, found by one backward step of
    ledger_by_combination."""
    wanted = (
        values(column("c", String), column("m", String), column("d", LargeBinary), name="wanted")
        .data(sorted(keys))
        .cte()
    )
    newest = (
        select(func.max(_OTHER.c.sequence))
        .where(
            _OTHER.c.customer_id == wanted.c.c,
            _OTHER.c.meter == wanted.c.m,
            _OTHER.c.combination_digest == wanted.c.d,
            has_combination(_OTHER),  # ledger_by_combination's own predicate
        )
        .scalar_subquery()
    )
    return select(
        _l.customer_id,
        _l.meter,
        _l.combination_digest,
        _l.sequence,
        _l.accounted_total,
        _l.units_total,
    ).select_from(
        wanted.join(
            ledger,
            and_(_l.customer_id == wanted.c.c, _l.meter == wanted.c.m, _l.sequence == newest),
        )
    )


_WINDOW_ROWS = select(
    _l.customer_id,
    _l.meter,
    _l.window_start,
    _l.combination_digest,
    _l.revision,
    _l.total,
    _l.timestamp,
).where(
    _l.customer_id.in_(bindparam("customers", expanding=True)),
    _l.meter.in_(bindparam("meters", expanding=True)),
    _l.window_start.in_(bindparam("starts", expanding=True)),
)
# (customer_id, meter, window_start, combination_digest)
WindowKey = tuple[str, str, datetime, bytes]
CombinationKey = tuple[str, str, bytes]  # (customer_id, meter, combination_digest)


@dataclass(frozen=True, slots=True)
class KeyHead:
    """The newest ledger row of one (customer, meter), or of one combination of it: the
    running totals write_rows reads."""

    sequence: int
    accounted_total: Decimal
    units_total: int


@dataclass(frozen=True, slots=True)
class WindowHead:
    """The newest ledger row of one window: what write_row reads of it."""

    revision: int
    window_value: Decimal
    timestamp: datetime


# PostgreSQL: the keys as two array parameters and, per key, one backward step of
# ledger_sequence (ORDER BY sequence DESC LIMIT 1 in a LATERAL subquery). The VALUES form
# leaves the join to the planner, which without fresh statistics (a ledger growing in a
# catch-up) hashed the whole ledger for every chunk: 32 ms a chunk of 100 keys with 20,000
# rows, growing with history. This form has no plan that reads other keys' rows, and its text
# is the same for every chunk (prepared once, never compiled again).
_KEY_HEADS_POSTGRESQL = (
    text(
        "SELECT w.c, w.m, newest.sequence, newest.accounted_total, newest.units_total "
        "FROM unnest(CAST(:customers AS VARCHAR[]), CAST(:meters AS VARCHAR[])) AS w (c, m) "
        "CROSS JOIN LATERAL (SELECT sequence, accounted_total, units_total FROM ledger "
        "WHERE ledger.customer_id = w.c AND ledger.meter = w.m "
        "ORDER BY ledger.sequence DESC LIMIT 1) AS newest"
    )
    .bindparams(
        bindparam("customers", type_=BinaryStrings), bindparam("meters", type_=BinaryStrings)
    )
    .columns(
        column("c", String),
        column("m", String),
        column("sequence", BigInteger),
        column("accounted_total", ExactDecimal()),
        column("units_total", BigInteger),
    )
)


def key_heads(
    connection: Connection, keys: Collection[tuple[str, str]]
) -> dict[tuple[str, str], KeyHead]:
    """The running totals of latest_row for every (customer, meter) of ``keys``, in one query."""
    if not keys:
        return {}
    if connection.dialect.name == "postgresql":
        ordered = sorted(keys)
        found = connection.execute(
            _KEY_HEADS_POSTGRESQL,
            {"customers": [c for c, _ in ordered], "meters": [m for _, m in ordered]},
        )
    else:
        found = connection.execute(_key_heads_query(keys))
    return {
        (customer_id, meter): KeyHead(sequence, accounted_total, units_total)
        for customer_id, meter, sequence, accounted_total, units_total in found
    }


def combination_heads(
    connection: Connection, keys: Collection[CombinationKey]
) -> dict[CombinationKey, KeyHead]:
    """The running totals of the newest row of every (customer, meter, combination) of
    ``keys`` that has one, in one query: a combination's carry is its own. Combinations of
    meters with dimensions only (for the empty one, key_heads)."""
    if any(not digest for _c, _m, digest in keys):
        raise ValueError("combination_heads takes combinations of meters with dimensions")
    if not keys:
        return {}
    found = connection.execute(_combination_heads_query(keys))
    return {
        (customer_id, meter, bytes(digest)): KeyHead(sequence, accounted_total, units_total)
        for customer_id, meter, digest, sequence, accounted_total, units_total in found
    }


def window_heads(
    connection: Connection, windows: Collection[WindowKey]
) -> dict[WindowKey, WindowHead]:
    """The newest row (highest revision) of every window of ``windows`` that has one."""
    if not windows:
        return {}
    found = connection.execute(
        _WINDOW_ROWS,
        {
            "customers": sorted({w[0] for w in windows}),
            "meters": sorted({w[1] for w in windows}),
            "starts": sorted({w[2] for w in windows}),
        },
    )
    heads: dict[WindowKey, WindowHead] = {}
    for customer_id, meter, window_start, digest, revision, window_value, timestamp in found:
        key = (customer_id, meter, window_start, bytes(digest))
        if key in windows and (key not in heads or revision > heads[key].revision):
            heads[key] = WindowHead(int(revision), window_value, timestamp)
    return heads


def pending_rows(engine: Engine) -> list[LedgerRow]:
    """Every pending row, in the order its (customer, meter) must send them."""
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger)
            .where(ledger.c.status == "pending")
            .order_by(ledger.c.customer_id, ledger.c.meter, ledger.c.sequence)
        ).mappings()
        return [row_from(mapping) for mapping in found]


def count_with_status(engine: Engine, status: Status) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                select(func.count()).select_from(ledger).where(ledger.c.status == status)
            ).scalar_one()
        )


def rows_with_status(engine: Engine, status: Status) -> list[LedgerRow]:
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger)
            .where(ledger.c.status == status)
            .order_by(ledger.c.customer_id, ledger.c.meter, ledger.c.sequence)
        ).mappings()
        return [row_from(mapping) for mapping in found]


def rows_for(engine: Engine, customer_id: str, meter: str) -> list[LedgerRow]:
    """Every row of one (customer, meter) in sending order (for people and tests)."""
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger)
            .where(ledger.c.customer_id == customer_id, ledger.c.meter == meter)
            .order_by(ledger.c.sequence)
        ).mappings()
        return [row_from(mapping) for mapping in found]


def all_rows(engine: Engine) -> list[LedgerRow]:
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger).order_by(ledger.c.customer_id, ledger.c.meter, ledger.c.sequence)
        ).mappings()
        return [row_from(mapping) for mapping in found]


def counts_by_status(engine: Engine, up_to: int) -> dict[str, int]:
    """Rows per status, each counted up to ``up_to`` (through ledger_by_status), so the cost
    does not grow with history: a count equal to ``up_to`` means "at least"."""
    counts: dict[str, int] = {}
    with engine.connect() as connection:
        for status in get_args(Status):
            found = connection.execute(
                select(func.count()).select_from(
                    select(ledger.c.status)
                    .where(ledger.c.status == status)
                    .order_by(ledger.c.updated_at)  # ledger_by_status's order: its range
                    .limit(up_to)
                    .subquery()
                )
            ).scalar_one()
            if found:
                counts[status] = int(found)
    return counts


def recent_rejections(engine: Engine, limit: int = 10) -> list[LedgerRow]:
    with engine.connect() as connection:
        found = connection.execute(
            select(ledger)
            .where(ledger.c.status == "rejected")
            .order_by(ledger.c.updated_at.desc())
            .limit(limit)
        ).mappings()
        return [row_from(mapping) for mapping in found]


def last_sent_at(engine: Engine) -> datetime | None:
    """When Stripe last acknowledged a row (None if never). Two index range reads, not a scan:
    the newest updated acknowledged row gives a lower bound, and a row sent later was updated
    later too (updated_at >= sent_at)."""
    acknowledged = ledger.c.status.in_(ACKNOWLEDGED)
    with engine.connect() as connection:
        bounds = [
            connection.execute(
                select(ledger.c.sent_at)
                .where(ledger.c.status == status, ledger.c.sent_at.is_not(None))
                .order_by(ledger.c.updated_at.desc())
                .limit(1)
            ).scalar()
            for status in ACKNOWLEDGED
        ]
        lower = max((b for b in bounds if b is not None), default=None)
        if lower is None:
            return None
        found: datetime | None = connection.execute(
            select(func.max(ledger.c.sent_at)).where(acknowledged, ledger.c.updated_at >= lower)
        ).scalar()
    return found
