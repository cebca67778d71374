"""A v2 stream lane's stamps: which of its rows may be called, and which stamps to take back.

The stream writes its new rows already stamped (rows.decide_row ``stamped``): their calls go
out within seconds, and a stamp of their own would write every row a second time. The rows
read pending from earlier cycles are stamped by group, in one committed statement, just
before their calls, as v1 stamps each row. A stamp written with a row is taken back when the
row is not called after all (a stop, a call not accepted, the cycle ended by another lane),
like a group's; until then the row counts as never called (``Bookkeeper.may_call``).

A crash between the write and the call leaves such a stamp: the row then counts as called,
which costs nothing when it is resent (Stripe deduplicates its identifier) and, if it waits
past UNKNOWN_AFTER or the horizon, makes it ``unknown``, which reconcile settles from Stripe's
summaries; it never bills twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable

from reporters.bookkeeping import Bookkeeper
from reporters.ledger import LedgerRow

_log = logging.getLogger(__name__)


class LaneStamps:
    """The stamps of one lane's rows. ``written`` rows keep the stamp they were written with
    until they are called (``called``) or it is taken back (``unstamp``, ``take_back_rest``):
    each stamp is taken back at most once (a second time would take another's)."""

    def __init__(self, book: Bookkeeper) -> None:
        self._book = book
        self._lock = threading.Lock()  # the lane's thread and its bookkeeping thread
        self._written: dict[str, LedgerRow] = {}  # stamped at their write, not called yet

    def add_written(self, rows: Iterable[LedgerRow]) -> None:
        with self._lock:
            self._written.update((row.identifier, row) for row in rows)

    def stamped_here(self, row: LedgerRow) -> bool:
        """Whether ``row``'s stamp is the one it was written with, its call not made yet."""
        with self._lock:
            return row.identifier in self._written

    def stamp(self, rows: Collection[LedgerRow]) -> set[str]:
        """The identifiers of ``rows`` that may be called: those written stamped, and those
        read pending that are still pending once stamped (one committed statement)."""
        with self._lock:
            ready = {row.identifier for row in rows if row.identifier in self._written}
        earlier = [row for row in rows if row.identifier not in ready]
        return ready | (self._book.stamp_call(earlier) if earlier else set())

    def called(self, rows: Iterable[LedgerRow]) -> None:
        """``rows``' calls were made: their stamps stay (Stripe may have them)."""
        with self._lock:
            for row in rows:
                self._written.pop(row.identifier, None)

    def unstamp(self, rows: Collection[LedgerRow]) -> None:
        """Take back the stamps of ``rows``, whose calls will not be made."""
        self.called(rows)
        self._book.unstamp(rows)

    def take_back_rest(self, others: Collection[LedgerRow] = ()) -> None:
        """When the lane is done: take back the stamps of the rows written stamped and never
        called (the lane ended before them), and of ``others`` (written stamped for this lane
        and never taken by it). Logged, not raised, if the database refuses: the rows then
        count as called, which reconcile settles (the module's docstring)."""
        with self._lock:
            rest = [*self._written.values(), *others]
            self._written.clear()
        if not rest:
            return
        try:
            self._book.unstamp(rest)
        except Exception:
            _log.exception(
                "could not take back the stamps of %d ledger row(s) never called: they count "
                "as called until sent (reconcile settles them if they wait too long)",
                len(rest),
            )
