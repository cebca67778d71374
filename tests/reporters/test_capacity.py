"""The default rate keeps up with the README's sizing, and status says when a rate cannot."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import Engine, insert

from meterstream.schema import window_totals
from meterstream.settings import LIVE_RATE_PER_S, load_settings
from reporters.capacity import sending_capacity
from reporters.v1_sender import send_threads

# The README's sizing: 10,000 customers, each with a 1-minute api_calls window a minute.
SIZING_WINDOWS_PER_S = 10_000 / 60
STRIPE_LIVE_LIMIT_PER_S = 1_000


def changed_windows(engine: Engine, count: int, now: datetime) -> None:
    """``count`` 1-minute windows changed within the last hour, as the aggregators write them."""
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=59)
    rows = [
        {
            "customer_id": f"c{n}",
            "meter": "api_calls",
            "window_start": start,
            "window_end": start + timedelta(minutes=1),
            "value": Decimal(1),
            "events": 1,
            "revision": 1,
            "last_event_time": start,
            "last_event_id": f"e{n}",
            "first_applied_at": now - timedelta(minutes=30),
            "updated_at": now - timedelta(minutes=30),
        }
        for n in range(count)
    ]
    with engine.begin() as connection:
        connection.execute(insert(window_totals), rows)


def test_the_default_live_rate_keeps_up_with_the_readme_sizing_within_stripes_limit(
    migrated_engine: Engine,
) -> None:
    settings = load_settings(stripe_api_key="sk_live_51H8someLiveKey")
    assert settings.stripe_rate == LIVE_RATE_PER_S
    assert SIZING_WINDOWS_PER_S < settings.stripe_rate <= STRIPE_LIVE_LIMIT_PER_S
    capacity = sending_capacity(migrated_engine, settings, datetime.now(UTC))
    # The threads must make the rate possible too, not only the pacer allow it.
    assert capacity.windows_per_s == settings.stripe_rate
    assert send_threads(settings.stripe_rate) * 1 / 0.15 >= settings.stripe_rate
    # Twice the sizing at least, so a backlog (an outage) drains instead of lasting forever.
    assert capacity.windows_per_s >= 2 * SIZING_WINDOWS_PER_S


def test_a_test_key_keeps_the_sandbox_rate() -> None:
    assert load_settings(stripe_api_key="sk_test_51H8someTestKey").stripe_rate == 25
    assert load_settings(stripe_api_key="sk_test_51H8x", stripe_rate=300).stripe_rate == 300


def test_status_says_when_the_rate_cannot_keep_up(migrated_engine: Engine) -> None:
    now = datetime.now(UTC)
    changed_windows(migrated_engine, 720, now)  # 0.2 windows a second over the last hour
    slow = load_settings(stripe_api_key="sk_live_51H8x", stripe_rate=0.1)
    fast = load_settings(stripe_api_key="sk_live_51H8x", stripe_rate=1)

    behind = sending_capacity(migrated_engine, slow, now)
    keeping = sending_capacity(migrated_engine, fast, now)

    assert not behind.keeps_up and keeping.keeps_up
    assert "CANNOT KEEP UP: 12 window(s) change per 60 s interval" in behind.line()
    assert "it sends at most 6" in behind.line()
    assert "keeps up" in keeping.line()
    streamed = sending_capacity(
        migrated_engine, slow.model_copy(update={"stripe_stream": True}), now
    )
    assert streamed.keeps_up  # 100 windows a call
