"""Stripe calls per million raw events: one hour of traffic folded into window totals each
report interval, with the real reporter after each interval or counted without it."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from aggregators.windows import window_bounds
from bench.report.emulator import EmulatorProcess
from bench.report.reporter import database, reporter_for
from bench.report.windows import METERS, Window, write_windows
from meterstream.meters import Catalogue
from reporters.stream import MAX_EVENTS_PER_CALL

INTERVAL_S = 60  # METERSTREAM_REPORT_INTERVAL_S's default
RAW_PER_CUSTOMER_HOUR = 100  # 1,000,000 raw events / 10,000 customers / hour
SESSION_RENEW_S = 15 * 60 - 60  # a v2 session lives 15 min; renewed 60 s early


@dataclass
class Calls:
    raw_events: int
    customers: int
    meter_events: int
    stream_calls: int  # v2 stream calls (100 events each), sessions included
    windows: int  # distinct windows: the count if the reporter ran once, after the hour
    per_cycle: list[int]
    per_meter: dict[str, int]  # meter events per meter

    def per_million(self, count: int) -> float:
        return count * 1_000_000 / self.raw_events


def hour_of_events(
    customers: int, seed: int = 7
) -> tuple[datetime, list[tuple[float, str, str, Decimal]]]:
    """RAW_PER_CUSTOMER_HOUR events per customer over one full hour that ended an hour ago,
    customers and meters uniform; (seconds into the hour, customer, meter, value), in order."""
    rng = random.Random(seed)  # reproducible traffic, not secrets
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    events = []
    for _ in range(customers * RAW_PER_CUSTOMER_HOUR):
        meter = METERS[rng.randrange(len(METERS))]
        value = {
            "tokens": rng.randint(1, 2000),
            "api_calls": 1,
            "peak_connections": rng.randint(1, 50),
        }
        events.append(
            (
                rng.uniform(0, 3600),
                f"cus_calls{rng.randrange(customers):06d}",
                meter,
                Decimal(value[meter]),
            )
        )
    events.sort(key=lambda e: e[0])
    return hour, events


def fold_intervals(
    catalogue: Catalogue,
    hour: datetime,
    events: Sequence[tuple[float, str, str, Decimal]],
    on_interval: Callable[[list[Window], list[Window]], None] | None = None,
) -> tuple[list[int], int, Counter[str]]:
    """Fold ``events`` into window totals one report interval at a time (count, sum, max, as
    the aggregators do: the revision moves only when the value changes); after each interval
    call ``on_interval(new, changed)``. Returns the windows changed per interval, the number
    of distinct windows, and the changes per meter."""
    totals: dict[tuple[str, str, datetime], Window] = {}
    changed_per_interval = []
    per_meter: Counter[str] = Counter()
    cursor = 0
    for interval in range(3600 // INTERVAL_S):
        end_s = (interval + 1) * INTERVAL_S
        touched: dict[tuple[str, str, datetime], Window] = {}
        new: set[tuple[str, str, datetime]] = set()
        while cursor < len(events) and events[cursor][0] < end_s:
            offset, customer, meter, value = events[cursor]
            cursor += 1
            at = hour + timedelta(seconds=offset)
            aggregation = catalogue.meters[meter].aggregation
            start, stop = window_bounds(at, catalogue.meters[meter].window)
            key = (customer, meter, start)
            window = totals.get(key)
            if window is None:
                window = totals[key] = Window(customer, meter, start, stop, Decimal(0), 0, 0, at)
                new.add(key)
            before = window.value if window.events else None
            if aggregation == "count":
                window.value += 1
            elif aggregation == "max":
                window.value = max(window.value, value) if window.events else value
            else:
                window.value += value
            window.events += 1
            window.last_event_time = max(window.last_event_time, at)
            if window.value != before:
                touched[key] = window
        for window in touched.values():
            window.revision += 1
            per_meter[window.meter] += 1
        changed_per_interval.append(len(touched))
        if on_interval is not None:
            on_interval(
                [totals[k] for k in touched if k in new],
                [totals[k] for k in touched if k not in new],
            )
    return changed_per_interval, len(totals), per_meter


def measured_calls(
    emulator: EmulatorProcess, catalogue: Catalogue, customers: int, postgres: str | None
) -> Calls:
    """Run the real reporter (stream mode) after each interval of a scaled-down hour."""
    hour, events = hour_of_events(customers)
    emulator.seed(sorted({e[1] for e in events}))
    sent: list[int] = []
    with database(postgres) as url:
        reporter, engine = reporter_for(url, emulator.url, catalogue, stream=True)
        try:

            def report(new: list[Window], changed: list[Window]) -> None:
                write_windows(engine, new, changed)
                result = reporter.run_cycle()
                if result.held or result.rejected or result.unacknowledged:
                    raise RuntimeError(f"report cycle did not deliver everything: {result}")
                sent.append(result.acknowledged)

            expected, windows, per_meter = fold_intervals(catalogue, hour, events, report)
        finally:
            engine.dispose()
    recorded, refused = emulator.counts()
    if sent != expected or recorded != sum(sent) or refused:
        raise RuntimeError(
            f"reporter sent {sum(sent)} meter events, the fold expected {sum(expected)}, "
            f"the emulator recorded {recorded} (refused {refused})"
        )
    return _calls(len(events), customers, sent, windows, per_meter)


def modelled_calls(catalogue: Catalogue, customers: int) -> Calls:
    """The same count without the reporter: one meter event per window changed per interval."""
    hour, events = hour_of_events(customers)
    per_interval, windows, per_meter = fold_intervals(catalogue, hour, events)
    return _calls(len(events), customers, per_interval, windows, per_meter)


def _calls(
    raw: int, customers: int, per_cycle: list[int], windows: int, per_meter: Counter[str]
) -> Calls:
    sessions = math.ceil(3600 / SESSION_RENEW_S)
    stream = sum(math.ceil(n / MAX_EVENTS_PER_CALL) for n in per_cycle) + sessions
    return Calls(raw, customers, sum(per_cycle), stream, windows, per_cycle, dict(per_meter))
