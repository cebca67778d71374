"""A partition is stalled when messages wait and its committed offset stands still long enough;
not when it is merely busy, nor when it was idle before messages arrived."""

from __future__ import annotations

from aggregators.stall import StallWatch


def test_waiting_messages_and_a_still_offset_stall_after_the_set_time() -> None:
    watch = StallWatch(stall_after_s=300)
    assert not watch.stalled(0, position=100, lag=50, now_s=1_000)
    assert not watch.stalled(0, position=100, lag=80, now_s=1_299)
    assert watch.stalled(0, position=100, lag=90, now_s=1_300)
    # The offset moves: no longer stalled, and the clock starts again.
    assert not watch.stalled(0, position=101, lag=89, now_s=1_310)
    assert not watch.stalled(0, position=101, lag=89, now_s=1_600)
    assert watch.stalled(0, position=101, lag=89, now_s=1_610)


def test_a_busy_partition_is_not_stalled() -> None:
    watch = StallWatch(stall_after_s=300)
    for step in range(100):
        assert not watch.stalled(3, position=step * 500, lag=10_000, now_s=step * 10.0)


def test_an_idle_partition_is_not_stalled_when_messages_arrive() -> None:
    watch = StallWatch(stall_after_s=300)
    assert not watch.stalled(1, position=40, lag=0, now_s=0)
    # An hour without messages, then some arrive: measured from the last reading with
    # nothing waiting, not from the last commit an hour ago.
    assert not watch.stalled(1, position=40, lag=0, now_s=3_600)
    assert not watch.stalled(1, position=40, lag=5, now_s=3_610)
    assert not watch.stalled(1, position=40, lag=5, now_s=3_899)
    assert watch.stalled(1, position=40, lag=5, now_s=3_900)
    # Partitions are watched apart.
    assert not watch.stalled(2, position=40, lag=5, now_s=3_900)
