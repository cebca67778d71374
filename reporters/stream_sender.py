"""v2 stream sending: writer threads write the chunks while the cycle's thread sends them in order.

The written rows go in batches of 100 in ledger order, one call at a time. While a call is in
flight, a bookkeeping thread takes the next batch and stamps it in one committed statement
(once the session is checked open: a refused key or a stop leaves it unstamped); the next
call goes out once that stamp is committed and this call is answered. An acceptor thread
records each accepted call. A batch not accepted (or a stop) ends the sending and takes back
the stamp of the batch taken meanwhile (the later batches are neither stamped nor called);
the chunks are all written all the same."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime

from meterstream.errors import StoppedError
from reporters.bookkeeping import Bookkeeper, CycleResult, CycleWork
from reporters.due import Key
from reporters.ledger import LedgerRow
from reporters.stream import MAX_EVENTS_PER_CALL, StreamSender
from reporters.stripe_push import Outcome

_log = logging.getLogger(__name__)
# Chunks each writer writes ahead of the sending (each at most KEYS_PER_CHUNK keys' rows).
STREAM_CHUNKS_AHEAD = 2
# Writer threads on PostgreSQL: in a catch-up one writer (about 30 ms a chunk of 100 rows, mostly
# waiting on the server) was slower than the sending; two keep ahead of it.
STREAM_WRITERS = 2
# The outcome of a batch whose rows were all settled elsewhere since they were read (no call:
# the stream goes on).
_NOTHING_CALLED = Outcome("acknowledged")


class V2StreamSender:
    """Sends the rows in batches over ``stream`` (the v2 meter event stream's client)."""

    def __init__(self, stream: StreamSender) -> None:
        self.stream = stream

    def send(
        self,
        book: Bookkeeper,
        chunks: Sequence[Sequence[Key]],
        work: CycleWork,
        result: CycleResult,
    ) -> list[BaseException | None]:
        """Writer threads write the chunks' rows while this one sends them, in chunk order
        (the calls wait on the network, the writes on the database). Returns the error of
        each chunk that failed to be written (its keys wait for the next cycle)."""
        # PostgreSQL writes chunks side by side (their keys are disjoint; only the
        # deployment row's counter is shared, taken last); SQLite has a single writer.
        count = STREAM_WRITERS if book.engine.dialect.name == "postgresql" else 1
        written: list[queue.Queue[list[LedgerRow] | None]] = [
            queue.Queue(STREAM_CHUNKS_AHEAD) for _ in range(count)
        ]
        errors: list[BaseException | None] = []

        def write_share(share: int) -> None:
            """Chunks share, share + count, ... in order, each into this writer's queue (an
            empty list for a chunk that failed, so the sender stays in step)."""
            try:
                for chunk in chunks[share::count]:
                    try:
                        queues = book.rows_to_send(chunk, work, result)
                        rows = [row for key in chunk for row in queues[key]]
                    except Exception as exc:  # reported by run_cycle
                        errors.append(exc)
                        rows = []
                    written[share].put(rows)
            finally:
                written[share].put(None)

        writers = [
            threading.Thread(
                target=write_share, args=(n,), name=f"reporter-writer-{n}", daemon=True
            )
            for n in range(count)
        ]
        for writer in writers:
            writer.start()
        try:
            self._send_stream(book, _in_order(written, len(chunks)), result)
        except BaseException:
            # run_cycle will not see the chunks' errors: say them here.
            self._drain(writers, written)
            for error in errors:
                _log.error("report cycle failed for some customers and meters", exc_info=error)
            raise
        self._drain(writers, written)
        return errors

    @staticmethod
    def _drain(
        writers: Sequence[threading.Thread], written: Sequence[queue.Queue[list[LedgerRow] | None]]
    ) -> None:
        """Whatever ended the sending, let the writers finish their chunks (they are pending
        rows for the next cycle, as they would have been before any call)."""
        while any(writer.is_alive() for writer in writers):
            for share in written:
                with contextlib.suppress(queue.Empty):
                    share.get(timeout=0.02)
        for writer in writers:
            writer.join()

    def _send_stream(
        self, book: Bookkeeper, chunks: Iterator[list[LedgerRow]], result: CycleResult
    ) -> None:
        """Rows in ledger order, 100 a call, one call at a time. While a call is in flight, a
        bookkeeping thread takes the next batch and stamps it (committed); the next call goes
        out once its stamp is committed and this call is answered. An accepted call is
        recorded by an acceptor thread, off that path. A call not accepted (or a stop) ends
        the sending and takes back the stamp of the batch that will not be called."""
        waiting: deque[LedgerRow] = deque()
        batch = self._next_batch(book, chunks, waiting, result)
        if not self._ready(batch):
            return
        stamped, stamped_at = book.stamp_call(batch)
        acceptances: list[Future[object]] = []
        try:
            with (
                ThreadPoolExecutor(1, thread_name_prefix="reporter-bookkeeper") as bookkeeper,
                ThreadPoolExecutor(1, thread_name_prefix="reporter-acceptor") as acceptor,
            ):
                while batch:
                    calls = [row for row in batch if row.identifier in stamped]
                    more = not book.stop.is_set() and self._session_ready(book, calls, stamped_at)
                    prepared = bookkeeper.submit(
                        self._prepare_next, book, chunks, waiting, more, result
                    )
                    try:
                        outcome = self._call(book, calls, stamped_at)
                    except BaseException:  # a refused key, say: the batch taken is not called
                        self._take_back(book, prepared)
                        raise
                    if outcome is not None and outcome.kind == "acknowledged" and calls:
                        acceptances.append(
                            acceptor.submit(book.accept_and_stamp, calls, [], result)
                        )
                    batch, stamped, stamped_at = prepared.result()
                    if outcome is None:  # a stop came before the call: nothing more goes out
                        book.unstamp(batch, stamped_at)
                        return
                    if outcome.kind != "acknowledged":
                        book.record([(row, outcome) for row in calls], "accepted", result)
                    if outcome.kind == "retry" or book.stop.is_set():
                        # Later batches wait (per (customer, meter) order must hold): the
                        # stamp of the one taken is taken back, as it will not be called.
                        book.unstamp(batch, stamped_at)
                        break
        finally:
            failed = _failures(acceptances)
        if failed:
            raise failed[0]

    def _session_ready(
        self, book: Bookkeeper, calls: Sequence[LedgerRow], stamped_at: datetime
    ) -> bool:
        """Whether a batch may be stamped for the call after ``calls`` (checked on this
        thread: the session's renewal is a call to Stripe); a refused key takes back the
        stamps of ``calls``, not yet called, and raises StripeAuthError."""
        try:
            return self.stream.ready()
        except StoppedError:
            return False
        except BaseException:
            book.unstamp(calls, stamped_at)
            raise

    @staticmethod
    def _take_back(
        book: Bookkeeper, prepared: Future[tuple[list[LedgerRow], set[str], datetime]]
    ) -> None:
        """Once the bookkeeping thread is done, take back the stamp of the batch it took."""
        try:
            batch, _stamped, stamped_at = prepared.result()
        except Exception:  # nothing was stamped; the caller's error is the one to report
            return
        book.unstamp(batch, stamped_at)

    def _call(
        self, book: Bookkeeper, calls: Sequence[LedgerRow], stamped_at: datetime
    ) -> Outcome | None:
        """Send ``calls`` (all settled elsewhere since they were read: no call, the stream
        goes on); None if a stop came before the call was made (its stamps taken back)."""
        if not calls:
            return _NOTHING_CALLED
        try:
            return self.stream.send_batch(calls, book.stripe_meters)
        except StoppedError:
            book.unstamp(calls, stamped_at)  # raised before the call: Stripe has nothing
            return None

    def _prepare_next(
        self,
        book: Bookkeeper,
        chunks: Iterator[list[LedgerRow]],
        waiting: deque[LedgerRow],
        more: bool,
        result: CycleResult,
    ) -> tuple[list[LedgerRow], set[str], datetime]:
        """On the bookkeeping thread: the next batch ([] if ``more`` is False or none is
        left), stamped in one committed statement."""
        batch = self._next_batch(book, chunks, waiting, result) if more else []
        if not batch:
            return batch, set(), book.clock()
        stamped, stamped_at = book.stamp_call(batch)
        return batch, stamped, stamped_at

    def _ready(self, batch: Sequence[LedgerRow]) -> bool:
        """Whether ``batch`` may be stamped: empty, or its session is open. False when the
        session cannot be opened now or a stop came while opening it; raises StripeAuthError
        when the key is refused."""
        if not batch:
            return True
        try:
            return self.stream.ready()
        except StoppedError:
            return False

    @staticmethod
    def _next_batch(
        book: Bookkeeper,
        chunks: Iterator[list[LedgerRow]],
        waiting: deque[LedgerRow],
        result: CycleResult,
    ) -> list[LedgerRow]:
        """Up to 100 rows that may be called, in ledger order ([] when none are left)."""
        while len(waiting) < MAX_EVENTS_PER_CALL:
            chunk = next(chunks, None)
            if chunk is None:
                break
            waiting.extend(row for row in chunk if book.may_call(row, result))
        return [waiting.popleft() for _ in range(min(MAX_EVENTS_PER_CALL, len(waiting)))]


def _in_order(
    written: Sequence[queue.Queue[list[LedgerRow] | None]], chunks: int
) -> Iterator[list[LedgerRow]]:
    """The chunks' rows in chunk order, chunk n from writer n % len(written); ends early if a
    writer ended early (its None), since its later chunks will never come."""
    for n in range(chunks):
        rows = written[n % len(written)].get()
        if rows is None:
            return
        yield rows


def _failures(acceptances: Sequence[Future[object]]) -> list[BaseException]:
    """The errors of the acceptances that failed, each logged: their rows stay pending and
    stamped, and are resent next cycle under their identifiers (Stripe deduplicates them)."""
    failed = [error for done in acceptances if (error := done.exception()) is not None]
    for error in failed:
        _log.error(
            "an accepted stream call could not be recorded; resent next cycle", exc_info=error
        )
    return failed
