"""The backstop: now and then, compare every window total with the ledger, as cycles once did.

The report queue (reporters/due.py) is meant to miss nothing; this checks that it did not, off
the cycle's path (every METERSTREAM_REPORT_BACKSTOP_S, and ``meterstream report --once
--backstop``). Its cost grows with history (a scan of window_totals and a GROUP BY of the
ledger), which is why cycles do not run it. A due window with no queue row is queued, so the
next cycle reports it, and counted in ``meterstream_reporter_backstop_found_total``: anything
but 0 means some writer changed window_totals without queueing the change (a bug, or a manual
edit of the table), and the alert MeterstreamReportQueueMissed says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sqlalchemy import Engine, and_, exists, func, select
from sqlalchemy.dialects import postgresql, sqlite

from meterstream.schema import ledger, report_queue, window_totals

_log = logging.getLogger(__name__)


def queue_missed(engine: Engine, meters: Iterable[str]) -> int:
    """Queue every due window of ``meters`` that has no queue row; how many there were.

    One statement, so one snapshot: a worker commits a window and its queue row together, and
    the reporter a ledger row and the queue row's deletion together, so a due window without a
    queue row in that snapshot is a real miss, never a race.
    """
    wt, q = window_totals.c, report_queue.c
    reported = (
        select(
            ledger.c.customer_id,
            ledger.c.meter,
            ledger.c.window_start,
            ledger.c.combination_digest,
            func.max(ledger.c.revision).label("revision"),
        )
        .group_by(
            ledger.c.customer_id,
            ledger.c.meter,
            ledger.c.window_start,
            ledger.c.combination_digest,
        )
        .subquery()
    )
    missed = (
        select(
            wt.customer_id,
            wt.meter,
            wt.window_start,
            wt.combination,
            wt.combination_digest,
            wt.revision,
        )
        .select_from(
            window_totals.outerjoin(
                reported,
                and_(
                    reported.c.customer_id == wt.customer_id,
                    reported.c.meter == wt.meter,
                    reported.c.window_start == wt.window_start,
                    reported.c.combination_digest == wt.combination_digest,
                ),
            )
        )
        .where(
            wt.meter.in_(list(meters)),
            wt.revision != func.coalesce(reported.c.revision, 0),
            ~exists().where(
                q.customer_id == wt.customer_id,
                q.meter == wt.meter,
                q.window_start == wt.window_start,
                q.combination_digest == wt.combination_digest,
            ),
        )
    )
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(report_queue)
        .from_select(
            [
                "customer_id",
                "meter",
                "window_start",
                "combination",
                "combination_digest",
                "revision",
            ],
            missed,
        )
        .on_conflict_do_nothing()
        .returning(q.customer_id, q.meter, q.window_start, q.revision)
    )
    with engine.begin() as connection:
        found = connection.execute(statement).all()
    for customer_id, meter, window_start, revision in found[:10]:
        _log.error(
            "backstop: %s %s window %s revision %s was due but not queued (a writer changed "
            "window_totals without queueing the change); queued now",
            customer_id,
            meter,
            window_start.isoformat(),
            revision,
        )
    if len(found) > 10:
        _log.error("backstop: %d more windows were due but not queued", len(found) - 10)
    return len(found)
