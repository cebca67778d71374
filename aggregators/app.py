"""The faust application: a batch of usage messages in, one database transaction, then ack.

Events are taken with ``noack_take`` and acknowledged only after the batch's transaction has
committed (and its rejects are confirmed on the dead-letter topic), so faust never commits an
offset whose event is not in the database. A failed batch is retried, never skipped: the worker
stalls, the lag metric rises, and nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust

from aggregators.batch import BatchApplier, BatchResult, Message
from aggregators.status import unreported_windows
from meterstream.lag import consumer_lag
from meterstream.settings import Settings

_log = logging.getLogger(__name__)
_RETRY_MAX_S = 30.0
_PRUNE_INTERVAL_S = 3600.0
_GAUGE_INTERVAL_S = 10.0


def dead_letter_topic(settings: Settings) -> str:
    return f"{settings.topic}.dlq"


def build_app(settings: Settings, applier: BatchApplier) -> faust.App:
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
    source = app.topic(
        settings.topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    dead_letters = app.topic(
        dead_letter_topic(settings), key_serializer="raw", value_serializer="raw"
    )

    async def aggregate(stream: Any) -> None:
        loop = asyncio.get_running_loop()
        batches = stream.noack_take(
            settings.aggregate_batch_max_events, within=settings.aggregate_batch_max_wait_s
        )
        async for events in batches:
            messages = [_message(event) for event in events]
            result = await _apply_until_done(app, loop, applier, messages)
            await _send_dead_letters(app, dead_letters, result)
            # Only now may faust commit these offsets.
            for event in events:
                await stream.ack(event)

    app.agent(source, name="meterstream.aggregate")(aggregate)

    async def prune_dedup_keys() -> None:
        # Keys past the horizon can never match again: Stripe refuses such old usage anyway.
        today = datetime.now(UTC).date()
        dropped = await asyncio.get_running_loop().run_in_executor(None, applier.dedup.prune, today)
        if dropped:
            _log.info("pruned %d day(s) of deduplication keys before the horizon", dropped)

    app.timer(_PRUNE_INTERVAL_S, name="meterstream.prune")(prune_dedup_keys)

    async def refresh_gauges() -> None:
        await asyncio.get_running_loop().run_in_executor(None, _refresh_gauges, settings, applier)

    app.timer(_GAUGE_INTERVAL_S, name="meterstream.gauges")(refresh_gauges)
    return app


def _refresh_gauges(settings: Settings, applier: BatchApplier) -> None:
    """Consumer lag from the broker, and the database's view of what awaits the reporter.

    Each gauge is refreshed on its own: one that cannot be read is cleared (its series
    vanishes, which the absent() alerts see) rather than left showing an old, calm value.
    """
    metrics = applier.metrics
    newest = applier.newest_event_time
    if newest is not None:
        metrics.event_time_lag.set(max(0.0, (datetime.now(UTC) - newest).total_seconds()))
    try:
        lag = consumer_lag(settings.kafka_bootstrap, settings.consumer_group, settings.topic)
    except Exception:
        metrics.consumer_lag.clear()
        _log.warning("could not read the consumer lag from the broker", exc_info=True)
    else:
        for partition, behind in lag.items():
            metrics.consumer_lag.labels(settings.topic, str(partition)).set(behind)
    try:
        metrics.unreported_windows.set(unreported_windows(applier.engine))
    except Exception:
        _log.warning("could not count the windows awaiting the reporter", exc_info=True)


async def _apply_until_done(
    app: faust.App,
    loop: asyncio.AbstractEventLoop,
    applier: BatchApplier,
    messages: list[Message],
) -> BatchResult:
    delay = 0.5
    while True:
        try:
            # The database work runs in a thread so faust keeps fetching meanwhile.
            return await loop.run_in_executor(None, applier.apply, messages)
        except Exception:
            if app.should_stop:
                # faust's shutdown waits for every event to be acked, forever; this batch was
                # not applied, so leave without acking: the next worker reads it again.
                _log.critical("stopping while a batch keeps failing; exiting without ack")
                os._exit(75)
            first, last = messages[0], messages[-1]
            _log.exception(
                "batch of %d messages (%s[%d]@%d .. [%d]@%d) failed; retrying in %.1f s, "
                "nothing is acknowledged until it succeeds",
                len(messages),
                first.topic,
                first.partition,
                first.offset,
                last.partition,
                last.offset,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)


def _message(event: Any) -> Message:
    message = event.message
    produced_at = datetime.fromtimestamp(message.timestamp, UTC) if message.timestamp > 0 else None
    return Message(message.topic, message.partition, message.offset, event.value, produced_at)


async def _send_dead_letters(app: faust.App, topic: Any, result: BatchResult) -> None:
    """Write every rejected message to the dead-letter topic and wait for the broker's ack;
    retry until it is confirmed (the batch is not acked before)."""
    delay = 0.5
    while True:
        try:
            await _send_dead_letters_once(topic, result)
            return
        except Exception:
            if app.should_stop:
                _log.critical("stopping while dead letters cannot be written; exiting without ack")
                os._exit(75)
            _log.exception(
                "writing %d dead letter(s) failed; retrying in %.1f s", len(result.rejected), delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)


async def _send_dead_letters_once(topic: Any, result: BatchResult) -> None:
    pending = []
    for rejected in result.rejected:
        message, rejection = rejected.message, rejected.rejection
        headers = [
            ("meterstream.reason", rejection.reason.encode()),
            ("meterstream.detail", rejection.detail.encode()[:1000]),
            ("meterstream.topic", message.topic.encode()),
            ("meterstream.partition", str(message.partition).encode()),
            ("meterstream.offset", str(message.offset).encode()),
        ]
        key = rejection.customer_id.encode() if rejection.customer_id else None
        pending.append(await topic.send(key=key, value=message.value or b"", headers=headers))
    if pending:
        await asyncio.gather(*pending)
