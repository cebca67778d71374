"""v2 stream sending: writer threads write the chunks while sending lanes send them in order.

Each lane on PostgreSQL (one on SQLite) has a writer thread of its own
(reporters/stream_writers.py), which writes its share of the chunks (chunks l, l + lanes,
...: a (customer, meter)'s rows are all in one chunk, so each key's calls keep their order in
one lane), and the lane sends them with one call in flight. Lanes
make calls side by side: Stripe allows concurrent stream calls (10,000 calls/s), and with one
call in flight a stream goes no faster than one call's round trip allows.

The writers write the new rows already stamped (reporters/stream_stamps.py: a stamp of their
own would write every row twice). In a lane, the rows go in batches of 100 in ledger order,
one call at a time, in groups of up to BATCHES_PER_STAMP calls; the rows of a group read
pending from earlier cycles are stamped in one committed statement before the first of them is
called. While a group's calls are made, a bookkeeping thread takes the next group and stamps
it (once the session is checked open: a refused key or a stop leaves it unstamped); its calls
go out once that stamp is committed and this group is done. An
acceptor thread records the accepted calls, several in one transaction when they queue up. A
call not accepted (or a stop, or a session that cannot be renewed before a call) ends the
lane's sending and takes back the stamps of the calls that will not be made (the rest of the
group, the group taken meanwhile, and the rows written stamped that the lane did not reach);
the chunks are all written all the same. A lane that
raises (a refused key, say) ends the other lanes' sending at their next group.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from meterstream.errors import StoppedError, StripeAuthError
from reporters.bookkeeping import Bookkeeper, CycleResult, CycleWork
from reporters.due import Key
from reporters.ledger import LedgerRow
from reporters.stream import MAX_EVENTS_PER_CALL, StreamSender
from reporters.stream_acceptor import Acceptor, acceptance_failures
from reporters.stream_stamps import LaneStamps
from reporters.stream_writers import ChunkWriters, WrittenChunk
from reporters.stripe_push import Outcome

_log = logging.getLogger(__name__)
# (customer, meter) pairs a writer writes in one transaction: a chunk costs about eight round
# trips and a commit whatever its size, and the writers set the stream's pace. 400 measured
# 1.1-1.2x the events/s of 100 (alternated runs; 200 in between), at 0.01 ms less CPU an event.
STREAM_KEYS_PER_CHUNK = 400
# Lanes on PostgreSQL, each a writer and a sender with one call in flight. A lane sends at
# most 100 events a round trip: with Stripe 20 ms away (bench.report.stream --latency-ms) one
# lane sent 3,500 events/s, two 5,500, four 7,200; on the loopback more lanes cost nothing.
# A lane uses up to four connections at once (its writer, its stamps, its acceptor and its
# own records): three lanes stay within the engine's pool of 15 with the webhook thread's.
STREAM_LANES = 3
# Calls (of up to 100 rows) stamped in one committed statement: a commit waits for the disk
# (about 4 ms here), so a stamp per call made the stamps, not the calls, the stream's pace.
# A stop or a failed call takes back the stamps of the rows not called. A crash leaves stamped
# the rows of the group in hand and the next, and the new rows written for the lane but not yet
# called: those of the chunks queued (STREAM_CHUNKS_AHEAD), of the one being written, of the
# one being sent and of the next group's (tests/reporters/test_stream_stamps.py). They count
# as called (reporters/stream_stamps.py).
BATCHES_PER_STAMP = 4
# The outcome of a batch whose rows were all settled elsewhere since they were read (no call:
# the stream goes on).
_NOTHING_CALLED = Outcome("acknowledged")


class V2StreamSender:
    """Sends the rows in batches over ``stream`` (the v2 meter event stream's client)."""

    def __init__(self, stream: StreamSender) -> None:
        self.stream = stream
        self.keys_per_chunk = STREAM_KEYS_PER_CHUNK
        self.lanes = STREAM_LANES  # on PostgreSQL; SQLite has one

    def send(
        self,
        book: Bookkeeper,
        chunks: Sequence[Sequence[Key]],
        work: CycleWork,
        result: CycleResult,
    ) -> list[BaseException | None]:
        """Writer threads write the chunks' rows while the lanes send them, each lane its
        writer's chunks in order (the calls wait on the network, the writes on the
        database). Returns the error of each chunk that failed to be written (its keys wait
        for the next cycle)."""
        # PostgreSQL writes chunks side by side (their keys are disjoint; the written-rows
        # counter has a row per connection's slot); SQLite has a single writer.
        count = self.lanes if book.engine.dialect.name == "postgresql" else 1
        ended = threading.Event()  # a lane raised: the others end at their next call
        writers = ChunkWriters(book, chunks, work, result, count, ended)
        try:
            with ThreadPoolExecutor(count - 1 or 1, thread_name_prefix="reporter-lane") as pool:
                lanes = [
                    pool.submit(
                        self._send_lane,
                        book,
                        writers.chunks_of(n),
                        result,
                        ended,
                        writers.lanes_done[n],
                    )
                    for n in range(1, count)
                ]
                failed: list[BaseException] = []
                try:
                    self._send_lane(
                        book, writers.chunks_of(0), result, ended, writers.lanes_done[0]
                    )
                except BaseException as exc:  # raised below, once the other lanes end
                    failed.append(exc)
                failed += [error for lane in lanes if (error := lane.exception()) is not None]
            if failed:
                raise _most_telling(failed)
        except BaseException:
            # run_cycle will not see the chunks' errors: say them here.
            writers.drain()
            for error in writers.errors:
                _log.error("report cycle failed for some customers and meters", exc_info=error)
            raise
        writers.drain()
        return writers.errors

    def _send_lane(
        self,
        book: Bookkeeper,
        chunks: Iterator[WrittenChunk],
        result: CycleResult,
        ended: threading.Event,
        done: threading.Event,
    ) -> None:
        """One lane's sending; if it raises, ``ended`` tells the other lanes to end too.
        Whatever ends it, ``done`` is set and the stamps it holds for calls not made are taken
        back."""
        stamps = LaneStamps(book)
        try:
            self._send_stream(book, stamps, chunks, result, ended)
        except BaseException:
            ended.set()
            raise
        finally:
            done.set()
            stamps.take_back_rest()

    def _send_stream(
        self,
        book: Bookkeeper,
        stamps: LaneStamps,
        chunks: Iterator[WrittenChunk],
        result: CycleResult,
        ended: threading.Event,
    ) -> None:
        """Rows in ledger order, 100 a call, one call at a time, in groups of up to
        BATCHES_PER_STAMP calls, those not written stamped stamped in one committed
        statement. While a group's calls go out, a bookkeeping thread takes the next group
        and stamps it; the next group's calls go out once its stamp is committed and this
        group is done. Accepted calls are recorded by an acceptor thread, off that path. A
        call not accepted (or a stop) ends the sending and takes back the stamps of the
        calls that will not be made."""
        waiting: deque[LedgerRow] = deque()
        group = self._next_group(book, stamps, chunks, waiting, result)
        if ended.is_set() or not self._ready(_rows_of(group)):
            return  # the group's stamps are among those the lane takes back
        stamped = stamps.stamp(_rows_of(group))
        acceptor = Acceptor(book, result)
        try:
            with (
                ThreadPoolExecutor(1, thread_name_prefix="reporter-bookkeeper") as bookkeeper,
                acceptor,
            ):
                while group:
                    # The session is checked open before a group's first call too: a group
                    # not called (its session not renewed, a stop) is unstamped here.
                    if not self._session_open(stamps, _rows_of(group)):
                        break
                    more = not (book.stop.is_set() or ended.is_set())
                    prepared = bookkeeper.submit(
                        self._prepare_next, book, stamps, chunks, waiting, more, result
                    )
                    try:
                        done = self._call_group(
                            book, stamps, group, stamped, acceptor, result, ended
                        )
                    except BaseException:  # a refused key, say: the group taken is not called
                        ended.set()  # first: the other lanes end at their next call
                        self._take_back(stamps, prepared)
                        raise
                    group, stamped = prepared.result()
                    if not done:  # a stop, or a call not accepted: nothing more goes out
                        stamps.unstamp(_rows_of(group))
                        break
        finally:
            failed = acceptance_failures(acceptor.futures)
        if failed:
            raise failed[0]

    def _call_group(
        self,
        book: Bookkeeper,
        stamps: LaneStamps,
        group: Sequence[list[LedgerRow]],
        stamped: set[str],
        acceptor: Acceptor,
        result: CycleResult,
        ended: threading.Event,
    ) -> bool:
        """Call the group's batches in order; False if the sending ends (a stop, another
        lane's error, or a call not accepted), the stamps of the batches not called taken
        back."""
        for n, batch in enumerate(group):
            if n and not self._session_open(stamps, _rows_of(group[n:])):
                return False
            calls = [row for row in batch if row.identifier in stamped]
            try:
                outcome = self._call(book, stamps, calls)
                if outcome is not None and outcome.kind == "acknowledged" and calls:
                    acceptor.add(calls)
                elif outcome is not None:
                    book.record([(row, outcome) for row in calls], "accepted", result)
            except BaseException:  # a refused key, or an answer not recorded
                ended.set()  # first: the other lanes end after the call they have in flight
                stamps.unstamp(_rows_of(group[n + 1 :]))
                raise
            if outcome is None:  # a stop came before the call: its stamps are taken back
                stamps.unstamp(_rows_of(group[n + 1 :]))
                return False
            if outcome.kind == "retry" or book.stop.is_set() or ended.is_set():
                # Later batches wait (per (customer, meter) order must hold): the stamps of
                # those taken are taken back, as they will not be called.
                stamps.unstamp(_rows_of(group[n + 1 :]))
                return False
        return True

    def _session_open(self, stamps: LaneStamps, not_called: Sequence[LedgerRow]) -> bool:
        """Whether the session is open for the group's next call (checked on this thread:
        its renewal is a call to Stripe, and it may be due between two calls of a group, or
        before a group's first); if not, the stamps of ``not_called`` are taken back, and a
        refused key raises StripeAuthError."""
        try:
            if self.stream.ready():
                return True
        except StoppedError:
            pass
        except BaseException:
            stamps.unstamp(not_called)
            raise
        stamps.unstamp(not_called)
        return False

    @staticmethod
    def _take_back(
        stamps: LaneStamps, prepared: Future[tuple[list[list[LedgerRow]], set[str]]]
    ) -> None:
        """Once the bookkeeping thread is done, take back the stamps of the group it took."""
        try:
            group, _stamped = prepared.result()
        except Exception:  # nothing was stamped; the caller's error is the one to report
            return
        stamps.unstamp(_rows_of(group))

    def _call(
        self, book: Bookkeeper, stamps: LaneStamps, calls: Sequence[LedgerRow]
    ) -> Outcome | None:
        """Send ``calls`` (all settled elsewhere since they were read: no call, the stream
        goes on); None if a stop came before the call was made (its stamps taken back), a
        retry if it came once the call was made (its stamps kept: Stripe may have it)."""
        if not calls:
            return _NOTHING_CALLED
        try:
            outcome = self.stream.send_batch(calls, book.stripe_meters)
        except StoppedError as stopped:
            if not stopped.after_a_call:
                stamps.unstamp(calls)  # raised before the call: Stripe has nothing
                return None
            outcome = Outcome("retry", error=str(stopped))
        except BaseException:
            stamps.called(calls)  # a refused key, say: the call was made
            raise
        stamps.called(calls)
        return outcome

    def _prepare_next(
        self,
        book: Bookkeeper,
        stamps: LaneStamps,
        chunks: Iterator[WrittenChunk],
        waiting: deque[LedgerRow],
        more: bool,
        result: CycleResult,
    ) -> tuple[list[list[LedgerRow]], set[str]]:
        """On the bookkeeping thread: the next group of batches ([] if ``more`` is False or
        none is left), stamped (those not written stamped: in one committed statement)."""
        group = self._next_group(book, stamps, chunks, waiting, result) if more else []
        if not group:
            return group, set()
        return group, stamps.stamp(_rows_of(group))

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

    @classmethod
    def _next_group(
        cls,
        book: Bookkeeper,
        stamps: LaneStamps,
        chunks: Iterator[WrittenChunk],
        waiting: deque[LedgerRow],
        result: CycleResult,
    ) -> list[list[LedgerRow]]:
        """Up to BATCHES_PER_STAMP batches, in ledger order ([] when none are left)."""
        group: list[list[LedgerRow]] = []
        while len(group) < BATCHES_PER_STAMP:
            batch = cls._next_batch(book, stamps, chunks, waiting, result)
            if not batch:
                break
            group.append(batch)
        return group

    @staticmethod
    def _next_batch(
        book: Bookkeeper,
        stamps: LaneStamps,
        chunks: Iterator[WrittenChunk],
        waiting: deque[LedgerRow],
        result: CycleResult,
    ) -> list[LedgerRow]:
        """Up to 100 rows that may be called, in ledger order ([] when none are left)."""
        while len(waiting) < MAX_EVENTS_PER_CALL:
            chunk = next(chunks, None)
            if chunk is None:
                break
            stamps.add_written(chunk.stamped)
            waiting.extend(
                row for row in chunk.rows if book.may_call(row, result, stamps.stamped_here(row))
            )
        return [waiting.popleft() for _ in range(min(MAX_EVENTS_PER_CALL, len(waiting)))]


def _rows_of(group: Sequence[Sequence[LedgerRow]]) -> list[LedgerRow]:
    return [row for batch in group for row in batch]


def _most_telling(failed: Sequence[BaseException]) -> BaseException:
    """The error the cycle raises when lanes failed: a refused key first (it stops the
    reporter), else the first; the others are logged."""
    chosen = next((e for e in failed if isinstance(e, StripeAuthError)), failed[0])
    for error in failed:
        if error is not chosen:
            _log.error("a sending lane failed", exc_info=error)
    return chosen
