"""v1 sending: one meter event a call, chunks on a thread pool, each chunk in rounds.

The chunks run in a thread pool (SEND_THREADS), all paced by one Pacer. A chunk writes its
rows, then sends them in rounds: the next row of each of its (customer, meter) pairs is
stamped just before its own call (a committed statement: a row is stamped only if it is really
called), the calls go one after the other, and the round's answers are recorded together
(acknowledgements in one statement). A row that is still not acknowledged stops its
(customer, meter) for this cycle; a call that fails for one (customer, meter) holds it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from meterstream.errors import StoppedError, StripeAuthError
from reporters.bookkeeping import Bookkeeper, CycleResult, CycleWork
from reporters.due import Key
from reporters.ledger import LedgerRow
from reporters.meters_check import StripeMeter
from reporters.rows import HELD_CALL_FAILED
from reporters.stripe_push import Outcome

SendOne = Callable[[LedgerRow, StripeMeter], Outcome]
# Threads calling Stripe (v1) at once; the pacer still paces them all. Each holds one
# keep-alive connection, and waits on the network most of the time: a thread makes at most
# 1 / (call time) calls a second, so the rate needs rate x call time threads (400 calls/s at
# 150 ms a call: 60), never fewer than SEND_THREADS and never more than MAX_SEND_THREADS.
SEND_THREADS = 8
# (customer, meter) pairs whose rows are written, stamped and acknowledged together; a crash
# between the calls and the acknowledgement resends at most this many rows per thread (Stripe
# answers "already exists" for each).
V1_KEYS_PER_CHUNK = 100
MAX_SEND_THREADS = 64
ASSUMED_CALL_S = 0.15


def send_threads(rate_per_s: float) -> int:
    """Threads enough for ``rate_per_s`` calls a second (more would only queue at the pacer)."""
    needed = math.ceil(rate_per_s * ASSUMED_CALL_S)
    return max(1, min(MAX_SEND_THREADS, max(needed, min(SEND_THREADS, math.ceil(rate_per_s)))))


class V1Sender:
    """Sends each row with ``send_one`` (a v1 meter event call), ``workers`` chunks at once."""

    def __init__(self, send_one: SendOne, *, workers: int = SEND_THREADS) -> None:
        self.send_one = send_one
        self.workers = workers
        self.keys_per_chunk = V1_KEYS_PER_CHUNK

    def send(
        self,
        book: Bookkeeper,
        chunks: Sequence[Sequence[Key]],
        work: CycleWork,
        result: CycleResult,
    ) -> list[BaseException | None]:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="reporter") as pool:
            futures = [pool.submit(self._run_chunk, book, chunk, work, result) for chunk in chunks]
            return [f.exception() for f in futures]

    def _run_chunk(
        self, book: Bookkeeper, keys: Sequence[Key], work: CycleWork, result: CycleResult
    ) -> None:
        self._send_rounds(book, book.rows_to_send(keys, work, result), result)

    def _send_rounds(
        self, book: Bookkeeper, queues: Mapping[Key, Sequence[LedgerRow]], result: CycleResult
    ) -> None:
        """Send each (customer, meter)'s rows in order, a round at a time: the next row of
        every pair is stamped just before its own call, and the round's answers are recorded
        together (acknowledgements in one statement)."""
        waiting = {key: deque(rows) for key, rows in queues.items() if rows}
        while waiting and not book.stop.is_set():
            heads: dict[Key, LedgerRow] = {}
            for key, rows in list(waiting.items()):
                while rows:
                    row = rows.popleft()
                    if book.may_call(row, result):
                        heads[key] = row
                        break
                if not rows:
                    del waiting[key]
            answers: list[tuple[LedgerRow, Outcome]] = []
            try:
                for key, row in heads.items():
                    outcome = self._call(book, key, row, result)
                    if outcome is None:
                        continue  # settled elsewhere since it was read: not called
                    answers.append((row, outcome))
                    if outcome.kind == "retry":
                        waiting.pop(key, None)  # its later rows wait for the next cycle
            except StoppedError:
                return
            finally:
                book.record(answers, "sent", result)

    def _call(
        self, book: Bookkeeper, key: Key, row: LedgerRow, result: CycleResult
    ) -> Outcome | None:
        """Stamp ``row`` (committed) and call Stripe with it: the stamp says "Stripe may have
        it" only of a call really made. None if it is no longer pending."""
        if book.stop.is_set():
            raise StoppedError("stop requested before the call")  # no stamp to take back
        stamped = book.stamp_call([row])
        if row.identifier not in stamped:
            return None
        try:
            return self.send_one(row, book.stripe_meters[row.meter])
        except StoppedError as stopped:
            if not stopped.after_a_call:  # raised before the call: Stripe has nothing
                book.unstamp([row])
            raise
        except StripeAuthError:
            raise  # the key, not the row: the cycle stops (this call was made and refused)
        except Exception as exc:
            # A failure of this (customer, meter) alone: hold it, send the others.
            book.hold_key(key, HELD_CALL_FAILED, f"{type(exc).__name__}: {exc}", result)
            return Outcome("retry", error=f"{type(exc).__name__}: {exc}")
