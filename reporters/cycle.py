"""One report cycle: resend what is pending, write and send a row per due window.

The (customer, meter) pairs with work are cut into chunks (of the sender's keys_per_chunk) and
handed to a Sender, which writes each chunk's rows (bookkeeping) and calls Stripe: ``V1Sender``
(reporters/v1_sender.py: rounds of single meter events on a thread pool) or
``V2StreamSender`` (reporters/stream_sender.py: batches of 100 on the v2 stream while a
writer thread writes the chunks ahead).

Per (customer, meter) everything goes in ledger order, one call at a time (Stripe allows one
call in flight per customer and meter, and a ``last`` meter must see its revisions in order):
pending rows first, then the new rows. A crash between the calls and the acknowledgement
leaves rows pending: they are resent with the same identifier and Idempotency-Key, and
Stripe's "already exists" for our identifier marks them sent.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import Engine

from meterstream.errors import StripeAuthError
from meterstream.meters import Catalogue
from meterstream.metrics import ReporterMetrics
from reporters import ledger
from reporters.backstop import queue_missed
from reporters.bookkeeping import Bookkeeper, CycleResult, CycleWork
from reporters.customers import load_links
from reporters.due import Key, count_due_windows, take_due
from reporters.held_keys import save_held_keys
from reporters.held_windows import RECHECK_AFTER, SET_ASIDE, held_usage_summary
from reporters.invoiced import possibly_invoiced
from reporters.ledger import LedgerRow
from reporters.meters_check import StripeMeter
from reporters.retention import prune_ledger_pass
from reporters.rows import KEY_FAILURES
from reporters.scales import check_unit_scales
from reporters.status import billing_lag_s

__all__ = ["CycleResult", "CycleWork", "Reporter", "Sender"]

_log = logging.getLogger(__name__)


class Sender(Protocol):
    """One way of calling Stripe for a cycle's chunks (v1 meter events or the v2 stream)."""

    # (customer, meter) pairs a chunk holds: the rows a writer writes in one transaction.
    keys_per_chunk: int

    def send(
        self,
        book: Bookkeeper,
        chunks: Sequence[Sequence[Key]],
        work: CycleWork,
        result: CycleResult,
    ) -> list[BaseException | None]:
        """Write each chunk's rows (``book.rows_to_send``) and send them; the error of each
        chunk that failed (its keys wait for the next cycle). A StripeAuthError may be
        raised or returned: either way the cycle raises it."""
        ...


class Reporter:
    """Runs report cycles; holds no state between them but what it has already counted."""

    def __init__(
        self,
        engine: Engine,
        catalogue: Catalogue,
        stripe_meters: Mapping[str, StripeMeter],
        metrics: ReporterMetrics,
        *,
        sender: Sender,
        clock: Callable[[], datetime],
        stop: threading.Event,
        horizon_days: int,
        deployment_id: str,
        backstop_s: float | None = None,
        ledger_retention_days: int | None = None,
        ledger_rejected_retention_days: int | None = None,
        window_retention_days: int = 60,
        prune_batch_rows: int = 1_000,
    ) -> None:
        # ConfigError: history would be re-priced.
        check_unit_scales(engine, catalogue, clock())
        self.engine = engine
        self.catalogue = catalogue
        self.stripe_meters = stripe_meters
        self.metrics = metrics
        self.sender = sender
        self._clock = clock
        self._horizon_days = horizon_days
        self._stop = stop
        self._ledger_retention_days = ledger_retention_days
        self._ledger_rejected_retention_days = ledger_rejected_retention_days
        self._window_retention_days = window_retention_days
        self._prune_batch_rows = prune_batch_rows
        self._book = Bookkeeper(
            engine,
            catalogue,
            stripe_meters,
            metrics,
            clock=clock,
            stop=stop,
            horizon_days=horizon_days,
            deployment_id=deployment_id,
        )
        # Not at start: ``report --once`` (cron) runs it only when asked (--backstop).
        self._backstop_s = backstop_s
        self._backstop_at = None if backstop_s is None else clock() + timedelta(seconds=backstop_s)

    def run_backstop(self) -> int:
        """Compare every window total with the ledger (reporters/backstop.py); queue and count
        the due windows the report queue missed (should be none)."""
        found = queue_missed(self.engine, self.stripe_meters)
        self.metrics.backstop_found.inc(found)
        return found

    def run_cycle(self) -> CycleResult:
        """One cycle. Raises StripeAuthError if Stripe refuses the key; everything else is
        recorded in the ledger and the metrics and retried next cycle."""
        result = CycleResult()
        if self._backstop_at is not None and self._clock() >= self._backstop_at:
            self.run_backstop()
            self._backstop_at = self._clock() + timedelta(seconds=self._backstop_s or 0)
        links = load_links(self.engine)
        due = take_due(self.engine, self.stripe_meters, self._clock() - RECHECK_AFTER)
        pending: dict[Key, list[LedgerRow]] = {}
        for row in ledger.pending_rows(self.engine):
            pending.setdefault((row.customer_id, row.meter), []).append(row)
        keys = sorted(set(due) | set(pending))
        size = self.sender.keys_per_chunk
        chunks = [keys[i : i + size] for i in range(0, len(keys), size)]
        errors = self.sender.send(self._book, chunks, CycleWork(due, pending, links), result)
        for error in errors:
            if isinstance(error, StripeAuthError):
                raise error
        for error in errors:
            if error is not None:
                _log.error("report cycle failed for some customers and meters", exc_info=error)
        self._finish(result)
        return result

    def _finish(self, result: CycleResult) -> None:
        now = self._clock()
        # First: the billing lag leaves out the pairs this cycle held.
        save_held_keys(self.engine, result.held_keys, now)
        self._book.forget_released(result.held_keys)
        pending = ledger.count_with_status(self.engine, "pending")
        unwritten = count_due_windows(self.engine, self.stripe_meters)  # held ones apart
        kept_in_queue = sum(n for reason, n in result.held.items() if reason in KEY_FAILURES)
        result.unacknowledged = pending + max(0, unwritten - kept_in_queue)
        result.unknown = ledger.count_with_status(self.engine, "unknown")
        # Every window set aside, not only this cycle's: a cycle no longer reads them.
        held = held_usage_summary(self.engine, self.stripe_meters)
        result.held = {
            **{r: n for r, n in result.held.items() if r in KEY_FAILURES},
            **held.windows,
        }
        for reason in SET_ASIDE:
            self.metrics.held_windows.labels(reason=reason).set(held.windows.get(reason, 0))
        self.metrics.held_oldest_age.set(held.oldest_age_s(now))
        self.metrics.pending.set(pending)
        self.metrics.unknown_rows.set(result.unknown)
        self.metrics.due_windows.set(unwritten)
        self.metrics.billing_lag.set(billing_lag_s(self.engine, self.catalogue, now))
        late = possibly_invoiced(self.engine, now, self._horizon_days)
        for meter in self.catalogue:
            of_meter = [item for item in late if item.meter == meter.name]
            self.metrics.possibly_invoiced.labels(meter.name).set(sum(i.rows for i in of_meter))
            units = sum(i.units for i in of_meter)
            self.metrics.possibly_invoiced_units.labels(meter.name).set(units)
        self.metrics.last_cycle.set(now.timestamp())
        by_reason = Counter(reason for reason, _ in result.held_keys.values())
        for reason in KEY_FAILURES:
            self.metrics.held_keys.labels(reason=reason).set(by_reason[reason])

    def prune_ledger(self) -> int | None:
        """Delete the ledger rows past ``ledger_retention_days`` that nothing reads again
        (reporters.retention), from where the last pass ended; call it between cycles. None:
        no pass due yet (one an hour), or retention is off."""
        if self._ledger_retention_days is None:
            return None
        pruned = prune_ledger_pass(
            self.engine,
            self._clock(),
            self._ledger_retention_days,
            self._window_retention_days,
            [meter.window for meter in self.catalogue],
            self._prune_batch_rows,
            should_stop=self._stop.is_set,
            rejected_retention_days=self._ledger_rejected_retention_days,
        )
        if pruned:
            self.metrics.pruned_rows.labels("ledger").inc(pruned)
            _log.info(
                "pruned %d ledger row(s) older than %d days", pruned, self._ledger_retention_days
            )
        return pruned
