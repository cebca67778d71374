"""Stripe's meter error reports: the ledger rows they name become ``rejected``, and every
error is counted per meter event name and code (``meter_error_counts``).

Stripe validates stream events after answering 202 and reports the failures in thin events
(``v1.billing.meter.error_report_triggered``; ``v1.billing.meter.no_meter_found`` when no
meter has the event name), each with a count per error code and a few sample errors that name
the request's identifier. Samples, not every identifier: the rows a sample names are marked
here; the rest of the count is kept as ``unidentified`` for reconcile to look for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from meterstream.schema import ledger, meter_error_counts
from reporters.ledger import reject_reported

NO_METER = "no_meter"
_QUOTED = re.compile(r"'([^']{1,100})'")
_c = meter_error_counts.c


@dataclass(frozen=True)
class ErrorType:
    code: str
    error_count: int
    samples: tuple[tuple[str, str], ...]  # (identifier, Stripe's message)


@dataclass(frozen=True)
class ErrorReport:
    """One error report, read from the full event the SDK fetched."""

    event_name: str | None  # the meter's (None: no meter found; read from the samples)
    stripe_meter_id: str | None
    error_types: tuple[ErrorType, ...]


@dataclass(frozen=True)
class Applied:
    event_name: str
    code: str
    errors: int
    rows_rejected: int


def read_report(data: Any, event_name: str | None, stripe_meter_id: str | None) -> ErrorReport:
    """The report in a fetched event's ``data`` (the SDK's objects); raises KeyError,
    AttributeError or ValueError on a shape it cannot read (the event is retried, not lost)."""
    kinds = []
    for kind in data["reason"]["error_types"]:
        samples = tuple(
            (str(sample["request"]["identifier"]), str(sample.get("error_message") or ""))
            for sample in kind.get("sample_errors") or ()
        )
        count = int(kind["error_count"])
        if count < 0:
            raise ValueError(f"negative error_count {count}")
        kinds.append(ErrorType(str(kind["code"])[:100], count, samples))
    return ErrorReport(event_name, stripe_meter_id, tuple(kinds))


def apply_report(connection: Connection, report: ErrorReport, now: datetime) -> list[Applied]:
    """Reject the named rows and add the counts, inside the caller's transaction."""
    applied = []
    for kind in report.error_types:
        event_name = report.event_name or _event_name_of(connection, kind)
        rejected = sum(
            reject_reported(connection, identifier, kind.code, message, now)
            for identifier, message in kind.samples
        )
        last_message = kind.samples[0][1] if kind.samples else None
        _add(connection, event_name, kind, report.stripe_meter_id, rejected, last_message, now)
        applied.append(Applied(event_name, kind.code, kind.error_count, rejected))
    return applied


def _event_name_of(connection: Connection, kind: ErrorType) -> str:
    """A no_meter_found report has no meter: the event name of a named ledger row, or the
    name Stripe's message quotes."""
    identifiers = [identifier for identifier, _ in kind.samples]
    if identifiers:
        found = connection.execute(
            select(ledger.c.event_name).where(ledger.c.identifier.in_(identifiers)).limit(1)
        ).scalar()
        if found:
            return str(found)
    for _, message in kind.samples:
        quoted = _QUOTED.search(message)
        if quoted:
            return quoted.group(1)
    return "unknown"


def _add(
    connection: Connection,
    event_name: str,
    kind: ErrorType,
    stripe_meter_id: str | None,
    rejected: int,
    last_message: str | None,
    now: datetime,
) -> None:
    # Stripe's count includes the samples; a sample that is not ours still counts as unfound.
    unidentified = max(kind.error_count - rejected, 0)
    key = (_c.event_name == event_name, _c.code == kind.code)
    done = connection.execute(
        update(meter_error_counts)
        .where(*key)
        .values(
            errors_total=_c.errors_total + kind.error_count,
            rows_rejected=_c.rows_rejected + rejected,
            unidentified=_c.unidentified + unidentified,
            last_message=last_message,
            last_report_at=now,
        )
    )
    if not done.rowcount:
        connection.execute(
            insert(meter_error_counts).values(
                event_name=event_name,
                code=kind.code,
                stripe_meter_id=stripe_meter_id,
                errors_total=kind.error_count,
                rows_rejected=rejected,
                unidentified=unidentified,
                last_message=last_message,
                last_report_at=now,
            )
        )


def error_counts(connection: Connection) -> list[dict[str, Any]]:
    """Every (event name, code) count, for status and reconcile (one row per meter and code)."""
    found = connection.execute(
        select(meter_error_counts).order_by(_c.event_name, _c.code)
    ).mappings()
    return [dict(row) for row in found]
