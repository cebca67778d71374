"""The faust application: batches of usage messages in, one database transaction each, then ack.

Events are taken with ``noack_take`` and acknowledged only after their batch's transaction has
committed (and its rejects are confirmed on the dead-letter topic), so faust never commits an
offset whose event is not in the database. A failed batch is retried, never skipped: the worker
stalls, the lag metric rises, and nothing is lost.

Batches are pipelined: while the child process (aggregators.pipeline) applies one, the agent
already takes the next, up to ``_IN_FLIGHT`` batches. They are acknowledged strictly in the order
they were taken, each only after its own commit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import faust
from sqlalchemy import Engine

from aggregators.batch import BatchResult, count_batch, note_newest_event_time
from aggregators.dead_letter_topic import DeadLetterSender, dead_letter_topic
from aggregators.intake import header_bytes
from aggregators.offset_store import DatabaseWentBackError, stored_or_seeded
from aggregators.offsets import AppliedOffsets, use_applied_offsets
from aggregators.pipeline import AppliedBatch, ApplyPipeline, RawMessage
from aggregators.retention import prune_aggregates
from aggregators.stall import StallWatch
from meterstream.backoff import backoff_s
from meterstream.content_modes import Header
from meterstream.errors import OutOfOrderError
from meterstream.lag import group_progress
from meterstream.metrics import AggregatorMetrics
from meterstream.settings import Settings

_log = logging.getLogger(__name__)
_RETRY_BASE_S = 0.5
_RETRY_MAX_S = 30.0
_PRUNE_INTERVAL_S = 3600.0
_GAUGE_INTERVAL_S = 10.0
# One batch committing while the next is applied and a third is taken: more would only hold
# more events unacknowledged.
_IN_FLIGHT = 2


@dataclass(slots=True)
class WorkerState:
    """What the worker process keeps besides faust: the pipeline, an engine for the gauges,
    the metrics it exposes, and the offsets applied (which cap faust's commits)."""

    pipeline: ApplyPipeline
    engine: Engine
    metrics: AggregatorMetrics
    newest_event_time: datetime | None = None
    applied: AppliedOffsets = field(default_factory=AppliedOffsets)


@dataclass(slots=True)
class _Batch:
    sequence: int
    events: list[Any]
    raw: list[RawMessage]
    applied: asyncio.Future[AppliedBatch]


def build_app(settings: Settings, state: WorkerState) -> faust.App:
    """A faust App (not started) whose one agent applies the usage topic to the database."""
    faust_data = Path(tempfile.gettempdir()) / "meterstream-faust"
    faust_data.mkdir(exist_ok=True)  # faust creates only the last level
    app = faust.App(
        settings.consumer_group,
        # faust creates this even with memory-only tables; keep it out of the working directory.
        datadir=faust_data / "{conf.name}",
        broker=[f"kafka://{server}" for server in settings.kafka_bootstrap.split(",")],
        store="memory://",
        autodiscover=False,
        # No web server (metrics are served by meterstream itself), no leader topic, and no
        # topic declarations: the worker only reads and writes the topics meterstream owns.
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=settings.kafka_heartbeat_interval_s,
        broker_commit_interval=1.0,
        broker_max_poll_records=settings.aggregate_batch_max_events,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=max(4096, settings.aggregate_batch_max_events * 2),
        consumer_max_fetch_size=8 * 1024 * 1024,
    )
    # faust would otherwise commit past events it skipped after a rebalance, and resume a
    # restored database past events it lost (aggregators.offsets).
    stored = partial(
        stored_or_seeded, state.engine, settings.kafka_bootstrap, settings.consumer_group
    )
    use_applied_offsets(app, state.applied, stored)
    source = app.topic(
        settings.topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    dead_letters = DeadLetterSender(
        app.topic(dead_letter_topic(settings), key_serializer="raw", value_serializer="raw"),
        state.metrics.registry,
    )

    async def aggregate(stream: Any) -> None:
        slots = asyncio.Semaphore(_IN_FLIGHT)
        taken: asyncio.Queue[_Batch | None] = asyncio.Queue()
        acker = asyncio.create_task(_ack_in_order(app, stream, dead_letters, state, taken, slots))
        acker.add_done_callback(_exit_if_failed)
        sequence = 0
        try:
            batches = stream.noack_take(
                settings.aggregate_batch_max_events, within=settings.aggregate_batch_max_wait_s
            )
            async for events in batches:
                # Bounded in bytes too: the child holds a batch, its pickle and its decoded
                # events at once.
                for part in split_by_bytes(events, settings.aggregate_batch_max_bytes):
                    await slots.acquire()
                    sequence += 1
                    raw = [_raw(event) for event in part]
                    taken.put_nowait(
                        _Batch(sequence, part, raw, state.pipeline.submit(sequence, raw))
                    )
        finally:
            # Stopping: the batches taken are still applied and acknowledged. faust may have
            # made its last commit already; then the next worker reads them again, and the
            # deduplication keys make that a no-op.
            taken.put_nowait(None)
            await asyncio.shield(acker)

    app.agent(source, name="meterstream.aggregate")(aggregate)

    async def prune() -> None:
        # Keys past the horizon can never match again: Stripe refuses such old usage anyway.
        try:
            dropped = await state.pipeline.prune(datetime.now(UTC).date())
        except Exception:
            # An error escaping a faust timer crashes the worker; pruning can wait an hour.
            _log.exception("pruning deduplication keys failed; trying again in an hour")
        else:
            if dropped:
                _log.info("pruned %d day(s) of deduplication keys before the horizon", dropped)
        # In a thread of this process, not in the applying child: batches go on meanwhile, and
        # touch none of these rows (their windows are older than any event still admitted).
        try:
            await asyncio.get_running_loop().run_in_executor(
                None,
                partial(
                    prune_aggregates,
                    state.engine,
                    settings,
                    datetime.now(UTC),
                    state.metrics,
                    lambda: app.should_stop,
                ),
            )
        except Exception:
            _log.exception("pruning windows and refused events failed; trying again in an hour")

    app.timer(_PRUNE_INTERVAL_S, name="meterstream.prune")(prune)

    stalls = StallWatch(settings.stall_after_s)

    async def refresh_gauges() -> None:
        await asyncio.get_running_loop().run_in_executor(
            None, _refresh_gauges, settings, state, stalls
        )

    app.timer(_GAUGE_INTERVAL_S, name="meterstream.gauges")(refresh_gauges)
    return app


async def _ack_in_order(
    app: faust.App,
    stream: Any,
    dead_letters: DeadLetterSender,
    state: WorkerState,
    taken: asyncio.Queue[_Batch | None],
    slots: asyncio.Semaphore,
) -> None:
    """Acknowledge each batch after its commit and its dead letters, in the order taken."""
    while (batch := await taken.get()) is not None:
        applied = await _applied(app, state, batch)
        await _send_dead_letters(app, dead_letters, applied.result)
        # Only now may faust commit these offsets: raise the cap first, then ack.
        state.applied.note(batch.raw)
        for event in batch.events:
            await stream.ack(event)
        count_batch(state.metrics, applied.result, applied.size, applied.seconds)
        state.newest_event_time = note_newest_event_time(
            state.metrics,
            state.newest_event_time,
            applied.result.newest_event_time,
            datetime.now(UTC),
        )
        slots.release()


def _refresh_gauges(settings: Settings, state: WorkerState, stalls: StallWatch) -> None:
    """Consumer lag and stalled partitions from the broker, and the event-time lag of
    what this worker applied.

    Each gauge is refreshed on its own: one that cannot be read is cleared (its series
    vanishes, which the absent() alerts see) rather than left showing an old, calm value.
    """
    metrics = state.metrics
    newest = state.newest_event_time
    if newest is not None:
        metrics.event_time_lag.set(max(0.0, (datetime.now(UTC) - newest).total_seconds()))
    try:
        progress = group_progress(settings.kafka_bootstrap, settings.consumer_group, settings.topic)
    except Exception:
        metrics.consumer_lag.clear()
        metrics.partition_stalled.clear()
        _log.warning("could not read the consumer lag from the broker", exc_info=True)
    else:
        now_s = time.monotonic()
        for partition, (position, behind) in progress.items():
            labels = (settings.topic, str(partition))
            metrics.consumer_lag.labels(*labels).set(behind)
            stalled = stalls.stalled(partition, position, behind, now_s)
            metrics.partition_stalled.labels(*labels).set(1 if stalled else 0)


async def _applied(app: faust.App, state: WorkerState, batch: _Batch) -> AppliedBatch:
    """Wait for ``batch`` to commit, sending it again for as long as it fails."""
    refused = failures = 0
    applied = batch.applied
    while True:
        try:
            return await applied
        except DatabaseWentBackError as exc:
            # The database was restored under this worker: its next batch would commit past
            # the events the database lost. Leave without acking; the next worker assigned
            # these partitions starts from the database's offsets (aggregators.offsets).
            _log.critical("%s; exiting so that the partitions are read again from there", exc)
            os._exit(75)
        except OutOfOrderError as exc:
            # Its predecessor has committed by now (batches are awaited in order), so the
            # first resend goes at once; a refusal after that means the record of what was
            # committed and this worker disagree: wait, and say so, rather than spin.
            refused += 1
            if refused > 1:
                delay = backoff_s(refused - 1, _RETRY_BASE_S, _RETRY_MAX_S)
                _log.error(
                    "batch %d refused again (%s); retrying in %.1f s", batch.sequence, exc, delay
                )
                await asyncio.sleep(delay)
        except Exception:
            if app.should_stop:
                # faust's shutdown waits for every event to be acked, forever; this batch was
                # not applied, so leave without acking: the next worker reads it again.
                _log.critical("stopping while a batch keeps failing; exiting without ack")
                os._exit(75)
            failures += 1
            delay = backoff_s(failures, _RETRY_BASE_S, _RETRY_MAX_S)
            first, last = batch.raw[0], batch.raw[-1]
            _log.exception(
                "batch of %d messages (%s[%d]@%d .. [%d]@%d) failed; retrying in %.1f s, "
                "nothing is acknowledged until it succeeds",
                len(batch.raw),
                first[0],
                first[1],
                first[2],
                last[1],
                last[2],
                delay,
            )
            await asyncio.sleep(delay)
        applied = state.pipeline.submit(batch.sequence, batch.raw)


def _exit_if_failed(acker: asyncio.Task[None]) -> None:
    if not acker.cancelled() and acker.exception() is not None:
        # Batches taken after this one would never be acked, and faust would wait for them
        # forever; leave instead: everything not acked is read again by the next worker.
        _log.critical("acknowledging batches failed; exiting", exc_info=acker.exception())
        os._exit(70)


def _raw(event: Any) -> RawMessage:
    message = event.message
    return (
        message.topic,
        message.partition,
        message.offset,
        event.value,
        message.timestamp,
        kafka_headers(message.headers),
    )


def kafka_headers(headers: Any) -> tuple[Header, ...]:
    """A message's headers as (name, value) pairs, in their order, duplicates kept (the
    decoder refuses them by name): faust hands over aiokafka's pairs, or a mapping."""
    if not headers:
        return ()
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return tuple((str(name), None if value is None else bytes(value)) for name, value in pairs)


def split_by_bytes(events: list[Any], max_bytes: int) -> list[list[Any]]:
    """``events`` in consecutive parts of at most ``max_bytes`` of values each (a single
    larger event makes a part of its own)."""
    parts: list[list[Any]] = [[]]
    size = 0
    for event in events:
        length = len(event.value or b"") + header_bytes(kafka_headers(event.message.headers))
        if parts[-1] and size + length > max_bytes:
            parts.append([])
            size = 0
        parts[-1].append(event)
        size += length
    return parts


async def _send_dead_letters(
    app: faust.App, dead_letters: DeadLetterSender, result: BatchResult
) -> None:
    """Write every rejected message to the dead-letter topic and wait for the broker's ack;
    retry until it is confirmed or refused for good (the batch is not acked before)."""
    if not result.rejected:
        return
    failures = 0
    while True:
        try:
            await dead_letters.send_once(result)
            return
        except Exception:
            failures += 1
            delay = backoff_s(failures, _RETRY_BASE_S, _RETRY_MAX_S)
            if app.should_stop:
                _log.critical("stopping while dead letters cannot be written; exiting without ack")
                os._exit(75)
            _log.exception(
                "writing %d dead letter(s) failed; retrying in %.1f s", len(result.rejected), delay
            )
            await asyncio.sleep(delay)
