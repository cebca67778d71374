"""v2 stream sending: writer threads write the chunks while the cycle's thread sends them in order.

The written rows go in batches of 100 in ledger order, each batch stamped in one statement
just before its call, once its session is open (a refused key or a stop while opening it
leaves the batch unstamped); its acceptance and the stamp of the next batch are one
transaction. A batch not accepted ends the sending (the later batches are neither stamped
nor called); the chunks are all written all the same."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence

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
        """Rows in ledger order, 100 a call; each batch stamped just before its call, once
        its session is open (a key refused or a stop while opening it leaves the batch
        unstamped), and acknowledged after it, in the transaction that stamps the next."""
        waiting: deque[LedgerRow] = deque()
        batch = self._next_batch(book, chunks, waiting, result)
        if not self._ready(batch):
            return
        stamped, stamped_at = book.stamp_call(batch)
        while batch:
            calls = [row for row in batch if row.identifier in stamped]
            if not calls:  # settled elsewhere since they were read: not called
                batch = self._next_batch(book, chunks, waiting, result)
                if not self._ready(batch):
                    return
                stamped, stamped_at = book.stamp_call(batch)
                continue
            try:
                outcome = self.stream.send_batch(calls, book.stripe_meters)
            except StoppedError:
                book.unstamp(calls, stamped_at)  # raised before the call: Stripe has nothing
                return
            try:
                batch = self._next_batch_unless_stopping(book, chunks, waiting, outcome, result)
                if not self._ready(batch):
                    batch = []
            except Exception:
                if outcome.kind == "acknowledged":
                    book.record([(row, outcome) for row in calls], "accepted", result)
                raise
            if outcome.kind == "acknowledged":
                stamped, stamped_at = book.accept_and_stamp(calls, batch, result)
                continue
            book.record([(row, outcome) for row in calls], "accepted", result)
            if outcome.kind == "retry":
                return  # later batches wait: per (customer, meter) order must hold
            stamped, stamped_at = book.stamp_call(batch)

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

    def _next_batch_unless_stopping(
        self,
        book: Bookkeeper,
        chunks: Iterator[list[LedgerRow]],
        waiting: deque[LedgerRow],
        outcome: Outcome,
        result: CycleResult,
    ) -> list[LedgerRow]:
        """The next batch, or [] after a failed call or a stop request (nothing more is
        stamped: a stamp starts the row's UNKNOWN_AFTER clock, and it would not be called)."""
        if outcome.kind == "retry" or book.stop.is_set():
            return []
        return self._next_batch(book, chunks, waiting, result)

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
