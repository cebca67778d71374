"""A partition is stalled when messages wait on it and its committed offset stopped moving.

Consumer lag alone cannot tell a busy worker from a stuck one (a batch failing forever, a
worker hung in a rebalance): both show lag. A stuck one also commits nothing. ``StallWatch``
remembers, per partition, since when its committed offset has not moved while messages waited;
past ``stall_after_s`` the partition is reported stalled (the gauge
``meterstream_aggregator_partition_stalled``, alert ``MeterstreamPartitionStalled``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Seen:
    position: int
    # When the position last moved or nothing waited: the stall is measured from there.
    since_s: float


class StallWatch:
    """Stall detection over successive readings of the group's progress.

    Not thread-safe: one reader (the worker's gauge refresh) at a time.
    """

    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = stall_after_s
        self._seen: dict[int, _Seen] = {}

    def observe(self, partition: int, position: int, lag: int, now_s: float) -> float:
        """Record one reading (``now_s`` on a monotonic clock); return for how long the
        partition has had messages waiting with its committed offset standing still."""
        seen = self._seen.get(partition)
        if seen is None or seen.position != position or lag <= 0:
            self._seen[partition] = _Seen(position, now_s)
            return 0.0
        return now_s - seen.since_s

    def stalled(self, partition: int, position: int, lag: int, now_s: float) -> bool:
        """``observe``, then whether that lasted ``stall_after_s`` or more."""
        return self.observe(partition, position, lag, now_s) >= self.stall_after_s
