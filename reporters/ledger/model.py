"""The ledger's model: a row of what was (or will be) sent to Stripe, its identifier, its status.

A row is written and committed before its call, then updated from the answer. Statuses:

- ``pending``   written, not yet acknowledged; resent (same identifier, same body) until it is.
                Each call is stamped before it is made (``attempts`` + 1,
                ``first_attempt_at``) in a committed write: v1 the row of that call, just
                before; the stream its new rows as it writes them, seconds before their
                calls, and the rows read pending just before theirs. A stamp whose call is
                not made is taken back, so a row with none was never called; only a crash
                can leave a stamp without its call, and then the row counts as called.
- ``unknown``   pending, but its first call was more than ``UNKNOWN_AFTER`` ago: Stripe only
                promises to deduplicate an identifier for about 24 h, so a resend could bill
                twice. Never resent blindly; ``meterstream reconcile`` asks Stripe's summaries
                and marks it ``sent`` or back to ``pending``, or leaves it for a person.
- ``sent``      Stripe acknowledged it (v1: 200, or "already exists" for our own identifier).
- ``accepted``  the v2 stream answered 200: Stripe took it but validates later, so it is
                *unconfirmed*: not final for billing lag and status until ``meterstream
                reconcile`` finds it in Stripe's summaries and marks it ``sent``, or Stripe's
                ``v1.billing.meter.error_report_triggered`` webhook names it (``rejected``).
- ``rejected``  Stripe refused it for good (400, or named in an error report), or it was too
                old to send; ``error_code`` and ``last_error`` say why. Its units stay
                accounted: a person decides.
- ``carried``   a sum-meter row worth 0 whole units; nothing to send, its fraction is carried.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

Status = Literal["pending", "sent", "accepted", "rejected", "carried", "unknown"]
ACKNOWLEDGED: tuple[Status, ...] = ("sent", "accepted")
# Stripe has said its last word (or nothing needs saying), and it is confirmed: no more calls
# for the row, and billing is not behind on it. ``accepted`` is not here: see the docstring.
FINAL: tuple[Status, ...] = ("sent", "rejected", "carried")
# Stripe deduplicates identifiers and Idempotency-Keys for "at least 24 h"; 4 h of margin.
UNKNOWN_AFTER = timedelta(hours=20)


def identifier_for(
    customer_id: str,
    meter: str,
    window_start: datetime,
    window_end: datetime,
    revision: int,
    *,
    deployment_id: str,
    combination: str = "",
) -> str:
    """The meter event's identifier: deterministic, so a resend after a crash is recognised.

    ``ms2_<deployment id>_`` then a hash of the parts (customer ids may be long or hold any
    character): at most 85 characters, under Stripe's 100. The deployment id (see
    meterstream/deployment.py) keeps two deployments on one Stripe account, or a database and
    its restored copy run as a new deployment, from colliding. Rows written before it existed
    keep their ``ms1_`` identifiers: a resend must repeat the stored one.

    ``combination`` (meterstream.dimensions' canonical key) is a part only when not empty: a
    meter without dimensions keeps the identifiers already in Stripe, and each combination of
    a window has its own.
    """
    fields = [
        deployment_id,
        customer_id,
        meter,
        window_start.isoformat(),
        window_end.isoformat(),
        str(revision),
    ]
    if combination:
        fields.append(combination)
    parts = "\x1f".join(fields)
    return f"ms2_{deployment_id}_" + hashlib.sha256(parts.encode("utf-8")).hexdigest()[:48]


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One ledger row; the fields of a meter event request are all here, so a resend is
    byte-for-byte the same request."""

    customer_id: str
    meter: str
    window_start: datetime
    window_end: datetime
    revision: int
    sequence: int
    # The window's exact value (window_totals.value) at ``revision``; stored in the column
    # ``total`` (see COLUMNS), not to be confused with the running totals below.
    window_value: Decimal
    accounted_total: Decimal  # running: the exact usage accounted for, after this row
    units_total: int  # running: whole Stripe units issued, after this row
    value: int  # this meter event's value (payload[value]), in whole Stripe units
    event_name: str
    stripe_customer_id: str
    timestamp: datetime
    identifier: str
    status: Status
    attempts: int
    first_attempt_at: datetime | None
    error_code: str | None
    last_error: str | None
    stripe_request_id: str | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    # The meter's unit_scale the running totals were computed with (None: written before
    # migration 0006; the reporter fills it in at start). See reporters/scales.py.
    unit_scale: Decimal | None = None
    # The window's combination of dimension values (meterstream.dimensions' canonical key, sent
    # in the payload under the meter's dimension keys) and its digest; empty without dimensions.
    combination: str = ""
    combination_digest: bytes = b""


FIELDS: tuple[str, ...] = LedgerRow.__slots__
"""The row's fields, in the order of the ledger table's columns (the bulk writer's order)."""
# A field's column has the field's name, but for window_value: its column is still ``total``
# (renaming it needs a migration; the Python name says what it holds).
_COLUMN_OF = {"window_value": "total"}
COLUMNS: tuple[str, ...] = tuple(_COLUMN_OF.get(name, name) for name in FIELDS)
"""The ledger table's column of each field of FIELDS, in the same order."""


def row_from(mapping: Any) -> LedgerRow:
    """A LedgerRow from a result mapping of ``select(ledger)``."""
    return LedgerRow(
        **{name: mapping[column] for name, column in zip(FIELDS, COLUMNS, strict=True)}
    )


def values_of(row: LedgerRow) -> dict[str, Any]:
    """The row as column -> value, for ``ledger.insert()``."""
    return {column: getattr(row, name) for name, column in zip(FIELDS, COLUMNS, strict=True)}
