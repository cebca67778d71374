"""meterstream.backoff: the delays every stage's retries wait."""

from __future__ import annotations

import pytest

from meterstream.backoff import backoff_s


def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    assert [backoff_s(n, 0.5, 5.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_backoff_stays_at_the_cap_after_a_long_outage() -> None:
    assert backoff_s(100_000, 0.5, 30.0) == 30.0


def test_backoff_counts_attempts_from_one() -> None:
    with pytest.raises(ValueError, match="attempt counts from 1, got 0"):
        backoff_s(0, 0.5, 5.0)
