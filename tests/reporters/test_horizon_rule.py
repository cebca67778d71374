"""One horizon rule (meterstream/horizon.py): usage the SDK accepts is usage the reporter sends.

Before, the SDK and the workers took events up to 35 days old while the reporter refused
anything older than 34: an event 34.5 days old was accepted, counted, then rejected.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from aggregators.intake import Accepted, Clock, Rejection, admit
from meterstream.errors import InvalidEventError
from meterstream.events import UsageEvent, check_event_time, encode_event
from meterstream.horizon import CALL_MARGIN, HORIZON_MARGIN, oldest_accepted
from meterstream.meters import load_catalogue
from reporters.ledger import all_rows
from tests.conftest import EXAMPLE_METERS
from tests.reporters.test_billing_safety import StepClock, reporter_with
from tests.reporters.test_reporter import World, put_total

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


def test_the_sdk_refuses_an_event_one_second_past_the_intake_limit() -> None:
    edge = NOW - timedelta(days=35) + HORIZON_MARGIN

    assert check_event_time(edge + SECOND, now=NOW, horizon_days=35) == edge + SECOND
    with pytest.raises(InvalidEventError) as refused:
        check_event_time(edge - SECOND, now=NOW, horizon_days=35)
    assert "METERSTREAM_HORIZON_DAYS" in str(refused.value)
    # 34.5 days old: the SDK took it before, and the reporter then rejected it.
    with pytest.raises(InvalidEventError):
        check_event_time(NOW - timedelta(days=34, hours=12), now=NOW, horizon_days=35)


def test_the_workers_apply_the_sdk_rule_at_the_time_the_sdk_accepted_the_event() -> None:
    catalogue = load_catalogue(EXAMPLE_METERS)
    produced_at = NOW - timedelta(hours=20)  # the workers were 20 hours behind
    edge = oldest_accepted(produced_at, 35)

    def admitted(event_time: datetime) -> Accepted | Rejection:
        event = UsageEvent("e", "s", "c", "tokens", Decimal(1), event_time)
        clock = Clock(now=NOW, future_tolerance_s=600.0, horizon_days=35)
        return admit(encode_event(event), catalogue, clock=clock, produced=produced_at)

    assert isinstance(admitted(edge + SECOND), Accepted)
    refused = admitted(edge - SECOND)
    assert isinstance(refused, Rejection)
    assert refused.reason == "beyond_horizon"


def test_usage_accepted_at_the_edge_is_still_sent_a_day_later_less_the_call_margin(
    world: World,
) -> None:
    accepted_at = datetime.now(UTC)
    stamp = (oldest_accepted(accepted_at, 35) + timedelta(minutes=1)).replace(microsecond=0)
    window = stamp.replace(minute=0, second=0, microsecond=0)
    put_total(world.engine, "cus_a", "tokens", window, "6", last_event_time=stamp)
    clock = StepClock()
    # The workers and the reporter were down for most of the margin.
    clock.offset = HORIZON_MARGIN - CALL_MARGIN - timedelta(minutes=2)

    result = reporter_with(world, clock).run_cycle()

    assert result.rejected == 0
    assert [(r.status, r.timestamp) for r in all_rows(world.engine)] == [("sent", stamp)]
    assert world.totals() == {("tokens", "cus_a"): 6}
