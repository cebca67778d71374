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
    """The stamps one lane holds for calls not made yet: those its new rows were written with
    (``add_written``) and those its groups made (``stamp``). A stamp is kept once its call is
    made (``called``) and otherwise taken back (``unstamp``, ``take_back_rest``), exactly
    once, and only by the lane that holds it: a row in a group whose stamp did not take it
    (settled elsewhere meanwhile) is left alone, whatever another reporter does with it.
    Taking back is best effort: a failed one is logged and not tried again (it may have
    committed before its answer was lost, and a second would take back an earlier call's
    stamp: the rows count as called, which is safe), and never replaces the error the lane is
    raising."""

    def __init__(self, book: Bookkeeper) -> None:
        self._book = book
        self._lock = threading.Lock()  # the lane's thread and its bookkeeping thread
        self._written: set[str] = set()  # written stamped this cycle
        self._held: dict[str, LedgerRow] = {}  # stamped by this lane, not called yet

    def add_written(self, rows: Iterable[LedgerRow]) -> None:
        with self._lock:
            for row in rows:
                self._written.add(row.identifier)
                self._held[row.identifier] = row

    def stamped_here(self, row: LedgerRow) -> bool:
        """Whether ``row``'s stamp is the one it was written with, its call not made yet."""
        with self._lock:
            return row.identifier in self._written and row.identifier in self._held

    def stamp(self, rows: Collection[LedgerRow]) -> set[str]:
        """The identifiers of ``rows`` that may be called: those written stamped, and those
        read pending that are still pending once stamped (one committed statement)."""
        with self._lock:
            ready = {row.identifier for row in rows if row.identifier in self._written}
        earlier = [row for row in rows if row.identifier not in ready]
        stamped = self._book.stamp_call(earlier) if earlier else set()
        with self._lock:
            self._held.update((row.identifier, row) for row in earlier if row.identifier in stamped)
        return ready | stamped

    def called(self, rows: Iterable[LedgerRow]) -> None:
        """``rows``' calls were made: their stamps stay (Stripe may have them)."""
        with self._lock:
            for row in rows:
                self._held.pop(row.identifier, None)

    def unstamp(self, rows: Iterable[LedgerRow]) -> None:
        """Take back the stamps this lane holds of ``rows``, whose calls will not be made."""
        with self._lock:
            taken = [held for row in rows if (held := self._held.pop(row.identifier, None))]
        self._undo(taken)

    def take_back_rest(self, others: Collection[LedgerRow] = ()) -> None:
        """When the lane is done: take back every stamp it still holds (the rows it did not
        reach), and those of ``others`` (written stamped for this lane, never taken by it)."""
        with self._lock:
            rest = [*self._held.values(), *others]
            self._held.clear()
        self._undo(rest)

    def _undo(self, rows: list[LedgerRow]) -> None:
        if not rows:
            return
        try:
            self._book.unstamp(rows)
        except Exception:
            _log.exception(
                "could not take back the stamps of %d ledger row(s) never called: they count "
                "as called until sent (reconcile settles them if they wait too long)",
                len(rows),
            )
