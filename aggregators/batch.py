"""One batch of Kafka messages -> one database transaction.

Everything a batch changes (deduplication keys, totals, unique values, rejected events) commits
together or not at all. The worker commits the batch's Kafka offsets only after this returns, so a
crash at any moment replays whole batches, and the deduplication keys make the replay a no-op.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Inexact, InvalidOperation, localcontext

from sqlalchemy import Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError

from aggregators.aggregation import Partial, WindowKey
from aggregators.dedup import DedupKeys
from aggregators.intake import Accepted, Rejection, admit
from aggregators.offset_store import record_offsets
from aggregators.sql import insert_ignoring_conflicts
from aggregators.totals import ChangedWindow, apply_partials
from aggregators.windows import window_bounds
from meterstream.meters import Catalogue
from meterstream.metrics import AggregatorMetrics
from meterstream.schema import rejected_events

_log = logging.getLogger(__name__)
Clock = Callable[[], datetime]
# Deadlocks and serialisation failures are transient: the whole batch is tried again.
_RETRIES = 5


@dataclass(frozen=True, slots=True)
class Message:
    """What the worker hands over of one Kafka message."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    # The Kafka timestamp: when the producer handed it over (the SDK never back-dates it).
    produced_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    message: Message
    rejection: Rejection


@dataclass(slots=True)
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    applied_by_meter: Counter[str] = field(default_factory=Counter)
    late_by_meter: Counter[str] = field(default_factory=Counter)
    rejected: list[Rejected] = field(default_factory=list)
    changed: list[ChangedWindow] = field(default_factory=list)
    newest_event_time: datetime | None = None

    def merge(self, other: BatchResult) -> None:
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.applied_by_meter.update(other.applied_by_meter)
        self.late_by_meter.update(other.late_by_meter)
        self.rejected.extend(other.rejected)
        self.changed.extend(other.changed)
        times = [t for t in (self.newest_event_time, other.newest_event_time) if t is not None]
        self.newest_event_time = max(times, default=None)


class BatchApplier:
    """Applies batches of usage messages to the database, exactly once per event id."""

    def __init__(
        self,
        engine: Engine,
        catalogue: Catalogue,
        metrics: AggregatorMetrics,
        *,
        horizon_days: int,
        clock: Clock = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self._catalogue = catalogue
        self.metrics = metrics
        self.newest_event_time: datetime | None = None
        self._horizon_days = horizon_days
        self._clock = clock
        self.dedup = DedupKeys(engine, horizon_days)
        self._last_now = datetime.min.replace(tzinfo=UTC)

    def apply(self, messages: Sequence[Message]) -> BatchResult:
        """Apply ``messages`` in one transaction; return what happened.

        Transient conflicts (deadlocks, a locked SQLite file) are retried. When the database
        refuses the batch for good (a value it cannot store), the batch is split until the one
        message at fault is found; it is rejected as ``unstorable`` and the rest applied.
        Anything else propagates, and nothing of the batch is kept.
        """
        started = time.perf_counter()
        # Strictly later than the last batch's time: a window's updated_at then says which
        # batch last changed it.
        now = max(self._clock(), self._last_now + timedelta(microseconds=1))
        self._last_now = now
        result = BatchResult()
        # Totals can reach 30 digits and more; the default context (28) would round them.
        with localcontext() as exact:
            exact.prec = 80
            exact.traps[Inexact] = True
            self._apply_splitting(list(messages), now, result)
        self._count(result, len(messages), time.perf_counter() - started)
        return result

    def _apply_splitting(self, messages: list[Message], now: datetime, result: BatchResult) -> None:
        accepted: list[Accepted] = []
        rejected: list[Rejected] = []
        for message in messages:
            outcome = admit(
                message.value,
                self._catalogue,
                now=now,
                produced_at=message.produced_at,
                horizon_days=self._horizon_days,
            )
            if isinstance(outcome, Rejection):
                rejected.append(Rejected(message, outcome))
            else:
                accepted.append(outcome)
        try:
            part = self._apply_retrying(accepted, rejected, now, messages)
        except (DataError, IntegrityError, InvalidOperation) as exc:
            if len(messages) == 1:
                detail = f"the database refused it: {exc}"[:2000]
                rejection = Rejection("unstorable", detail)
                part = self._apply_retrying([], [Rejected(messages[0], rejection)], now, messages)
            else:
                middle = len(messages) // 2
                self._apply_splitting(messages[:middle], now, result)
                self._apply_splitting(messages[middle:], now, result)
                return
        result.merge(part)

    def _apply_retrying(
        self,
        accepted: list[Accepted],
        rejected: list[Rejected],
        now: datetime,
        messages: Sequence[Message],
    ) -> BatchResult:
        self.dedup.prepare(a.event.event_time.date() for a in accepted)
        for attempt in range(1, _RETRIES + 1):
            try:
                return self._apply_once(accepted, rejected, now, messages)
            except OperationalError as exc:
                if attempt == _RETRIES or not _transient(exc):
                    raise
                _log.warning("batch conflicted with another writer (%s); trying again", exc.orig)
        raise AssertionError("unreachable: the last attempt raises")

    def _apply_once(
        self,
        accepted: list[Accepted],
        rejected: list[Rejected],
        now: datetime,
        messages: Sequence[Message],
    ) -> BatchResult:
        result = BatchResult(rejected=rejected)
        with self.engine.begin() as connection:
            fresh = self.dedup.claim(connection, [a.event for a in accepted])
            partials: dict[WindowKey, Partial] = {}
            applied: Counter[str] = Counter()
            late: Counter[str] = Counter()
            for event in fresh:
                meter = self._catalogue.meters[event.meter]
                start, end = window_bounds(event.event_time, meter.window)
                applied[meter.name] += 1
                if end + timedelta(seconds=meter.grace_s) <= now:
                    late[meter.name] += 1
                unique = event.properties[meter.unique_property] if meter.unique_property else None
                key = (event.customer_id, event.meter, start)
                partial = partials.get(key)
                if partial is None:
                    partials[key] = Partial.first(
                        end, event.value, event.event_time, event.event_id, unique
                    )
                else:
                    partial.add(event.value, event.event_time, event.event_id, unique)
            result.changed = apply_partials(connection, partials, self._catalogue, now)
            if result.rejected:
                connection.execute(
                    insert_ignoring_conflicts(connection, rejected_events),
                    [_rejected_row(r, now) for r in result.rejected],
                )
            # With the totals, so a database restored from a backup knows where to resume.
            record_offsets(connection, messages)
        result.applied = len(fresh)
        result.duplicates = len(accepted) - len(fresh)
        result.applied_by_meter = applied
        result.late_by_meter = late
        result.newest_event_time = max((e.event_time for e in fresh), default=None)
        return result

    def _count(self, result: BatchResult, size: int, seconds: float) -> None:
        count_batch(self.metrics, result, size, seconds)
        self.newest_event_time = note_newest_event_time(
            self.metrics, self.newest_event_time, result.newest_event_time, self._clock()
        )


def count_batch(metrics: AggregatorMetrics, result: BatchResult, size: int, seconds: float) -> None:
    """Add one applied batch of ``size`` messages, applied in ``seconds``, to the counters."""
    for meter, count in result.applied_by_meter.items():
        metrics.applied.labels(meter).inc(count)
    for meter, count in result.late_by_meter.items():
        metrics.late.labels(meter).inc(count)
    metrics.duplicates.inc(result.duplicates)
    for rejected in result.rejected:
        metrics.dead_lettered.labels(rejected.rejection.reason).inc()
    metrics.batch_size.observe(size)
    metrics.batch_latency.observe(seconds)


def note_newest_event_time(
    metrics: AggregatorMetrics,
    newest: datetime | None,
    candidate: datetime | None,
    now: datetime,
) -> datetime | None:
    """The newest event time applied so far; sets the event-time lag gauge from it."""
    if candidate is None:
        return newest
    newest = candidate if newest is None else max(newest, candidate)
    metrics.event_time_lag.set(max((now - newest).total_seconds(), 0.0))
    return newest


def _transient(exc: DBAPIError) -> bool:
    code = getattr(exc.orig, "sqlstate", None)
    # 40P01 deadlock, 40001 serialization failure; SQLite: "database is locked".
    return code in ("40P01", "40001") or "database is locked" in str(exc.orig)


def _rejected_row(rejected: Rejected, now: datetime) -> dict[str, object]:
    message, rejection = rejected.message, rejected.rejection
    raw = message.value or b""
    return {
        "topic": message.topic,
        "partition": message.partition,
        "offset": message.offset,
        "reason": rejection.reason,
        "detail": rejection.detail[:2000],
        "event_id": rejection.event_id,
        "customer_id": rejection.customer_id,
        "meter": rejection.meter,
        "raw": raw,
        "raw_digest": hashlib.blake2b(raw, digest_size=16).digest(),
        "rejected_at": now,
    }
