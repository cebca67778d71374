"""The pipelined worker: batches applied in a child process, acknowledged only after they commit.

Real broker, real PostgreSQL, real worker processes; faults are real too (SIGKILL, a held lock).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine

from aggregators.pipeline import ApplyPipeline, RawMessage
from aggregators.reference import reference_totals
from meterstream.db import build_engine, migrate
from meterstream.errors import OutOfOrderError
from meterstream.events import UsageEvent, encode_event
from meterstream.kafka import watermarks
from meterstream.lag import consumer_lag
from meterstream.meters import load_catalogue
from meterstream.settings import Settings
from tests.aggregators.test_batch import stored_totals
from tests.aggregators.test_worker import record_stream
from tests.aggregators.workers import events_applied, wait_until, worker
from tests.conftest import EXAMPLE_METERS

SettingsFactory = Callable[..., Settings]


def applying_child(worker_pid: int) -> int | None:
    """The pid of the worker's applying child process, if it has one right now."""
    try:
        children = Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split()
    except FileNotFoundError:
        return None
    for pid in children:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in command:
            return int(pid)
    return None


def migrated(settings: Settings) -> Engine:
    engine = build_engine(settings)
    migrate(engine)
    return engine


def _applied_at_least(engine: Engine, count: int) -> bool:
    return events_applied(engine) >= count


def test_applying_process_killed_mid_stream_loses_nothing_and_the_worker_carries_on(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    postgres_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(
        topic=topic_factory(4), database_url=postgres_url, aggregate_batch_max_events=200
    )
    engine = migrated(settings)
    events = record_stream(settings, 20_000, seed=7)
    with worker(settings, tmp_path / "worker.log") as process:
        killed: list[int] = []
        for threshold in (1, 5_000, 10_000):
            wait_until(partial(_applied_at_least, engine, threshold), 120, f"{threshold} applied")
            child = applying_child(process.pid)
            assert child is not None and child not in killed
            os.kill(child, signal.SIGKILL)
            killed.append(child)
        # The worker itself carries on with a new child and ends exact.
        wait_until(lambda: events_applied(engine) >= 20_000, 120, "20,000 events applied")
        assert process.poll() is None
        wait_until(lambda: _committed(settings) == _messages(settings), what="every offset")
        # SIGTERM (as Ctrl-C): a clean exit that takes the child with it.
        child = applying_child(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert child is not None and not Path(f"/proc/{child}").exists()
    catalogue = load_catalogue(EXAMPLE_METERS)
    assert stored_totals(engine) == reference_totals(events, catalogue)
    engine.dispose()


def _messages(settings: Settings) -> int:
    return sum(high for _low, high in watermarks(settings.kafka_bootstrap, settings.topic).values())


def _committed(settings: Settings) -> int:
    """Messages whose offsets the group has committed."""
    lag = consumer_lag(settings.kafka_bootstrap, settings.consumer_group, settings.topic)
    return _messages(settings) - sum(lag.values())


def _longest_lock_wait_s(url: str) -> float:
    """How long the longest statement blocked on a lock has waited, by the database's clock."""
    with psycopg.connect(url, autocommit=True) as connection:
        row = connection.execute(
            "SELECT coalesce(max(extract(epoch FROM now() - query_start)), 0) "
            "FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone()
    return float(row[0]) if row else 0.0


def test_acks_never_get_ahead_of_commits_while_the_database_blocks(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    postgres_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_factory(
        topic=topic_factory(2), database_url=postgres_url, aggregate_batch_max_events=100
    )
    engine = migrated(settings)
    first = record_stream(settings, 1_000, seed=8)
    first_messages = _messages(settings)
    with worker(settings, tmp_path / "worker.log") as process:
        wait_until(lambda: events_applied(engine) >= 1_000, what="the first 1,000 events")
        wait_until(lambda: _committed(settings) == first_messages, what="their offsets committed")
        with psycopg.connect(postgres_url) as blocker:
            # Writers wait; readers (this test) still see what committed.
            blocker.execute("LOCK TABLE window_totals IN EXCLUSIVE MODE")
            second = record_stream(settings, 3_000, seed=9, id_prefix="s")
            # Meanwhile the worker takes the batches behind the blocked one, and faust gets
            # several commit intervals (1 s) to commit whatever was acknowledged.
            wait_until(lambda: _longest_lock_wait_s(postgres_url) >= 4, what="a blocked batch")
            applied, committed = events_applied(engine), _committed(settings)
            child = applying_child(process.pid)
            process.send_signal(signal.SIGKILL)
            process.wait()
            blocker.rollback()
        assert applied == 1_000
        assert committed == first_messages
        # The orphaned child does not linger (its batch is read again and deduplicated).
        assert child is not None
        wait_until(lambda: not Path(f"/proc/{child}").exists(), what="the orphaned child to exit")
    with worker(settings, tmp_path / "worker.log"):
        wait_until(lambda: events_applied(engine) >= 4_000, 120, "all 4,000 events")
    catalogue = load_catalogue(EXAMPLE_METERS)
    assert stored_totals(engine) == reference_totals(first + second, catalogue)
    engine.dispose()


def _batch(first: int, count: int) -> list[RawMessage]:
    now = datetime.now(UTC)
    return [
        (
            "usage",
            0,
            offset,
            encode_event(UsageEvent(f"e{offset}", "s", "c1", "tokens", Decimal(1), now)),
            now.timestamp(),
            (),
        )
        for offset in range(first, first + count)
    ]


class _Unreadable:
    """Pickles in the child, cannot be unpickled in the worker: that breaks the pool while
    its child lives on (as a database error that does not unpickle would)."""

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return (_refuse_to_unpickle, ())


def _refuse_to_unpickle() -> None:
    raise RuntimeError("this result cannot be read back")


def _unreadable() -> _Unreadable:
    return _Unreadable()


def test_a_pool_broken_while_its_child_lives_kills_that_child_before_starting_another(
    settings_factory: SettingsFactory, postgres_url: str
) -> None:
    settings = settings_factory(database_url=postgres_url)
    engine = migrated(settings)

    async def scenario() -> None:
        pipeline = ApplyPipeline(settings)
        try:
            old_child = await asyncio.wrap_future(pipeline._submit(os.getpid))
            unreadable = asyncio.wrap_future(pipeline._submit(_unreadable))
            # Queued behind it, so the old child is busy (not idle) when the pool breaks.
            busy = asyncio.wrap_future(pipeline._submit(time.sleep, 30))
            with pytest.raises(BrokenProcessPool):
                await unreadable
            with pytest.raises(BrokenProcessPool):
                await busy
            # The child ignores SIGTERM (the pool's way of ending it): only a kill ends it.
            applied = await pipeline.submit(1, _batch(0, 10))
            assert applied.result.applied == 10
            assert not Path(f"/proc/{old_child}").exists()
            assert await asyncio.wrap_future(pipeline._submit(os.getpid)) != old_child
        finally:
            pipeline.close()

    asyncio.run(scenario())
    assert events_applied(engine) == 10
    engine.dispose()


def test_batches_commit_in_sequence_and_a_resent_batch_is_a_no_op(
    settings_factory: SettingsFactory, postgres_url: str
) -> None:
    settings = settings_factory(database_url=postgres_url)
    engine = migrated(settings)

    async def scenario() -> None:
        pipeline = ApplyPipeline(settings)
        try:
            # Batch 2 before batch 1 committed: refused, and nothing of it is applied.
            with pytest.raises(OutOfOrderError):
                await pipeline.submit(2, _batch(10, 10))
            assert events_applied(engine) == 0
            first = await pipeline.submit(1, _batch(0, 10))
            assert (first.result.applied, first.size) == (10, 10)
            # Sent again (its result was lost with a child, say): applied again, counted once.
            again = await pipeline.submit(1, _batch(0, 10))
            assert (again.result.applied, again.result.duplicates) == (0, 10)
            second = await pipeline.submit(2, _batch(10, 10))
            assert second.result.applied == 10
        finally:
            pipeline.close()

    asyncio.run(scenario())
    assert events_applied(engine) == 20
    engine.dispose()


def test_every_child_applies_the_catalogue_checked_at_start_not_the_file_edited_since(
    settings_factory: SettingsFactory, postgres_url: str, tmp_path: Path
) -> None:
    edited = tmp_path / "meters.toml"
    edited.write_text('[meters.api_calls]\naggregation = "count"\nwindow = "1m"\n')
    settings = settings_factory(database_url=postgres_url, meters_file=edited)
    engine = migrated(settings)

    async def scenario() -> None:
        pipeline = ApplyPipeline(settings, load_catalogue(EXAMPLE_METERS))
        try:
            first = await pipeline.submit(1, _batch(0, 5))
            # The child dies and is replaced: the new one still has "tokens".
            os.kill(await asyncio.wrap_future(pipeline._submit(os.getpid)), signal.SIGKILL)
            deadline = time.monotonic() + 30
            while True:  # as the worker does: send again until a new child takes it
                try:
                    second = await pipeline.submit(2, _batch(5, 5))
                    break
                except BrokenProcessPool:
                    assert time.monotonic() < deadline, "no new child took the batch"
            assert (first.result.applied, second.result.applied) == (5, 5)
            assert not first.result.rejected and not second.result.rejected
        finally:
            pipeline.close()

    asyncio.run(scenario())
    assert events_applied(engine) == 10
    engine.dispose()
