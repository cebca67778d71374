"""Can the configured sending rate keep up with the windows the aggregators close?

``meterstream status`` compares the windows that changed in the last hour (each one a meter
event once it is due) with what the reporter can send in the same time at
METERSTREAM_STRIPE_RATE: v1 sends one window a call, with ``send_threads`` threads of about
ASSUMED_CALL_S a call; the v2 stream sends 100 windows a call, one call at a time. A rate that
cannot keep up means a backlog that never drains: billing falls further behind every hour.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select

from meterstream.schema import window_totals
from meterstream.settings import Settings
from reporters.stream import MAX_EVENTS_PER_CALL
from reporters.v1_sender import ASSUMED_CALL_S, send_threads

_HOUR = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Capacity:
    mode: str  # v1 | stream
    rate_per_s: float  # METERSTREAM_STRIPE_RATE, calls a second
    windows_per_s: float  # windows the reporter can send a second
    changed_per_s: float  # windows changed a second over the last hour
    interval_s: float  # METERSTREAM_REPORT_INTERVAL_S

    @property
    def keeps_up(self) -> bool:
        return self.windows_per_s >= self.changed_per_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "rate_per_s": self.rate_per_s,
            "windows_per_s": round(self.windows_per_s, 1),
            "changed_per_s": round(self.changed_per_s, 1),
            "interval_s": self.interval_s,
            "keeps_up": self.keeps_up,
        }

    def line(self) -> str:
        per_interval = (
            f"{self.changed_per_s * self.interval_s:,.0f} window(s) change per "
            f"{self.interval_s:.0f} s interval (last hour), it sends at most "
            f"{self.windows_per_s * self.interval_s:,.0f}"
        )
        head = f"sending ({self.mode} at METERSTREAM_STRIPE_RATE={self.rate_per_s:g} calls/s): "
        if self.keeps_up:
            return head + f"keeps up: {per_interval}"
        return (
            head + f"CANNOT KEEP UP: {per_interval}; the backlog grows. Raise "
            "METERSTREAM_STRIPE_RATE (Stripe allows 1,000 calls/s live) or set "
            "METERSTREAM_STRIPE_STREAM=1 (100 windows a call)"
        )


def sending_capacity(engine: Engine, settings: Settings, now: datetime) -> Capacity:
    """The configured rate against the windows changed in the hour before ``now``."""
    with engine.connect() as connection:
        changed = connection.execute(
            select(func.count()).where(window_totals.c.updated_at >= now - _HOUR)
        ).scalar_one()
    rate = settings.stripe_rate
    if settings.stripe_stream:
        # One call at a time, each up to 100 windows.
        windows_per_s = min(rate, 1 / ASSUMED_CALL_S) * MAX_EVENTS_PER_CALL
        mode = "stream"
    else:
        windows_per_s = min(rate, send_threads(rate) / ASSUMED_CALL_S)
        mode = "v1"
    return Capacity(
        mode, rate, windows_per_s, changed / _HOUR.total_seconds(), settings.report_interval_s
    )
