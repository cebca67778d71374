"""What both ways of sending share in a cycle: writing a chunk's rows, the check before each
call, the stamp, and recording the answers in the ledger, the metrics and the CycleResult.
One class past 400 lines: each step reads and writes the same CycleResult and metrics under
one lock, which a split would have to pass around.

A chunk first writes the rows of all its due windows in one transaction (bulk statements;
every row is committed before any call). On SQLite the ledger writes take turns on an
in-process lock (SQLite has a single writer).

Before every call, resends included, a row is checked again (``may_call``): too old for Stripe
now (it may have waited while Stripe was down) -> ``rejected`` if never called, ``unknown`` if
called before (Stripe may have it: billing it by hand could bill twice); first called more
than UNKNOWN_AFTER ago -> ``unknown`` (Stripe may have forgotten its identifier: a resend could
bill twice). Then the attempt is stamped in a committed write, and only then is Stripe called
(the v2 stream writes its new rows stamped: reporters/stream_stamps.py).

A failure that belongs to one (customer, meter) holds that key (``hold_key``: a reason from
rows.KEY_FAILURES, a metric, the held_keys table for ``meterstream status``) and every other
key is sent as usual: one bad key never stops the cycle.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from meterstream.errors import ConfigError
from meterstream.horizon import HORIZON_MARGIN
from meterstream.meters import Catalogue
from meterstream.metrics import ReporterMetrics
from reporters import ledger
from reporters.customers import stripe_customer_for
from reporters.due import DueWindow, Key
from reporters.held_windows import set_aside_and_count
from reporters.ledger import LedgerRow
from reporters.meters_check import StripeMeter
from reporters.rows import (
    HELD_METER_NOT_IN_CATALOGUE,
    HELD_NO_CUSTOMER_LINK,
    KEY_FAILURES,
    TOO_OLD_CODE,
    Held,
    RowJob,
    send_limit,
    too_old_reason,
    write_row,
    write_rows,
)
from reporters.stripe_push import Outcome

_log = logging.getLogger(__name__)


@dataclass
class CycleResult:
    """What one cycle did; ``unacknowledged`` counts due usage Stripe has not acknowledged
    (pending rows and due windows not written), held usage apart; ``rejected`` counts rows
    rejected in this cycle; ``unknown`` counts every ledger row in status unknown."""

    acknowledged: int = 0
    rejected: int = 0
    carried: int = 0
    held: dict[str, int] = field(default_factory=dict)
    unacknowledged: int = 0
    unknown: int = 0
    # (customer, meter) -> (reason, detail): keys not sent this cycle for a failure of their
    # own (reasons in rows.KEY_FAILURES); every other key was sent as usual.
    held_keys: dict[Key, tuple[str, str]] = field(default_factory=dict)

    @property
    def needs_a_person(self) -> bool:
        """Usage held, rejected or unknown: rerunning the reporter will not send it."""
        return bool(self.rejected or self.held or self.unknown or self.held_keys)


@dataclass(frozen=True)
class CycleWork:
    """What a cycle found to do, per (customer, meter): due windows and pending rows; and
    the customer links (meterstream customer id -> Stripe customer id)."""

    due: Mapping[Key, Sequence[DueWindow]]
    pending: Mapping[Key, Sequence[LedgerRow]]
    links: Mapping[str, str]


class Bookkeeper:
    """The ledger side of sending: rows written, checked, stamped and settled, and counted.
    Holds no state between cycles but the key failures still held that it has counted
    (held windows are counted through the queue's held state, not a set in memory)."""

    def __init__(
        self,
        engine: Engine,
        catalogue: Catalogue,
        stripe_meters: Mapping[str, StripeMeter],
        metrics: ReporterMetrics,
        *,
        clock: Callable[[], datetime],
        stop: threading.Event,
        horizon_days: int,
        deployment_id: str,
    ) -> None:
        if timedelta(days=horizon_days) <= HORIZON_MARGIN:
            raise ConfigError(
                f"METERSTREAM_HORIZON_DAYS={horizon_days} leaves no time to send after the "
                f"{HORIZON_MARGIN.days}-day intake margin; use 2 to 35 (Stripe's limit is 35)"
            )
        self.engine = engine
        self.catalogue = catalogue
        self.stripe_meters = stripe_meters
        self.metrics = metrics
        self.clock = clock
        self.stop = stop
        self._horizon_days = horizon_days
        self.deployment_id = deployment_id
        self._keys_counted: set[tuple[Key, str]] = set()
        self._lock = threading.Lock()
        # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in
        # steps of 1 to 100 ms (its busy handler); taking turns here instead wakes the next
        # writer the moment the previous one commits. PostgreSQL writers run side by side.
        self._sqlite_turn: AbstractContextManager[object] = (
            threading.Lock() if engine.dialect.name == "sqlite" else nullcontext()
        )

    def rows_to_send(
        self, keys: Sequence[Key], work: CycleWork, result: CycleResult, stamped: bool = False
    ) -> dict[Key, list[LedgerRow]]:
        """Write the rows of ``keys``' due windows; per key, its pending rows then the new
        ones, in ledger order (the order they must be called in). ``stamped``: the new rows
        are written with their first attempt stamped (rows.decide_row), for a sender that
        calls them right away and takes back the stamps of those it does not call."""
        written = self._write_chunk(keys, work, result, stamped)
        queues: dict[Key, list[LedgerRow]] = {}
        for key in keys:
            pending = work.pending.get(key, ())
            if pending and key[1] not in self.stripe_meters:
                # Removed or renamed in the catalogue with rows still to send: neither stamped
                # nor called (a stamp would start their UNKNOWN_AFTER clock for nothing).
                self.hold_key(
                    key,
                    HELD_METER_NOT_IN_CATALOGUE,
                    f"{len(pending)} pending row(s) for meter {key[1]!r}, which is no longer "
                    "in the catalogue (METERSTREAM_METERS_FILE); put it back until they are "
                    "sent, or settle them by hand",
                    result,
                )
                queues[key] = []
                continue
            queues[key] = [*pending, *written.get(key, ())]
        return queues

    def hold_key(self, key: Key, reason: str, detail: str, result: CycleResult) -> None:
        """Hold one (customer, meter) for a failure of its own; the others go on."""
        with self._lock:
            if key in result.held_keys:
                return
            result.held_keys[key] = (reason, detail)
            first_time = (key, reason) not in self._keys_counted
            self._keys_counted.add((key, reason))
        if first_time:
            self.metrics.key_failures.labels(reason=reason).inc()
        _log.error("held %s %s: %s: %s", key[0], key[1], reason, detail)

    def forget_released(self, held: Mapping[Key, tuple[str, str]]) -> None:
        """Forget the counted key failures no longer held: the set stays as small as ``held``."""
        with self._lock:
            self._keys_counted = {
                (key, reason)
                for key, reason in self._keys_counted
                if held.get(key, ("",))[0] == reason
            }

    def _write_chunk(
        self, keys: Sequence[Key], work: CycleWork, result: CycleResult, stamped: bool
    ) -> dict[Key, list[LedgerRow]]:
        """Write the rows of ``keys``' due windows in one transaction; the pending ones, per
        (customer, meter), in ledger order."""
        jobs: list[RowJob] = []
        held: list[Held] = []
        for key in keys:
            for window in work.due.get(key, ()):
                stripe_customer_id = stripe_customer_for(window.customer_id, work.links)
                if stripe_customer_id is None:
                    held.append(Held(window, HELD_NO_CUSTOMER_LINK))
                    continue
                meter = self.catalogue.meters[window.meter]
                event_name = self.stripe_meters[window.meter].event_name
                jobs.append(
                    RowJob(window, meter, event_name, stripe_customer_id, self.deployment_id)
                )
        if self.stop.is_set() or not jobs:
            self._hold(held, result)
            return {}
        try:
            with self._sqlite_turn:
                outcomes = write_rows(self.engine, jobs, self.clock(), self._horizon_days, stamped)
        except IntegrityError:
            # The unique (customer, meter, sequence) index refused a second writer somewhere
            # in the chunk (nothing was written): write key by key to skip only that one.
            with self._sqlite_turn:
                outcomes = self._write_one_by_one(jobs, stamped)
        written: dict[Key, list[LedgerRow]] = {}
        for job, outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, Held):
                held.append(outcome)
                if outcome.reason in KEY_FAILURES:
                    self.hold_key(job.window.key, outcome.reason, outcome.detail, result)
            elif outcome is not None:
                self._count_written(outcome, result)
                if outcome.status == "pending":
                    written.setdefault(job.window.key, []).append(outcome)
        try:
            self._hold(held, result)
        except Exception:
            # After the rows' commit: they go on to their calls all the same.
            _log.exception(
                "%d held window(s) not set aside; they are looked at again next cycle", len(held)
            )
        return written

    def _write_one_by_one(
        self, jobs: Sequence[RowJob], stamped: bool
    ) -> list[LedgerRow | Held | None]:
        outcomes: list[LedgerRow | Held | None] = []
        refused: set[Key] = set()
        failed: dict[Key, Held] = {}
        for job in jobs:
            window = job.window
            if window.key in refused:
                outcomes.append(None)
                continue
            if window.key in failed:  # held: its later windows wait with it, as in write_rows
                held = failed[window.key]
                outcomes.append(Held(window, held.reason, 0, held.detail))
                continue
            try:
                outcomes.append(
                    write_row(
                        self.engine,
                        window,
                        job.meter,
                        job.event_name,
                        job.stripe_customer_id,
                        self.clock(),
                        self._horizon_days,
                        self.deployment_id,
                        stamped,
                    )
                )
                written = outcomes[-1]
                if isinstance(written, Held) and written.reason in KEY_FAILURES:
                    failed[window.key] = written
            except IntegrityError:
                _log.warning(
                    "another reporter is writing %s %s: skipped here this cycle (run one "
                    "reporter per database)",
                    window.customer_id,
                    window.meter,
                )
                refused.add(window.key)
                outcomes.append(None)
            except Exception:
                # The rows written so far are committed (stamped, for the stream): they go
                # on to their calls; the rest wait for the next cycle.
                _log.exception(
                    "writing the ledger rows of %d due window(s) failed; they wait for the "
                    "next cycle",
                    len(jobs) - len(outcomes),
                )
                outcomes += [None] * (len(jobs) - len(outcomes))
                break
        return outcomes

    def may_call(self, row: LedgerRow, result: CycleResult, stamped_here: bool = False) -> bool:
        """Check a pending row just before its call (the caller then stamps the attempt,
        committed); False if it must not be called: too old now, or first called too long ago.
        ``stamped_here``: the row's one stamp is the one it was written with this cycle, and
        it was not called since: checked as a row never called."""
        now = self.clock()
        first = None if stamped_here else row.first_attempt_at
        too_old = row.timestamp < send_limit(now, self._horizon_days)
        if too_old and first is not None:
            # Called before with no answer: Stripe may hold it, so "bill by hand" could bill
            # twice. Unknown: reconcile decides from Stripe's summaries (sent, or pending
            # again with no stamp, and then rejected here as never sent).
            reason = (
                f"first sent at {first.isoformat()} with no answer, and now too old for "
                "Stripe to take again: Stripe may have it, so neither resent nor to be billed "
                "by hand yet; run meterstream reconcile to check Stripe's summaries"
            )
            self._mark_unknown(row, reason, "resend_window_expired", now)
            return False
        if too_old:
            reason = too_old_reason(
                row.window_start, row.window_end, row.timestamp, row.value, self._horizon_days
            )
            if ledger.mark_rejected(self.engine, row.identifier, TOO_OLD_CODE, reason, None, now):
                self._count_rejected(row, TOO_OLD_CODE, reason, result)
            return False
        if first is not None and now - first > ledger.UNKNOWN_AFTER:
            reason = (
                f"first sent at {first.isoformat()}, more than "
                f"{ledger.UNKNOWN_AFTER.total_seconds() / 3600:.0f} h ago, with no answer: Stripe "
                "may have forgotten its identifier, so a resend could bill twice. Not resent; "
                "run meterstream reconcile to check Stripe's summaries"
            )
            self._mark_unknown(row, reason, "resend_window_expired", now)
            return False
        return True

    def _mark_unknown(self, row: LedgerRow, reason: str, held_reason: str, now: datetime) -> None:
        """Make a pending row ``unknown`` (reconcile decides), counted and said once: nothing
        if it was settled elsewhere meanwhile."""
        if ledger.mark_unknown(self.engine, row.identifier, reason, now):
            self.metrics.held.labels(reason=held_reason).inc()
            _log.error(
                "meter event %s (%s %s): %s", row.identifier, row.customer_id, row.meter, reason
            )

    def stamp_call(self, rows: Collection[LedgerRow]) -> set[str]:
        """Stamp the attempts of the rows of one call, made right after (one committed
        statement); the identifiers stamped (the others are no longer pending: do not call
        them)."""
        with self._sqlite_turn:
            return ledger.start_attempts(self.engine, [r.identifier for r in rows], self.clock())

    def unstamp(self, rows: Collection[LedgerRow]) -> None:
        """Take back the stamps of rows whose call was never made (a stop request), each
        stamped once (a stamp taken back twice would erase another's)."""
        if not rows:
            return
        with self._sqlite_turn:
            ledger.undo_attempts(self.engine, [row.identifier for row in rows], self.clock())

    def accept_and_stamp(
        self, accepted: Sequence[LedgerRow], batch: Sequence[LedgerRow], result: CycleResult
    ) -> tuple[set[str], datetime]:
        """Mark ``accepted`` and stamp the attempts of the next ``batch`` (to be called right
        after) in one transaction (one commit a call instead of two); the identifiers of
        ``batch`` stamped, and the stamp's time."""
        now = self.clock()
        with self._sqlite_turn:
            marked, stamped = ledger.accept_then_stamp(
                self.engine,
                [row.identifier for row in accepted],
                [row.identifier for row in batch],
                now,
            )
        self._count_acknowledged(accepted, marked)
        with self._lock:
            result.acknowledged += len(marked)
        return stamped, now

    def record(
        self,
        answers: Sequence[tuple[LedgerRow, Outcome]],
        status: ledger.Status,
        result: CycleResult,
    ) -> None:
        """Record the answers: acknowledgements in one statement, the rest row by row."""
        with self._sqlite_turn:
            marked = self._record_locked(answers, status, result)
        with self._lock:
            result.acknowledged += len(marked)

    def _record_locked(
        self,
        answers: Sequence[tuple[LedgerRow, Outcome]],
        status: ledger.Status,
        result: CycleResult,
    ) -> set[str]:
        now = self.clock()
        acknowledged = {
            row.identifier: outcome.request_id
            for row, outcome in answers
            if outcome.kind == "acknowledged"
        }
        marked = ledger.mark_all_acknowledged(self.engine, acknowledged, status, now)
        self._count_acknowledged([row for row, o in answers if o.kind == "acknowledged"], marked)
        for row, outcome in answers:
            if outcome.kind == "acknowledged":
                continue
            if outcome.kind == "unknown":
                reason = (
                    f"Stripe answered {outcome.code}: {outcome.error}; it may hold this event "
                    "(the answer says the identifier is taken, in words not known to be about "
                    "ours), so it is neither resent nor to be billed by hand; run meterstream "
                    "reconcile to check Stripe's summaries"
                )
                self._mark_unknown(row, reason, "duplicate_unconfirmed", now)
                continue
            if outcome.kind == "rejected":
                code, message = outcome.code or "unknown", outcome.error or ""
                if ledger.mark_rejected(
                    self.engine, row.identifier, code, message, outcome.request_id, now
                ):
                    self._count_rejected(row, code, message, result)
            else:
                ledger.mark_attempt(self.engine, row.identifier, outcome.error or "", now)
                _log.warning(
                    "meter event %s (%s %s) not acknowledged, stays pending: %s",
                    row.identifier,
                    row.customer_id,
                    row.meter,
                    outcome.error,
                )
        return marked

    def _count_acknowledged(self, rows: Sequence[LedgerRow], marked: Collection[str]) -> None:
        """Count in the metrics the rows of ``rows`` that ``marked`` holds."""
        for row in rows:
            if row.identifier in marked:
                self.metrics.sent.labels(meter=row.meter).inc()
            else:
                _log.warning("meter event %s was settled elsewhere", row.identifier)

    def _count_rejected(self, row: LedgerRow, code: str, message: str, result: CycleResult) -> None:
        self.metrics.rejected.labels(code=code).inc()
        _log.warning(
            "meter event %s (%s %s) rejected: %s: %s",
            row.identifier,
            row.customer_id,
            row.meter,
            code,
            message,
        )
        with self._lock:
            result.rejected += 1

    def _count_written(self, row: LedgerRow, result: CycleResult) -> None:
        if row.status == "rejected":
            self.metrics.rejected.labels(code=row.error_code or "unknown").inc()
            _log.warning("meter event %s not sent: %s", row.identifier, row.last_error)
        with self._lock:
            result.rejected += row.status == "rejected"
            result.carried += row.status == "carried"

    def _hold(self, held: Sequence[Held], result: CycleResult) -> None:
        """Count this cycle's holds; set aside the windows (reporters/held_windows.py)."""
        if not held:
            return
        with self._lock:
            for item in held:
                result.held[item.reason] = result.held.get(item.reason, 0) + 1
        with self._sqlite_turn:
            set_aside_and_count(self.engine, self.metrics, held, self.clock())
