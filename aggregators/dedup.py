"""Deduplication: a 16-byte key per (source, event id, customer, meter), kept by event day for the
horizon.

In PostgreSQL ``seen_events`` is partitioned by event day: each day's partition is created before
a batch needs it, and pruning past the horizon drops whole partitions (no row deletes, no vacuum).
SQLite keeps one table and deletes old rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import date, timedelta

from sqlalchemy import Connection, Engine, select, text, tuple_
from sqlalchemy.exc import DBAPIError

from aggregators import postgres
from aggregators.sql import insert_ignoring_conflicts
from meterstream.events import UsageEvent
from meterstream.retention import delete_in_batches
from meterstream.schema import seen_events, seen_events_legacy

_CHUNK = 1000


def legacy_dedup_key(source: str, event_id: str) -> bytes:
    """The key as written before migration 0003: (source, id) only."""
    return hashlib.blake2b(source.encode() + b"\x00" + event_id.encode(), digest_size=16).digest()


class DedupKeys:
    """The deduplication keys in the database, and their day partitions."""

    def __init__(self, engine: Engine, horizon_days: int) -> None:
        self._engine = engine
        self._horizon_days = horizon_days
        self._partitioned = engine.dialect.name == "postgresql"
        self._ready_days: set[date] = set()
        self._legacy_read = False
        self._legacy_until: date | None = None

    def prepare(self, days: Iterable[date]) -> None:
        """Make sure each day has its partition (PostgreSQL), outside the batch's transaction."""
        if not self._partitioned:
            return
        for day in sorted(set(days) - self._ready_days):
            name = f"seen_events_{day:%Y%m%d}"
            upper = day + timedelta(days=1)
            statement = (
                f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF seen_events "
                f"FOR VALUES FROM ('{day.isoformat()}') TO ('{upper.isoformat()}')"
            )
            try:
                with self._engine.begin() as connection:
                    connection.execute(text(statement))
            except DBAPIError as exc:
                # Another worker created it between our check and our CREATE: that is fine.
                if "already exists" not in str(exc.orig):
                    raise
            self._ready_days.add(day)

    def forget_partitions(self) -> None:
        """Check every day's partition again before the next batch (one may have been
        dropped under this process: a restored database, a DROP by hand)."""
        self._ready_days.clear()

    def claim(self, connection: Connection, events: Sequence[UsageEvent]) -> list[UsageEvent]:
        """Record the keys of ``events``; return the events seen for the first time, in order.

        A key repeated within ``events`` counts once (its first occurrence); a key already in the
        database (an earlier batch, a replay, a re-send) does not count at all.
        """
        first: dict[bytes, UsageEvent] = {}
        for event in events:
            first.setdefault(event.dedup_key, event)
        self._drop_seen_before_upgrade(connection, first)
        if not first:
            return []
        if self._partitioned:
            # Known limit: the neighbour-day probe sees committed keys only. Two workers applying
            # both copies of a re-send re-stamped across midnight at the same moment would both
            # count it. Key = customer puts both copies on one partition, and faust finishes a
            # revoked partition's batch before another worker takes it, so only a zombie worker
            # (one whose session expired mid-batch) could do that.
            candidates = {(event.event_time.date(), key): event for key, event in first.items()}
            inserted = postgres.claim_keys(connection, list(candidates))
            return [event for ident, event in candidates.items() if ident in inserted]
        # A re-send re-stamped by its producer may fall on the next or previous UTC day (say,
        # 23:59:59 then 00:00:01): look for the key there too.
        seen = self._seen_on_neighbour_days(connection, first)
        fresh = {
            (event.event_time.date(), key): event for key, event in first.items() if key not in seen
        }
        if not fresh:
            return []
        statement = insert_ignoring_conflicts(connection, seen_events).returning(
            seen_events.c.event_day, seen_events.c.key
        )
        rows = [{"event_day": day, "key": key} for day, key in fresh]
        inserted = {(row.event_day, row.key) for row in connection.execute(statement, rows)}
        return [event for ident, event in fresh.items() if ident in inserted]

    def _drop_seen_before_upgrade(
        self, connection: Connection, first: dict[bytes, UsageEvent]
    ) -> None:
        """Drop from ``first`` the events whose key, as written before migration 0003, is kept.

        Keys were (source, id) until 0003; they cannot be converted, so a re-send of an event
        applied before the upgrade is looked for under its old key too. Only events of days that
        may hold old keys are probed, so this costs nothing once the horizon has passed.
        """
        if not self._legacy_read:
            row = connection.execute(select(seen_events_legacy.c.until_day)).first()
            self._legacy_until = row.until_day if row is not None else None
            self._legacy_read = True
        until = self._legacy_until
        if until is None:
            return
        eligible = {
            legacy_dedup_key(event.source, event.event_id): key
            for key, event in first.items()
            if event.event_time.date() <= until + timedelta(days=1)
        }
        if not eligible:
            return
        probes = [
            (first[key].event_time.date() + timedelta(days=shift), legacy)
            for legacy, key in eligible.items()
            for shift in (-1, 0, 1)
        ]
        pk = tuple_(seen_events.c.event_day, seen_events.c.key)
        for start in range(0, len(probes), _CHUNK):
            rows = connection.execute(
                select(seen_events.c.key).where(pk.in_(probes[start : start + _CHUNK]))
            )
            for row in rows:
                first.pop(eligible[row.key], None)

    def _seen_on_neighbour_days(
        self, connection: Connection, first: dict[bytes, UsageEvent]
    ) -> set[bytes]:
        probes = [
            (event.event_time.date() + timedelta(days=shift), key)
            for key, event in first.items()
            for shift in (-1, 1)
        ]
        pk = tuple_(seen_events.c.event_day, seen_events.c.key)
        seen: set[bytes] = set()
        for start in range(0, len(probes), _CHUNK):
            rows = connection.execute(
                select(seen_events.c.key).where(pk.in_(probes[start : start + _CHUNK]))
            )
            seen.update(row.key for row in rows)
        return seen

    def prune(self, today: date) -> int:
        """Forget keys older than the horizon; return how many key partitions or rows went.
        (unique_count values are pruned with the windows: aggregators.retention.)"""
        cutoff = today - timedelta(days=self._horizon_days + 1)
        if not self._partitioned:
            # In small transactions: the embedded database has one writer at a time.
            return delete_in_batches(
                self._engine, seen_events, seen_events.c.event_day < cutoff, batch_rows=_CHUNK
            )
        dropped = 0
        with self._engine.begin() as connection:
            names = connection.execute(
                text(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'seen_events'"
                )
            ).scalars()
            for name in list(names):
                day = date(int(name[-8:-4]), int(name[-4:-2]), int(name[-2:]))
                if day < cutoff:
                    connection.execute(text(f"DROP TABLE IF EXISTS {name}"))
                    self._ready_days.discard(day)
                    dropped += 1
        return dropped
