"""Windows the reporter holds back are set aside in the report queue, not read every cycle.

A window is held when its customer has no Stripe link, its correction is negative on a meter
that forbids it, its revision went back, or a ``last`` meter's revision finds no later second
in its window. Nothing in the next cycle changes that, so re-reading it every cycle only costs
(and, before, pinned the billing lag at the oldest held window). Its queue row is marked held
(``held_reason``, ``held_revision``, ``held_since``, ``checked_at``) in a write guarded by the
revision read, so a change committed meanwhile is never hidden. A cycle skips a held row until:

- the window gets a new revision (the aggregators write ``revision`` only: it no longer equals
  ``held_revision``);
- its customer is linked (``meterstream customers link`` clears the customer's holds in the
  link's transaction, and a hold for want of a link is not written once the link is
  committed, though the cycle read the links before it);
- RECHECK_AFTER has passed since ``checked_at``: a cycle takes back at most RECHECK_PER_CYCLE
  of those, oldest first (a link written around ``customers link``, say).

Usage held this way has its own gauges and alert (``meterstream_reporter_held_windows``,
``meterstream_reporter_held_oldest_age_seconds``, MeterstreamUsageHeld); the billing lag
measures what could be sent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import Connection, Engine, and_, exists, func, select, update

from meterstream.metrics import ReporterMetrics
from meterstream.schema import customer_links, report_queue, window_totals
from reporters.due import IS_HELD, DueWindow
from reporters.rows import (
    HELD_NEGATIVE_CORRECTION,
    HELD_NO_CUSTOMER_LINK,
    HELD_NO_LATER_TIMESTAMP,
    HELD_REVISION_WENT_BACK,
    Held,
)

_log = logging.getLogger(__name__)

SET_ASIDE = frozenset(
    {
        HELD_NO_CUSTOMER_LINK,
        HELD_NEGATIVE_CORRECTION,
        HELD_REVISION_WENT_BACK,
        HELD_NO_LATER_TIMESTAMP,
    }
)
RECHECK_AFTER = timedelta(hours=1)

_q = report_queue.c
_links = customer_links.c


def set_aside(engine: Engine, held: Iterable[tuple[DueWindow, str]], now: datetime) -> set[int]:
    """Mark the queue rows of ``held`` (window, reason) held, each only while its revision is
    still the one read; the indexes (in ``held``'s order) held for the first time at that
    revision and reason (to count and log once), the others were re-checks."""
    first: set[int] = set()
    # In key order, as the aggregators and settle lock the queue's rows (no deadlock): a
    # chunk's holds come in two runs (no customer link, then the rows' own).
    in_key_order = sorted(enumerate(held), key=lambda item: _queue_key(item[1][0]))
    with engine.begin() as connection:
        for index, (window, reason) in in_key_order:
            if window.queued is None or reason not in SET_ASIDE:
                continue
            key = and_(
                _q.customer_id == window.customer_id,
                _q.meter == window.meter,
                _q.window_start == window.window_start,
                _q.combination_digest == window.combination_digest,
                _q.revision == window.queued,
            )
            if reason == HELD_NO_CUSTOMER_LINK:
                # The cycle read the links at its start; a link committed since (its
                # release_customer found nothing held yet) must not be met by a hold that
                # then waits for the slow re-check.
                key = and_(key, ~exists().where(_links.customer_id == window.customer_id))
            again = connection.execute(
                update(report_queue)
                .where(key, _q.held_revision == window.queued, _q.held_reason == reason)
                .values(checked_at=now)
            ).rowcount
            if again:
                continue
            marked = connection.execute(
                update(report_queue)
                .where(key)
                .values(
                    held_reason=reason,
                    held_revision=window.queued,
                    held_since=func.coalesce(_q.held_since, now),
                    checked_at=now,
                )
            ).rowcount
            if marked:
                first.add(index)
    return first


def _queue_key(window: DueWindow) -> tuple[str, str, datetime, bytes]:
    return (window.customer_id, window.meter, window.window_start, window.combination_digest)


def set_aside_and_count(
    engine: Engine, metrics: ReporterMetrics, held: Sequence[Held], now: datetime
) -> None:
    """set_aside, then count and log each hold once per revision and reason (not once per
    cycle). Key failures are not set aside and not counted here: they have their own
    counter, per (customer, meter) and reason (meterstream_reporter_key_failures_total)."""
    first = set_aside(engine, [(item.window, item.reason) for item in held], now)
    for index in sorted(first):
        window, reason = held[index].window, held[index].reason
        metrics.held.labels(reason=reason).inc()
        _log.warning(
            "held %s %s window %s revision %s: %s",
            window.customer_id,
            window.meter,
            window.window_start.isoformat(),
            window.revision,
            reason,
        )


def release_customer(connection: Connection, customer_id: str) -> int:
    """Bring back every window held for ``customer_id`` (in the caller's transaction, e.g.
    the link's); how many."""
    return int(
        connection.execute(
            update(report_queue)
            .where(_q.customer_id == customer_id, _q.held_revision.is_not(None))
            .values(held_reason=None, held_revision=None, held_since=None, checked_at=None)
        ).rowcount
        or 0
    )


@dataclass
class HeldUsage:
    """The windows set aside: how many per reason, and since when the oldest is held."""

    windows: dict[str, int] = field(default_factory=dict)
    oldest_since: datetime | None = None

    def oldest_age_s(self, now: datetime) -> float:
        return (
            0.0
            if self.oldest_since is None
            else max(0.0, (now - self.oldest_since).total_seconds())
        )


def held_usage_summary(engine: Engine, meters: Iterable[str]) -> HeldUsage:
    """Count the held windows per reason (a GROUP BY of the queue's held rows)."""
    summary = HeldUsage()
    with engine.connect() as connection:
        found = connection.execute(
            select(_q.held_reason, func.count(), func.min(_q.held_since))
            .where(IS_HELD, _q.meter.in_(list(meters)))
            .group_by(_q.held_reason)
        ).all()
    for reason, count, since in found:
        summary.windows[str(reason)] = int(count)
        if since is not None and (summary.oldest_since is None or since < summary.oldest_since):
            summary.oldest_since = since
    return summary


@dataclass(frozen=True, slots=True)
class HeldWindow:
    customer_id: str
    meter: str
    window_start: datetime
    revision: int
    total: Decimal
    reason: str
    held_since: datetime
    combination: str = ""  # the dimension values' key (meterstream.dimensions), '' for none


def held_windows(engine: Engine, meters: Iterable[str], limit: int) -> list[HeldWindow]:
    """The ``limit`` oldest held windows, for people (``meterstream status``)."""
    wt = window_totals.c
    with engine.connect() as connection:
        found = connection.execute(
            select(
                _q.customer_id,
                _q.meter,
                _q.window_start,
                _q.revision,
                wt.value,
                _q.held_reason,
                _q.held_since,
                _q.combination,
            )
            .select_from(
                report_queue.join(
                    window_totals,
                    and_(
                        wt.customer_id == _q.customer_id,
                        wt.meter == _q.meter,
                        wt.window_start == _q.window_start,
                        wt.combination_digest == _q.combination_digest,
                    ),
                )
            )
            .where(IS_HELD, _q.meter.in_(list(meters)))
            .order_by(_q.held_since, _q.customer_id, _q.meter, _q.window_start)
            .limit(limit)
        ).all()
    return [
        HeldWindow(c, m, start, int(revision), value, str(reason), since, combination)
        for c, m, start, revision, value, reason, since, combination in found
    ]
