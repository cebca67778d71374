"""Batches are decoded and applied in a child process, in the order they were taken.

faust's event loop and the database path each need most of a core, and one interpreter runs
only one of them at a time (the GIL). So the worker process only takes messages from faust and
acknowledges them; one child process (``_Child``) owns the BatchApplier and its engine, decodes
the raw values and commits each batch in its own transaction.

Order: every batch carries a sequence number, and the child applies batch ``n`` only after
batch ``n - 1`` committed. A batch that arrives early (its predecessor failed, or the child was
replaced) is refused with ``OutOfOrderError`` without touching the database, and the worker
sends it again after its predecessor. A batch sent again after it committed is applied again,
which the deduplication keys make a no-op. The child records the last sequence it committed in
memory shared with the worker (after the commit), so a child that dies is replaced by one that
starts right after it: never past a batch that did not commit, and never before one the worker
will not send again (which would stall the worker, every later batch being refused).
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from ctypes import c_longlong
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, TypeVar

from aggregators.batch import BatchApplier, BatchResult, Message
from aggregators.intake import produced_at
from aggregators.offset_store import DatabaseWentBackError
from meterstream.content_modes import Header
from meterstream.db import build_engine
from meterstream.errors import BatchFailedError, OutOfOrderError
from meterstream.meters import Catalogue, load_catalogue
from meterstream.metrics import AggregatorMetrics
from meterstream.settings import Settings

_log = logging.getLogger(__name__)

# (topic, partition, offset, value, Kafka timestamp in s or 0, headers): plain values pickle
# fast. The headers carry a binary-mode event's attributes (meterstream/content_modes.py).
RawMessage = tuple[str, int, int, bytes | None, float, tuple[Header, ...]]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class AppliedBatch:
    """What the child reports of a committed batch (without the changed windows)."""

    sequence: int
    result: BatchResult
    size: int
    seconds: float


class _Child:
    """The child process's state: one BatchApplier, and the shared record of the last batch
    sequence committed (which says which batch it may apply next)."""

    def __init__(self, settings: Settings, committed: c_longlong, catalogue: Catalogue) -> None:
        engine = build_engine(settings)
        # Its counters are not exposed: the worker counts what each AppliedBatch reports.
        self.applier = BatchApplier(
            engine,
            catalogue,
            AggregatorMetrics(),
            horizon_days=settings.horizon_days,
            future_tolerance_s=settings.future_tolerance_s,
            max_combinations=settings.max_combinations,
        )
        self._committed = committed

    def apply(self, sequence: int, raw: list[RawMessage]) -> AppliedBatch:
        expected = self._committed.value + 1
        if sequence > expected:
            raise OutOfOrderError(sequence, expected)
        started = time.perf_counter()
        messages = [
            Message(topic, partition, offset, value, _produced_at(timestamp_s), headers)
            for topic, partition, offset, value, timestamp_s, headers in raw
        ]
        result = self.applier.apply(messages)
        # A crash before this line replays a committed batch: a no-op, never a loss.
        self._committed.value = max(self._committed.value, sequence)
        # The reporter reads changed windows from the database; don't ship thousands back.
        result.changed = []
        return AppliedBatch(sequence, result, len(raw), time.perf_counter() - started)


# Set only inside the child process, by _start_child (a pool's initializer has nowhere else to
# put what it builds); the worker process never touches it.
_child: _Child | None = None


def _start_child(
    settings: Settings,
    committed: c_longlong,
    catalogue: Catalogue,
    logging_config: dict[str, Any] | None,
) -> None:
    global _child
    # The worker decides when to stop: Ctrl-C reaches the whole process group, and the child
    # must finish the batch in hand rather than die in the middle of it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A spawned child starts with no logging set up: the face's config, when the worker got one,
    # so its lines share the format (without one, Python's last-resort handler prints warnings).
    if logging_config is not None:
        logging.config.dictConfig(logging_config)
    _child = _Child(settings, committed, catalogue)
    threading.Thread(target=_exit_with_parent, name="meterstream-parent-watch", daemon=True).start()


def _exit_with_parent() -> None:
    # The pool's queues hold both ends of their pipes, so a worker killed with SIGKILL would
    # leave this child waiting forever. Nothing here needs finishing: a batch whose worker died
    # is never acknowledged, so it is read again (and deduplicated) whether it committed or not.
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)


def _apply_in_child(sequence: int, raw: list[RawMessage]) -> AppliedBatch:
    assert _child is not None, "the pool's initializer builds _child"  # noqa: S101
    try:
        return _child.apply(sequence, raw)
    except (OutOfOrderError, DatabaseWentBackError):
        raise  # both pickle, and the worker acts on each
    except Exception as exc:
        # Database errors do not all survive pickling, and one that does not breaks the pool
        # (and costs a new child) instead of reaching the worker's retry as an error.
        raise BatchFailedError(f"{type(exc).__name__}: {exc}") from exc


def _prune_in_child(today: date) -> int:
    assert _child is not None, "the pool's initializer builds _child"  # noqa: S101
    try:
        return _child.applier.dedup.prune(today)
    except Exception as exc:
        # As in _apply_in_child: an error that does not pickle would break the pool.
        raise BatchFailedError(f"pruning failed: {type(exc).__name__}: {exc}") from exc


def _produced_at(timestamp_s: float) -> datetime | None:
    # Never raises: a timestamp no datetime holds (microseconds written as milliseconds) would
    # otherwise fail the whole batch, again and again.
    return produced_at(timestamp_s)


class ApplyPipeline:
    """Hands batches to the applying child process; replaces the child when it dies.

    Not thread-safe: call it from the worker's event loop only.
    """

    def __init__(
        self,
        settings: Settings,
        catalogue: Catalogue | None = None,
        logging_config: dict[str, Any] | None = None,
    ) -> None:
        self._settings = settings
        self._logging_config = logging_config
        # The catalogue the worker checked at start (aggregators.definitions), handed to every
        # child: a child replaced later must not read a file edited since.
        self._catalogue = catalogue or load_catalogue(settings.meters_file)
        # spawn, not fork: the worker runs threads (faust, Prometheus), which fork does not copy.
        self._context = multiprocessing.get_context("spawn")
        # The last batch sequence committed; written by the child, outlives it. No lock: one
        # child writes it at a time, and a child killed holding a lock would stall the next.
        self._committed: c_longlong = self._context.Value("q", 0, lock=False)
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=self._context,
            initializer=_start_child,
            initargs=(self._settings, self._committed, self._catalogue, self._logging_config),
        )

    def submit(self, sequence: int, raw: list[RawMessage]) -> asyncio.Future[AppliedBatch]:
        """Start applying batch ``sequence``; the future fails with OutOfOrderError if it must
        be sent again after its predecessor, or BrokenProcessPool if the child died."""
        return asyncio.wrap_future(self._submit(_apply_in_child, sequence, raw))

    async def prune(self, today: date) -> int:
        """Drop deduplication keys past the horizon (in the child, which caches partitions)."""
        return await asyncio.wrap_future(self._submit(_prune_in_child, today))

    def _submit(self, function: Callable[..., _T], *arguments: object) -> Future[_T]:
        try:
            return self._executor.submit(function, *arguments)
        except BrokenProcessPool:
            _log.error("the applying process died; starting a new one")
            # A pool breaks also when a result cannot be read back, with its child alive; it
            # then only sends SIGTERM, which the child ignores. Two children at once would
            # race on the committed record, so the old one is killed first.
            _kill_children(self._executor)
            self._executor.shutdown(wait=False)
            self._executor = self._new_executor()
            return self._executor.submit(function, *arguments)

    def close(self, timeout_s: float = 60.0) -> None:
        """Let the child finish the batch in hand (up to ``timeout_s``), then stop it. A batch
        cut short is not acknowledged, so the next worker reads it again."""
        processes = list(_children(self._executor))
        self._executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                _log.error("the applying process did not stop within %.0f s; killing it", timeout_s)
                process.kill()
                process.join()


def _children(executor: ProcessPoolExecutor) -> list[multiprocessing.process.BaseProcess]:
    # ProcessPoolExecutor keeps its processes in _processes (CPython 3.11-3.13); without it,
    # nothing is killed, which only matters for a child that ignores SIGTERM and hangs.
    processes = getattr(executor, "_processes", None) or {}
    return list(processes.values())


def _kill_children(executor: ProcessPoolExecutor) -> None:
    for process in _children(executor):
        process.kill()  # a no-op for a process already gone
        process.join()
