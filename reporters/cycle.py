"""One report cycle: resend what is pending, write and send a row per due window.

The (customer, meter) pairs with work are cut into chunks of KEYS_PER_CHUNK. In v1 they run in
a thread pool (SEND_THREADS), all paced by one token bucket; in stream mode one thread writes
the chunks in order while the cycle's own thread sends them. A chunk first writes the rows of
all its due windows in one transaction (bulk statements; every row is committed before any
call). On SQLite the ledger writes take turns on an in-process lock (SQLite has a single
writer).

Per (customer, meter) everything goes in ledger order, one call at a time (Stripe allows one
call in flight per customer and meter, and a ``last`` meter must see its revisions in order):
pending rows first, then the new rows. v1 sends a chunk in rounds: the next row of each of its
pairs is stamped (one committed statement), called one after the other, and the answers are
recorded (acknowledgements in one statement). A row that is still not acknowledged stops its
(customer, meter) for this cycle. In stream mode the written rows go in batches of 100 in the
same order, each batch stamped in one statement before its call; its acceptance and the
stamp of the next batch are one transaction. A batch not accepted ends the sending (the
later batches are neither stamped nor called); the chunks are all written all the same.

Before every call, resends included, a row is checked again: too old for Stripe now (it may
have waited while Stripe was down) -> ``rejected``; first called more than UNKNOWN_AFTER ago
-> ``unknown`` (Stripe may have forgotten its identifier: a resend could bill twice). Then the
attempt is stamped in a committed write, and only then is Stripe called. A crash between the
calls and the acknowledgement leaves rows pending: they are resent with the same identifier and
Idempotency-Key, and Stripe's "already exists" for our identifier marks them sent.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
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
    RowJob,
    send_limit,
    too_old_reason,
    write_row,
    write_rows,
)
from reporters.scheduler import DueWindow, Key, count_due_windows, due_windows
from reporters.status import billing_lag_s
from reporters.stream import MAX_EVENTS_PER_CALL, StreamSender
from reporters.stripe_push import Outcome, StoppedError, StripeAuthError

_log = logging.getLogger(__name__)
SendOne = Callable[[LedgerRow, StripeMeter], Outcome]
# Threads calling Stripe (v1) at once; the token bucket still paces them all. Each holds one
# keep-alive connection, and waits on the network most of the time.
SEND_THREADS = 8
# (customer, meter) pairs whose rows are written, stamped and acknowledged together; a crash
# between the calls and the acknowledgement resends at most this many rows per thread (Stripe
# answers "already exists" for each).
KEYS_PER_CHUNK = 100
# Stream mode: chunks written ahead of the sending (each at most KEYS_PER_CHUNK keys' rows).
STREAM_CHUNKS_AHEAD = 2


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
        workers: int = SEND_THREADS,
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
        # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in
        # steps of 1 to 100 ms (its busy handler); taking turns here instead wakes the next
        # writer the moment the previous one commits. PostgreSQL writers run side by side.
        self._sqlite_turn: AbstractContextManager[object] = (
            threading.Lock() if engine.dialect.name == "sqlite" else nullcontext()
        )

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
        chunks = [keys[i : i + KEYS_PER_CHUNK] for i in range(0, len(keys), KEYS_PER_CHUNK)]
        if self._stream is None:
            with ThreadPoolExecutor(self._workers, thread_name_prefix="reporter") as pool:
                futures = [
                    pool.submit(self._run_chunk, chunk, pending, due, links, result)
                    for chunk in chunks
                ]
                errors = [f.exception() for f in futures]
        else:
            errors = self._stream_chunks(chunks, pending, due, links, result)
        for error in errors:
            if isinstance(error, StripeAuthError):
                raise error
        for error in errors:
            if error is not None:
                _log.error("report cycle failed for some customers and meters", exc_info=error)
        self._finish(result)
        return result

    def _run_chunk(
        self,
        keys: Sequence[Key],
        pending: Mapping[Key, Sequence[LedgerRow]],
        due: Mapping[Key, Sequence[DueWindow]],
        links: Mapping[str, str],
        result: CycleResult,
    ) -> list[LedgerRow]:
        """Write the rows of ``keys``' due windows; in v1 send them (and the pending rows) too.
        Returns the rows to send, in ledger order, for the stream."""
        written = self._write_chunk(keys, due, links, result)
        queues = {key: [*pending.get(key, ()), *written.get(key, ())] for key in keys}
        if self._send_one is not None:
            self._send_rounds(queues, result)
            return []
        return [row for key in keys for row in queues[key]]

    def _write_chunk(
        self,
        keys: Sequence[Key],
        due: Mapping[Key, Sequence[DueWindow]],
        links: Mapping[str, str],
        result: CycleResult,
    ) -> dict[Key, list[LedgerRow]]:
        """Write the rows of ``keys``' due windows in one transaction; the pending ones, per
        (customer, meter), in ledger order."""
        jobs: list[RowJob] = []
        for key in keys:
            for window in due.get(key, ()):
                stripe_customer_id = stripe_customer_for(window.customer_id, links)
                if stripe_customer_id is None:
                    self._hold(Held(window, HELD_NO_CUSTOMER_LINK), result)
                    continue
                meter = self.catalogue.meters[window.meter]
                event_name = self.stripe_meters[window.meter].event_name
                jobs.append(RowJob(window, meter, event_name, stripe_customer_id))
        if self._stop.is_set() or not jobs:
            return {}
        try:
            with self._sqlite_turn:
                outcomes = write_rows(self.engine, jobs, self._clock(), self._horizon_days)
        except IntegrityError:
            # The unique (customer, meter, sequence) index refused a second writer somewhere
            # in the chunk (nothing was written): write key by key to skip only that one.
            with self._sqlite_turn:
                outcomes = self._write_one_by_one(jobs)
        written: dict[Key, list[LedgerRow]] = {}
        for job, outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, Held):
                self._hold(outcome, result)
            elif outcome is not None:
                self._count_written(outcome, result)
                if outcome.status == "pending":
                    written.setdefault(job.window.key, []).append(outcome)
        return written

    def _write_one_by_one(self, jobs: Sequence[RowJob]) -> list[LedgerRow | Held | None]:
        outcomes: list[LedgerRow | Held | None] = []
        refused: set[Key] = set()
        for job in jobs:
            window = job.window
            if window.key in refused:
                outcomes.append(None)
                continue
            try:
                outcomes.append(
                    write_row(
                        self.engine,
                        window,
                        job.meter,
                        job.event_name,
                        job.stripe_customer_id,
                        self._clock(),
                        self._horizon_days,
                    )
                )
            except IntegrityError:
                _log.warning(
                    "another reporter is writing %s %s: skipped here this cycle (run one "
                    "reporter per database)",
                    window.customer_id,
                    window.meter,
                )
                refused.add(window.key)
                outcomes.append(None)
        return outcomes

    def _send_rounds(self, queues: Mapping[Key, Sequence[LedgerRow]], result: CycleResult) -> None:
        """v1: send each (customer, meter)'s rows in order, a round at a time: the next row of
        every pair is stamped in one statement, called, and acknowledged in one statement."""
        assert self._send_one is not None  # noqa: S101  # only called in v1 mode
        waiting = {key: deque(rows) for key, rows in queues.items() if rows}
        while waiting and not self._stop.is_set():
            heads: dict[Key, LedgerRow] = {}
            for key, rows in list(waiting.items()):
                while rows:
                    row = rows.popleft()
                    if self._may_call(row, result):
                        heads[key] = row
                        break
                if not rows:
                    del waiting[key]
            with self._sqlite_turn:
                stamped = ledger.start_attempts(
                    self.engine, [row.identifier for row in heads.values()], self._clock()
                )
            answers: list[tuple[LedgerRow, Outcome]] = []
            try:
                for key, row in heads.items():
                    if row.identifier not in stamped:
                        continue  # settled elsewhere since it was read: not called
                    outcome = self._send_one(row, self.stripe_meters[row.meter])
                    answers.append((row, outcome))
                    if outcome.kind == "retry":
                        waiting.pop(key, None)  # its later rows wait for the next cycle
            except StoppedError:
                return
            finally:
                self._record(answers, "sent", result)

    def _may_call(self, row: LedgerRow, result: CycleResult) -> bool:
        """Check a pending row just before its call (the caller then stamps the attempt,
        committed); False if it must not be called: too old now, or first called too long ago."""
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
        return True

    def _stream_chunks(
        self,
        chunks: Sequence[Sequence[Key]],
        pending: Mapping[Key, Sequence[LedgerRow]],
        due: Mapping[Key, Sequence[DueWindow]],
        links: Mapping[str, str],
        result: CycleResult,
    ) -> list[BaseException | None]:
        """Stream mode: one thread writes the chunks' rows, in order, while this one sends
        them (the calls wait on the network, the writes on the database). Returns the error of
        each chunk that failed to be written (its keys wait for the next cycle)."""
        written: queue.Queue[list[LedgerRow] | None] = queue.Queue(STREAM_CHUNKS_AHEAD)
        errors: list[BaseException | None] = []

        def write_all() -> None:
            try:
                for chunk in chunks:
                    try:
                        written.put(self._run_chunk(chunk, pending, due, links, result))
                    except Exception as exc:  # reported by run_cycle
                        errors.append(exc)
            finally:
                written.put(None)

        writer = threading.Thread(target=write_all, name="reporter-writer", daemon=True)
        writer.start()
        try:
            self._send_stream(iter(written.get, None), result)
        except BaseException:
            # run_cycle will not see the chunks' errors: say them here.
            self._drain(writer, written)
            for error in errors:
                _log.error("report cycle failed for some customers and meters", exc_info=error)
            raise
        self._drain(writer, written)
        return errors

    @staticmethod
    def _drain(writer: threading.Thread, written: queue.Queue[list[LedgerRow] | None]) -> None:
        """Whatever ended the sending, let the writer finish its chunks (they are pending rows
        for the next cycle, as they would have been before any call)."""
        while writer.is_alive():
            with contextlib.suppress(queue.Empty):
                written.get(timeout=0.05)
        writer.join()

    def _send_stream(self, chunks: Iterator[list[LedgerRow]], result: CycleResult) -> None:
        """Rows in ledger order, 100 a call; each batch stamped before its call and
        acknowledged after it, in the transaction that stamps the next batch."""
        assert self._stream is not None  # noqa: S101  # only called in stream mode
        waiting: deque[LedgerRow] = deque()
        batch = self._next_batch(chunks, waiting, result)
        stamped = self._stamp(batch)
        while batch:
            calls = [row for row in batch if row.identifier in stamped]
            if not calls:  # settled elsewhere since they were read: not called
                batch = self._next_batch(chunks, waiting, result)
                stamped = self._stamp(batch)
                continue
            try:
                outcome = self._stream.send_batch(calls, self.stripe_meters)
            except StoppedError:
                return
            try:
                batch = self._next_batch_unless_stopping(chunks, waiting, outcome, result)
            except Exception:
                if outcome.kind == "acknowledged":
                    self._record([(row, outcome) for row in calls], "accepted", result)
                raise
            if outcome.kind == "acknowledged":
                stamped = self._accept_and_stamp(calls, batch, result)
                continue
            self._record([(row, outcome) for row in calls], "accepted", result)
            if outcome.kind == "retry":
                return  # later batches wait: per (customer, meter) order must hold
            stamped = self._stamp(batch)

    def _next_batch_unless_stopping(
        self,
        chunks: Iterator[list[LedgerRow]],
        waiting: deque[LedgerRow],
        outcome: Outcome,
        result: CycleResult,
    ) -> list[LedgerRow]:
        """The next batch, or [] after a failed call or a stop request (nothing more is
        stamped: a stamp starts the row's UNKNOWN_AFTER clock, and it would not be called)."""
        if outcome.kind == "retry" or self._stop.is_set():
            return []
        return self._next_batch(chunks, waiting, result)

    def _next_batch(
        self, chunks: Iterator[list[LedgerRow]], waiting: deque[LedgerRow], result: CycleResult
    ) -> list[LedgerRow]:
        """Up to 100 rows that may be called, in ledger order ([] when none are left)."""
        while len(waiting) < MAX_EVENTS_PER_CALL:
            chunk = next(chunks, None)
            if chunk is None:
                break
            waiting.extend(row for row in chunk if self._may_call(row, result))
        return [waiting.popleft() for _ in range(min(MAX_EVENTS_PER_CALL, len(waiting)))]

    def _stamp(self, batch: Sequence[LedgerRow]) -> set[str]:
        with self._sqlite_turn:
            return ledger.start_attempts(
                self.engine, [row.identifier for row in batch], self._clock()
            )

    def _accept_and_stamp(
        self, accepted: Sequence[LedgerRow], batch: Sequence[LedgerRow], result: CycleResult
    ) -> set[str]:
        """Mark ``accepted`` and stamp the attempts of the next ``batch`` in one transaction
        (one commit a call instead of two); the identifiers of ``batch`` stamped."""
        with self._sqlite_turn:
            marked, stamped = ledger.accept_then_stamp(
                self.engine,
                [row.identifier for row in accepted],
                [row.identifier for row in batch],
                self._clock(),
            )
        self._count_acknowledged(accepted, marked)
        with self._lock:
            result.acknowledged += len(marked)
        return stamped

    def _record(
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
        now = self._clock()
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
        pending = ledger.count_with_status(self.engine, "pending")
        unwritten = count_due_windows(self.engine, self.stripe_meters)
        result.unacknowledged = pending + max(0, unwritten - sum(result.held.values()))
        result.unknown = ledger.count_with_status(self.engine, "unknown")
        self.metrics.pending.set(pending)
        self.metrics.billing_lag.set(billing_lag_s(self.engine, self.catalogue, now))
        self.metrics.last_cycle.set(now.timestamp())
