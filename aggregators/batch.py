"""One batch of Kafka messages -> one database transaction.

Everything a batch changes (deduplication keys, totals, unique values, rejected events) commits
together or not at all. The worker commits the batch's Kafka offsets only after this returns, so a
crash at any moment replays whole batches, and the deduplication keys make the replay a no-op.

No single message can stop a worker: admission never raises, and a batch the database refuses
for a reason that is not its own failure (aggregators.faults) is split until the message at
fault is found; that one is dead-lettered (``unstorable``) and the rest applied. The database's
own failures are retried with backoff, then raised, and the worker sends the batch again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Inexact, localcontext

from sqlalchemy import Engine

from aggregators.aggregation import Partial, WindowKey, unique_digest
from aggregators.cardinality import claim_within_the_limit
from aggregators.dedup import DedupKeys
from aggregators.faults import MESSAGE_CLASSES, is_database_failure, sqlstate_of
from aggregators.intake import Accepted, Clock, Rejection, admit
from aggregators.offset_store import (
    DatabaseWentBackError,
    check_not_went_back,
    first_offsets,
    next_offsets,
    record_offsets,
)
from aggregators.sql import insert_ignoring_conflicts
from aggregators.totals import ChangedWindow, apply_partials
from aggregators.windows import window_bounds
from meterstream.backoff import backoff_s
from meterstream.content_modes import Header, encode_headers
from meterstream.meters import Catalogue
from meterstream.metrics import AggregatorMetrics
from meterstream.schema import rejected_events

_log = logging.getLogger(__name__)
WallClock = Callable[[], datetime]
# The database's own failures (a deadlock, a lost connection) are tried again a few times here,
# with backoff, before the worker takes over (it retries the batch for as long as it fails).
_RETRIES = 5
_BACKOFF_S = 0.1
_BACKOFF_CAP_S = 2.0
_Admitted = tuple["Message", Accepted | Rejection]


class _DryRun(Exception):
    """Raised at the end of a dry run's transaction, so that it rolls back."""


@dataclass(frozen=True, slots=True)
class Message:
    """What the worker hands over of one Kafka message."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    # The Kafka timestamp: when the producer handed it over (the SDK never back-dates it).
    produced_at: datetime | None = None
    # A binary-mode event's attributes are headers (meterstream/content_modes.py).
    headers: tuple[Header, ...] = ()


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
        future_tolerance_s: float = 600.0,
        max_combinations: int = 100,
        clock: WallClock = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self._catalogue = catalogue
        self.metrics = metrics
        self.newest_event_time: datetime | None = None
        self._horizon_days = horizon_days
        self._future_tolerance_s = future_tolerance_s
        self._clock = clock
        self._max_combinations = max_combinations
        self.dedup = DedupKeys(engine, horizon_days)
        self._last_now = datetime.min.replace(tzinfo=UTC)
        # Per (topic, partition), the next offset this applier committed: a database whose
        # offset falls behind it was restored under us (DatabaseWentBackError).
        self._recorded: dict[tuple[str, int], int] = {}

    def apply(self, messages: Sequence[Message]) -> BatchResult:
        """Apply ``messages`` in one transaction; return what happened.

        Every message is applied or rejected (with its reason): one the database refuses is
        isolated by splitting the batch. Raises only when the database itself fails
        (aggregators.faults), after a few retries; then nothing of the batch is kept.
        """
        started = time.perf_counter()
        # Strictly later than the last batch's time: a window's updated_at then says which
        # batch last changed it.
        now = max(self._clock(), self._last_now + timedelta(microseconds=1))
        self._last_now = now
        clock = Clock(now, self._future_tolerance_s, self._horizon_days)
        admitted = [
            (
                m,
                admit(
                    m.value,
                    self._catalogue,
                    clock=clock,
                    produced=m.produced_at,
                    headers=m.headers,
                ),
            )
            for m in messages
        ]
        result = BatchResult()
        # Totals can reach 30 digits and more; the default context (28) would round them.
        with localcontext() as exact:
            exact.prec = 80
            exact.traps[Inexact] = True
            self._apply_isolating(admitted, now, result)
        self._count(result, len(messages), time.perf_counter() - started)
        return result

    def _apply_isolating(
        self,
        admitted: list[_Admitted],
        now: datetime,
        result: BatchResult,
        whole: str | None = None,
        sibling: list[_Admitted] | None = None,
    ) -> None:
        """Apply ``admitted``, splitting it until the message at fault is found.

        ``whole`` is the SQLSTATE the whole batch failed with, ``sibling`` the other half of the
        split this part comes from: the circuit breaker's evidence (``_fails_alike``).
        """
        try:
            part = self._apply_retrying(admitted, now)
        except Exception as exc:
            if isinstance(exc, DatabaseWentBackError) or is_database_failure(exc):
                raise
            state = sqlstate_of(exc)
            whole = state if sibling is None else whole
            if len(admitted) > 1:
                middle = len(admitted) // 2
                first, second = admitted[:middle], admitted[middle:]
                self._apply_isolating(first, now, result, whole, second)
                self._apply_isolating(second, now, result, whole, first)
                return
            if self._fails_alike(state, whole, sibling, now):
                _log.error(
                    "message %s[%d]@%d, its neighbours and the whole batch all fail with "
                    "SQLSTATE %s: the database's fault, not the message's; retrying the batch",
                    *_where(admitted[0][0]),
                    state,
                )
                raise
            part = self._reject_alone(admitted[0], exc, now)
        result.merge(part)

    def _fails_alike(
        self, state: str | None, whole: str | None, sibling: list[_Admitted] | None, now: datetime
    ) -> bool:
        """The circuit breaker: a single message that fails with the SQLSTATE the whole batch
        failed with, while the other half of its split fails with it too, is no evidence
        against that message. A database condition faults.py does not know yet (a pooler's
        quirk, say) would otherwise dead-letter good events in bulk. Classes where one value is
        plausibly at fault (data, integrity, a key too long) are left to the bisection."""
        if state is None or state != whole or sibling is None or state[:2] in MESSAGE_CLASSES:
            return False
        try:
            self._apply_once(*self._split(sibling), now, [m for m, _ in sibling], dry_run=True)
        except _DryRun:
            return False
        except Exception as exc:
            return sqlstate_of(exc) == state
        raise AssertionError("unreachable: a dry run always raises")

    def _reject_alone(self, admitted: _Admitted, exc: Exception, now: datetime) -> BatchResult:
        """Dead-letter the one message the database refused, with what is known of it."""
        message, outcome = admitted
        detail = f"could not be applied: {type(exc).__name__}: {exc}"[:2000]
        _log.warning("message %s[%d]@%d refused: %s", *_where(message), detail)
        known = outcome.event if isinstance(outcome, Accepted) else outcome
        rejection = Rejection("unstorable", detail, known.event_id, known.customer_id, known.meter)
        try:
            return self._apply_retrying([(message, rejection)], now)
        except Exception as again:
            if is_database_failure(again):
                raise
            # Even its rejection did not store (what it says about itself, say): keep the
            # raw bytes and the error's class only.
            bare = Rejection("unstorable", f"could not be applied: {type(exc).__name__}")
            return self._apply_retrying([(message, bare)], now)

    @staticmethod
    def _split(
        admitted: list[_Admitted],
    ) -> tuple[list[tuple[Message, Accepted]], list[Rejected]]:
        accepted = [(m, outcome) for m, outcome in admitted if isinstance(outcome, Accepted)]
        rejected = [
            Rejected(m, outcome) for m, outcome in admitted if isinstance(outcome, Rejection)
        ]
        return accepted, rejected

    def _apply_retrying(self, admitted: list[_Admitted], now: datetime) -> BatchResult:
        accepted, rejected = self._split(admitted)
        for attempt in range(1, _RETRIES + 1):
            try:
                self.dedup.prepare(a.event.event_time.date() for _, a in accepted)
                return self._apply_once(accepted, rejected, now, [m for m, _ in admitted])
            except Exception as exc:
                if attempt == _RETRIES or not is_database_failure(exc):
                    raise
                # A day partition dropped under us (a restore, by hand) must be created again:
                # forget which ones we believe exist (CREATE ... IF NOT EXISTS is cheap).
                self.dedup.forget_partitions()
                delay = backoff_s(attempt, _BACKOFF_S, _BACKOFF_CAP_S)
                _log.warning("the database failed (%s); trying again in %.1f s", exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable: the last attempt raises")

    def _apply_once(
        self,
        admitted: list[tuple[Message, Accepted]],
        rejected: list[Rejected],
        now: datetime,
        messages: Sequence[Message],
        *,
        dry_run: bool = False,
    ) -> BatchResult:
        result = BatchResult(rejected=list(rejected))
        offsets = next_offsets(messages)
        with self.engine.begin() as connection:
            check_not_went_back(connection, first_offsets(messages), self._recorded)
            # Before the keys are claimed: an event refused here stays countable when replayed.
            accepted, fresh, refused = claim_within_the_limit(
                connection, admitted, self._catalogue, self._max_combinations, self.dedup.claim
            )
            result.rejected.extend(Rejected(m, r) for m, r in refused)
            combination_of = {id(a.event): a.combination for a in accepted}
            partials: dict[WindowKey, Partial] = {}
            applied: Counter[str] = Counter()
            late: Counter[str] = Counter()
            for event in fresh:
                meter = self._catalogue.meters[event.meter]
                start, end = window_bounds(event.event_time, meter.window)
                applied[meter.name] += 1
                if end + timedelta(seconds=meter.grace_s) <= now:
                    late[meter.name] += 1
                unique = (
                    unique_digest(event.properties[meter.unique_property])
                    if meter.unique_property
                    else None
                )
                key = (event.customer_id, event.meter, start, combination_of[id(event)])
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
            # In the batch's own transaction: a restored database knows where it stopped.
            # Parts of a bisected batch commit in offset order, so the mark never passes a
            # message that is not in the database.
            record_offsets(connection, messages)
            if dry_run:
                raise _DryRun  # rolls the transaction back
        for where, offset in offsets.items():
            self._recorded[where] = max(self._recorded.get(where, 0), offset)
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


def _where(message: Message) -> tuple[str, int, int]:
    return message.topic, message.partition, message.offset


def _rejected_row(rejected: Rejected, now: datetime) -> dict[str, object]:
    message, rejection = rejected.message, rejected.rejection
    raw = message.value or b""
    return {
        "topic": message.topic,
        "partition": message.partition,
        "offset": message.offset,
        "reason": rejection.reason,
        "detail": _storable_text(rejection.detail[:2000]),
        "event_id": rejection.event_id,
        "customer_id": rejection.customer_id,
        "meter": rejection.meter,
        "raw": raw,
        "raw_digest": hashlib.blake2b(raw, digest_size=16).digest(),
        "rejected_at": now,
        "headers": encode_headers(message.headers),
    }


def _storable_text(text: str) -> str:
    """``text`` without what PostgreSQL text cannot hold (NUL, lone surrogates)."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
