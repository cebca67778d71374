"""The v2 stream's acceptor: records the accepted calls of a sending lane on a thread of its
own, several calls in one transaction when they queue up, off the calls' path."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from reporters.bookkeeping import Bookkeeper, CycleResult
from reporters.ledger import LedgerRow

_log = logging.getLogger(__name__)
# The most rows the acceptor marks accepted in one transaction.
ACCEPTED_PER_RECORD = 1_000


class Acceptor:
    """Records accepted calls on a thread of its own: all the calls accepted since its last
    record in one transaction (at most ACCEPTED_PER_RECORD rows), so that a commit, not a
    call, is what it costs when the calls outrun it. Each call added has a future: the
    error of the record that took its rows, if that failed (they stay pending and stamped,
    and are resent next cycle under their identifiers, which Stripe deduplicates)."""

    def __init__(self, book: Bookkeeper, result: CycleResult) -> None:
        self._book = book
        self._result = result
        self._accepted: deque[Sequence[LedgerRow]] = deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="reporter-acceptor")
        self.futures: list[Future[None]] = []

    def __enter__(self) -> Acceptor:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._executor.shutdown(wait=True)

    def add(self, calls: Sequence[LedgerRow]) -> None:
        self._accepted.append(calls)
        self.futures.append(self._executor.submit(self._record))

    def _record(self) -> None:
        """Record what is waiting (nothing if an earlier run took it), in pieces of at most
        ACCEPTED_PER_RECORD rows; the first piece that fails is raised, the rest recorded."""
        failed: BaseException | None = None
        while self._accepted:
            rows: list[LedgerRow] = []
            while self._accepted and len(rows) < ACCEPTED_PER_RECORD:
                rows.extend(self._accepted.popleft())
            try:
                self._book.accept_and_stamp(rows, [], self._result)
            except Exception as exc:  # raised once the others are recorded
                failed = failed or exc
        if failed is not None:
            raise failed


def acceptance_failures(futures: Sequence[Future[None]]) -> list[BaseException]:
    """The errors of the acceptances that failed (once all are done), each logged: their
    rows stay pending and stamped, and are resent next cycle under their identifiers
    (Stripe deduplicates them)."""
    failed = [error for future in futures if (error := future.exception()) is not None]
    for error in failed:
        _log.error(
            "an accepted stream call could not be recorded; resent next cycle", exc_info=error
        )
    return failed
