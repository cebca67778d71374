"""Holding all sending when the database was restored, until a person accepts it.

The check (before every cycle): the ledger rows ever written against the newest mark
(reporters/marks.py). Behind -> RestoredLedgerError: nothing is sent, the hold is written to
the ``deployment`` table for ``meterstream status``, and the gauge
``meterstream_reporter_ledger_rows_behind_mark`` says how far. Resending or re-deriving rows
from a restored ledger could bill twice or take a different amount for "already exists".

``accept`` (``meterstream report --accept-restore``, after ``meterstream reconcile``): the
database gets a new deployment id, so no new identifier can meet one Stripe already holds from
the lost rows, and the mark is re-based to the ledger as it is.

A crash after a cycle's calls and before its mark, followed by a restore to just before that
cycle, goes unseen: the mark is written once per cycle, not per call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, func, select, update

from meterstream.deployment import new_deployment_id, stored_deployment_id
from meterstream.errors import ConfigError, RestoredLedgerError
from meterstream.metrics import ReporterMetrics
from meterstream.schema import deployment, ledger_rows_written
from reporters.marks import MarkStore

_log = logging.getLogger(__name__)


def ledger_rows(engine: Engine) -> int:
    """Ledger rows ever written in this database: only grows (retention prunes rows, not this
    count), except by a restore. A few rows read (one a slot), however long the ledger."""
    with engine.connect() as connection:
        written = connection.execute(select(func.sum(ledger_rows_written.c.rows))).scalar()
        return int(written or 0)


@dataclass(frozen=True, slots=True)
class RestoreHold:
    """A hold written by the reporter, for status: when, and the mark it found."""

    held_at: datetime
    ledger_rows: int
    mark_rows: int


def restore_hold(engine: Engine) -> RestoreHold | None:
    """The hold the reporter recorded in this database, None when sending is not held."""
    with engine.connect() as connection:
        found = connection.execute(
            select(deployment.c.restore_held_at, deployment.c.restore_mark_rows)
        ).first()
    if found is None or found.restore_held_at is None:
        return None
    return RestoreHold(found.restore_held_at, ledger_rows(engine), found.restore_mark_rows or 0)


class RestoreGuard:
    """Checks the ledger against its mark before a cycle and moves the mark after it."""

    def __init__(
        self,
        engine: Engine,
        marks: MarkStore,
        deployment_id: str,
        metrics: ReporterMetrics,
        clock: Callable[[], datetime],
        current_id: Callable[[], str] | None = None,
    ) -> None:
        self.engine = engine
        # How to find the deployment id now: a restore accepted by another process changes it
        # under this one, which must then restart rather than write rows with the old id.
        self._current_id = current_id
        self.marks = marks
        self.deployment_id = deployment_id
        self.metrics = metrics
        self.clock = clock
        self._mark: int | None = None  # the highest mark read or written by this process
        self._hold_cleared = False  # a hold recorded before (by any process) is lifted

    def check(self) -> int:
        """The ledger's row count, if it is not behind its mark.

        Reads the mark from Kafka the first time (and while held: a person may have accepted
        the restore from another process). Raises RestoredLedgerError (and records the hold)
        when behind, BrokerUnavailableError when the mark cannot be read.
        """
        if self._mark is None:
            self._check_same_deployment()
            self._mark = self.marks.read(self.deployment_id)
        rows = ledger_rows(self.engine)
        behind = 0 if self._mark is None else max(0, self._mark - rows)
        self.metrics.rows_behind_mark.set(behind)
        if behind and self._mark is not None:
            mark, self._mark = self._mark, None  # read it again next time
            self._record_hold(mark)
            self._hold_cleared = False
            raise RestoredLedgerError(self.deployment_id, rows, mark)
        if not self._hold_cleared:  # one write per process, not one per cycle
            self._clear_hold()
            self._hold_cleared = True
        return rows

    def _check_same_deployment(self) -> None:
        now_id = self._current_id() if self._current_id is not None else self.deployment_id
        if now_id != self.deployment_id:
            raise ConfigError(
                f"the deployment id changed from {self.deployment_id} to {now_id} while this "
                "reporter ran (a restore was accepted): restart the reporter so that it writes "
                "identifiers with the new id"
            )

    def publish(self) -> None:
        """Write the ledger's row count as the new mark, if it grew (after a cycle's commits)."""
        rows = ledger_rows(self.engine)
        if self._mark is not None and rows <= self._mark:
            return
        self.marks.write(self.deployment_id, rows, self.clock())
        self._mark = rows

    def _record_hold(self, mark: int) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                update(deployment)
                .where(deployment.c.restore_held_at.is_(None))
                .values(restore_held_at=self.clock(), restore_mark_rows=mark)
            )

    def _clear_hold(self) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                update(deployment)
                .where(deployment.c.restore_held_at.is_not(None))
                .values(restore_held_at=None, restore_mark_rows=None)
            )


def accept_restore(
    engine: Engine, marks: MarkStore, overridden: bool, now: datetime
) -> tuple[str, str, int]:
    """Accept a restored ledger: a new deployment id, the mark re-based on the ledger as it
    is, the hold lifted. Returns (old id, new id, ledger rows).

    Raises ConfigError when METERSTREAM_DEPLOYMENT_ID overrides the stored id: the operator
    then names a new one instead (a new id has no mark, so nothing is held).
    """
    if overridden:
        raise ConfigError(
            "METERSTREAM_DEPLOYMENT_ID is set, so --accept-restore cannot give this database a "
            "new id: after meterstream reconcile, set METERSTREAM_DEPLOYMENT_ID to a name not "
            "used before (new identifiers must not meet those Stripe holds) and run the reporter"
        )
    old = stored_deployment_id(engine)
    new = new_deployment_id()
    rows = ledger_rows(engine)
    marks.write(new, rows, now)
    with engine.begin() as connection:
        connection.execute(
            update(deployment).values(
                deployment_id=new, restore_held_at=None, restore_mark_rows=None
            )
        )
    _log.warning(
        "restore accepted: deployment %s is now %s, mark re-based to %d ledger rows",
        old,
        new,
        rows,
    )
    return old, new, rows
