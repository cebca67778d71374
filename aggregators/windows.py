"""Tumbling event-time windows, aligned to UTC: an event time -> [window_start, window_end).

``1m``, ``1h`` and ``1d`` are fixed lengths; ``1mo`` is the calendar month in UTC, so a month's
window runs from the first at 00:00 to the first of the next month.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from meterstream.meters import Window

_FIXED = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def window_bounds(event_time: datetime, window: Window) -> tuple[datetime, datetime]:
    """The half-open window ``[start, end)`` that holds ``event_time`` (timezone-aware)."""
    utc = event_time.astimezone(UTC)
    if window == "1mo":
        start = utc.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
        return start, end
    size = _FIXED[window]
    start = _EPOCH + ((utc - _EPOCH) // size) * size
    return start, start + size
