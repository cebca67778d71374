"""Each partition's applied offset, kept in the database with the totals it produced.

Kafka's committed offsets live outside the database: a database restored from a backup would be
resumed from offsets past the events it lost, and those events would never be counted. So every
batch's transaction also writes, per partition, one past the highest offset it applied
(``record_offsets``), and a worker assigned a partition starts from the database's offset when it
is behind Kafka's (``stored_offsets``, used by ``aggregators.offsets``). The events read again are
applied exactly once more, or not at all where the restored deduplication keys already hold them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Connection, Engine, Executable, func, select
from sqlalchemy.dialects import postgresql, sqlite

from meterstream.errors import BatchError
from meterstream.kafka import watermarks
from meterstream.lag import committed_offsets
from meterstream.schema import applied_offsets


@dataclass(frozen=True, slots=True)
class _Position:
    topic: str
    partition: int
    offset: int


class _Located(Protocol):
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...


def first_offsets(messages: Iterable[_Located]) -> dict[tuple[str, int], int]:
    """Per (topic, partition), the lowest offset among ``messages``."""
    lowest: dict[tuple[str, int], int] = {}
    for message in messages:
        key = (message.topic, message.partition)
        lowest[key] = min(lowest.get(key, message.offset), message.offset)
    return lowest


def next_offsets(messages: Iterable[_Located]) -> dict[tuple[str, int], int]:
    """Per (topic, partition), one past the highest offset among ``messages``."""
    highest: dict[tuple[str, int], int] = {}
    for message in messages:
        key = (message.topic, message.partition)
        highest[key] = max(highest.get(key, 0), message.offset + 1)
    return highest


class DatabaseWentBackError(BatchError):
    """The database's offset of a partition is behind what this worker itself recorded there:
    it was restored (or its rows deleted) under a running worker. Applying on would commit the
    next batch past the events the database lost; the worker must re-read from the database's
    offset instead, which it does when it is assigned the partition again (it exits)."""

    def __init__(self, topic: str, partition: int, stored: int, recorded: int) -> None:
        super().__init__(
            f"{topic}[{partition}]: the database's next offset is {stored} but this worker "
            f"recorded {recorded}; the database went back in time (a restore?). The worker "
            "must restart to re-read from the database's offset"
        )
        self.topic, self.partition, self.stored, self.recorded = topic, partition, stored, recorded

    def __reduce__(self) -> tuple[type[DatabaseWentBackError], tuple[str, int, int, int]]:
        # It travels back from the child pickled; the default would call __init__(message).
        return (DatabaseWentBackError, (self.topic, self.partition, self.stored, self.recorded))


def check_not_went_back(
    connection: Connection,
    firsts: dict[tuple[str, int], int],
    recorded: dict[tuple[str, int], int],
) -> None:
    """Raise DatabaseWentBackError when a partition's stored offset is behind ``recorded``
    (what this process committed there) and the batch, starting at ``firsts``, would skip the
    messages in between. Offsets only ever rise (GREATEST), so a lower one means the database
    was restored or edited under the running worker. A batch that starts at or before the
    stored offset (the worker was assigned the partition again and seeked there) is fine."""
    mine = {key: recorded[key] for key in firsts if key in recorded}
    if not mine:
        return
    query = select(
        applied_offsets.c.topic, applied_offsets.c.partition, applied_offsets.c.next_offset
    ).where(applied_offsets.c.topic.in_({topic for topic, _ in mine}))
    stored = {(t, int(p)): int(o) for t, p, o in connection.execute(query)}
    for (topic, partition), offset in sorted(mine.items()):
        database = stored.get((topic, partition), 0)
        if database < offset and firsts[(topic, partition)] > database:
            raise DatabaseWentBackError(topic, partition, database, offset)


def record_offsets(connection: Connection, messages: Iterable[_Located]) -> None:
    """Raise each partition's stored offset to cover ``messages``, inside the caller's
    transaction (never lower it: a batch of an earlier owner may commit after a newer one)."""
    rows = [
        {"topic": topic, "partition": partition, "next_offset": offset}
        # Sorted: two workers upserting the same partitions lock them in one order.
        for (topic, partition), offset in sorted(next_offsets(messages).items())
    ]
    if not rows:
        return
    statement: Executable
    if connection.dialect.name == "postgresql":
        pg = postgresql.insert(applied_offsets)
        statement = pg.on_conflict_do_update(
            index_elements=["topic", "partition"],
            set_={
                "next_offset": func.greatest(applied_offsets.c.next_offset, pg.excluded.next_offset)
            },
        )
    else:
        lite = sqlite.insert(applied_offsets)
        statement = lite.on_conflict_do_update(
            index_elements=["topic", "partition"],
            set_={
                "next_offset": func.max(applied_offsets.c.next_offset, lite.excluded.next_offset)
            },
        )
    connection.execute(statement, rows)


def stored_offsets(engine: Engine, topic: str) -> dict[int, int]:
    """Partition -> next offset to apply, as the database knows it (missing: never applied)."""
    query = select(applied_offsets.c.partition, applied_offsets.c.next_offset).where(
        applied_offsets.c.topic == topic
    )
    with engine.connect() as connection:
        return {int(p): int(o) for p, o in connection.execute(query)}


def stored_or_seeded(engine: Engine, bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """``stored_offsets``; when the database records none for ``topic`` yet (it was just
    upgraded to keep them), first record the group's committed offsets from the broker.

    Without that seed, a partition without traffic since the upgrade would later look like one
    the database never applied, and be read again from its first message.
    """
    stored = stored_offsets(engine, topic)
    if stored:
        return stored
    partitions = list(watermarks(bootstrap, topic))
    committed = committed_offsets(bootstrap, group, topic, partitions)
    if not committed:
        return {}
    with engine.begin() as connection:
        record_offsets(
            connection,
            [_Position(topic, p, offset - 1) for p, offset in committed.items() if offset > 0],
        )
    return stored_offsets(engine, topic)


def start_offsets(stored: dict[int, int], committed: dict[int, int | None]) -> dict[int, int]:
    """The partitions to seek back, and where: those whose database offset is behind Kafka's
    committed offset (the database lost applied events, e.g. restored from a backup).

    A database offset ahead of Kafka's is left alone: the events in between are read again and
    the deduplication keys make them no-ops. A database that records no offset of the topic at
    all never applied anything (``stored_or_seeded`` seeds an upgraded one): Kafka's offsets
    stand. One that records some partitions but not this one never applied it: from 0, which
    Kafka clamps to the first message kept (the reset policy is ``earliest``). A partition
    without a committed offset starts from the database's, when it records one.
    """
    if not stored:
        return {}
    seeks: dict[int, int] = {}
    for partition, kafka in committed.items():
        if kafka is None:
            # No committed offset (the group's offsets expired, or a new group name): the
            # reset policy would read the whole retained topic; the database knows better.
            if partition in stored:
                seeks[partition] = stored[partition]
            continue
        if kafka <= 0:
            continue
        database = stored.get(partition, 0)
        if database < kafka:
            seeks[partition] = database
    return seeks
