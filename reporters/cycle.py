"""One report cycle: resend what is pending, write and send a row per due window.

Per (customer, meter) everything goes in ledger order, one call at a time (Stripe allows one
call in flight per customer and meter, and a ``last`` meter must see its revisions in order):
pending rows first, then the due windows oldest first. A row that is still not acknowledged
stops its (customer, meter) for this cycle. Different (customer, meter) pairs run in a small
thread pool, all paced by one token bucket. In stream mode rows are written first, then sent
in batches of 100 in the same order.

Before every call, resends included, a row is checked again: too old for Stripe now (it may
have waited while Stripe was down) -> ``rejected``; first called more than UNKNOWN_AFTER ago
-> ``unknown`` (Stripe may have forgotten its identifier: a resend could bill twice). Then the
attempt is stamped in a committed write, and only then is Stripe called.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from meterstream.errors import ConfigError
from meterstream.meters import Catalogue
from meterstream.metrics import ReporterMetrics
from reporters import ledger
from reporters.customers import load_links, stripe_customer_for
from reporters.ledger import LedgerRow
from reporters.meters_check import StripeMeter
from reporters.rows import (
    HELD_NO_CUSTOMER_LINK,
    SEND_MARGIN,
    TOO_OLD_CODE,
    Held,
    send_limit,
    too_old_reason,
    write_row,
)
from reporters.scheduler import DueWindow, Key, due_windows
from reporters.status import billing_lag_s
from reporters.stream import MAX_EVENTS_PER_CALL, StreamSender
from reporters.stripe_push import Outcome, StoppedError, StripeAuthError

_log = logging.getLogger(__name__)
SendOne = Callable[[LedgerRow, StripeMeter], Outcome]


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

    @property
    def needs_a_person(self) -> bool:
        """Usage held, rejected or unknown: rerunning the reporter will not send it."""
        return bool(self.rejected or self.held or self.unknown)


class Reporter:
    """Runs report cycles; holds no state between them but what it has already counted."""

    def __init__(
        self,
        engine: Engine,
        catalogue: Catalogue,
        stripe_meters: Mapping[str, StripeMeter],
        metrics: ReporterMetrics,
        *,
        send_one: SendOne | None,
        stream: StreamSender | None,
        clock: Callable[[], datetime],
        stop: threading.Event,
        horizon_days: int,
        workers: int = 4,
    ) -> None:
        if (send_one is None) == (stream is None):
            raise ValueError("give exactly one of send_one (v1) and stream (v2)")
        if horizon_days <= SEND_MARGIN.days:
            raise ConfigError(
                f"METERSTREAM_HORIZON_DAYS={horizon_days} leaves no time to send after the "
                f"{SEND_MARGIN.days}-day safety margin; use 2 to 35 (Stripe's limit is 35)"
            )
        self.engine = engine
        self.catalogue = catalogue
        self.stripe_meters = stripe_meters
        self.metrics = metrics
        self._send_one = send_one
        self._stream = stream
        self._clock = clock
        self._stop = stop
        self._horizon_days = horizon_days
        self._workers = workers
        self._held_counted: set[tuple[str, str, datetime, int, str]] = set()
        self._lock = threading.Lock()

    def run_cycle(self) -> CycleResult:
        """One cycle. Raises StripeAuthError if Stripe refuses the key; everything else is
        recorded in the ledger and the metrics and retried next cycle."""
        result = CycleResult()
        links = load_links(self.engine)
        due = due_windows(self.engine, self.stripe_meters)
        pending: dict[Key, list[LedgerRow]] = {}
        for row in ledger.pending_rows(self.engine):
            pending.setdefault((row.customer_id, row.meter), []).append(row)
        keys = sorted(set(due) | set(pending))
        with ThreadPoolExecutor(self._workers, thread_name_prefix="reporter") as pool:
            futures = [
                pool.submit(self._run_key, pending.get(k, []), due.get(k, []), links, result)
                for k in keys
            ]
            errors = [f.exception() for f in futures]
        if self._stream is not None and not self._stop.is_set():
            self._send_stream(result)
        for error in errors:
            if isinstance(error, StripeAuthError):
                raise error
        for error in errors:
            if error is not None:
                _log.error("report cycle failed for one customer and meter", exc_info=error)
        self._finish(result)
        return result

    def _run_key(
        self,
        pending: Sequence[LedgerRow],
        windows: Sequence[DueWindow],
        links: Mapping[str, str],
        result: CycleResult,
    ) -> None:
        sending = self._send_one is not None
        for row in pending if sending else ():
            if not self._send(row, result):
                return
        for window in windows:
            if self._stop.is_set():
                return
            meter = self.catalogue.meters[window.meter]
            stripe_customer_id = stripe_customer_for(window.customer_id, links)
            if stripe_customer_id is None:
                self._hold(Held(window, HELD_NO_CUSTOMER_LINK), result)
                continue
            try:
                written = write_row(
                    self.engine,
                    window,
                    meter,
                    self.stripe_meters[window.meter].event_name,
                    stripe_customer_id,
                    self._clock(),
                    self._horizon_days,
                )
            except IntegrityError:
                # The unique (customer, meter, sequence) index refused a second writer.
                _log.warning(
                    "another reporter is writing %s %s: skipped here this cycle (run one "
                    "reporter per database)",
                    window.customer_id,
                    window.meter,
                )
                return
            if isinstance(written, Held):
                self._hold(written, result)
            elif written is not None:
                self._count_written(written, result)
                if written.status == "pending" and sending and not self._send(written, result):
                    return

    def _send(self, row: LedgerRow, result: CycleResult) -> bool:
        """Send one row and record the answer; False if its (customer, meter) must wait."""
        assert self._send_one is not None  # noqa: S101  # only called in v1 mode
        if not self._may_call(row, result):
            return True
        try:
            outcome = self._send_one(row, self.stripe_meters[row.meter])
        except StoppedError:
            return False
        self._record([row], outcome, "sent", result)
        return outcome.kind != "retry"

    def _may_call(self, row: LedgerRow, result: CycleResult) -> bool:
        """Check a pending row just before its call and stamp the attempt (committed);
        False if it must not be called: too old now, first called too long ago, or settled."""
        now = self._clock()
        if row.timestamp < send_limit(now, self._horizon_days):
            reason = too_old_reason(
                row.window_start, row.window_end, row.timestamp, row.value, self._horizon_days
            )
            if ledger.mark_rejected(self.engine, row.identifier, TOO_OLD_CODE, reason, None, now):
                self._count_rejected(row, TOO_OLD_CODE, reason, result)
            return False
        first = row.first_attempt_at
        if first is not None and now - first > ledger.UNKNOWN_AFTER:
            reason = (
                f"first sent at {first.isoformat()}, more than "
                f"{ledger.UNKNOWN_AFTER.total_seconds() / 3600:.0f} h ago, with no answer: Stripe "
                "may have forgotten its identifier, so a resend could bill twice. Not resent; "
                "run meterstream reconcile to check Stripe's summaries"
            )
            if ledger.mark_unknown(self.engine, row.identifier, reason, now):
                self.metrics.held.labels(reason="resend_window_expired").inc()
                _log.error(
                    "meter event %s (%s %s): %s", row.identifier, row.customer_id, row.meter, reason
                )
            return False
        return ledger.start_attempt(self.engine, row.identifier, now)

    def _send_stream(self, result: CycleResult) -> None:
        assert self._stream is not None  # noqa: S101  # only called in stream mode
        rows = [r for r in ledger.pending_rows(self.engine) if self._may_call(r, result)]
        for start in range(0, len(rows), MAX_EVENTS_PER_CALL):
            batch = rows[start : start + MAX_EVENTS_PER_CALL]
            try:
                outcome = self._stream.send_batch(batch, self.stripe_meters)
            except StoppedError:
                return
            self._record(batch, outcome, "accepted", result)
            if outcome.kind == "retry":
                return  # later batches wait: per (customer, meter) order must hold

    def _record(
        self,
        rows: Sequence[LedgerRow],
        outcome: Outcome,
        status: ledger.Status,
        result: CycleResult,
    ) -> None:
        now = self._clock()
        for row in rows:
            if outcome.kind == "acknowledged":
                if ledger.mark_acknowledged(
                    self.engine, row.identifier, status, outcome.request_id, now
                ):
                    self.metrics.sent.labels(meter=row.meter).inc()
                    with self._lock:
                        result.acknowledged += 1
                else:
                    _log.warning("meter event %s was settled elsewhere", row.identifier)
            elif outcome.kind == "rejected":
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

    def _hold(self, held: Held, result: CycleResult) -> None:
        window = held.window
        seen = (window.customer_id, window.meter, window.window_start, window.revision, held.reason)
        with self._lock:
            result.held[held.reason] = result.held.get(held.reason, 0) + 1
            first_time = seen not in self._held_counted
            self._held_counted.add(seen)
        if first_time:
            # Counted once per revision, not once per cycle, so the counter means "reports
            # held", not "cycles spent holding them".
            self.metrics.held.labels(reason=held.reason).inc()
            _log.warning(
                "held %s %s window %s revision %s: %s",
                window.customer_id,
                window.meter,
                window.window_start.isoformat(),
                window.revision,
                held.reason,
            )

    def _finish(self, result: CycleResult) -> None:
        now = self._clock()
        pending = len(ledger.pending_rows(self.engine))
        unwritten = sum(len(w) for w in due_windows(self.engine, self.stripe_meters).values())
        result.unacknowledged = pending + max(0, unwritten - sum(result.held.values()))
        result.unknown = len(ledger.rows_with_status(self.engine, "unknown"))
        self.metrics.pending.set(pending)
        self.metrics.billing_lag.set(billing_lag_s(self.engine, self.catalogue, now))
        self.metrics.last_cycle.set(now.timestamp())
