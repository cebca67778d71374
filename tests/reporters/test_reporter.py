"""The reporter end to end: real stripe SDK over HTTP to the emulator, PostgreSQL and SQLite.

Tests write window_totals rows themselves (the database is the interface between the stages),
run report cycles, and check what Stripe (the emulator) holds and what the ledger says.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import stripe
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, select

from meterstream.meters import Catalogue, load_catalogue
from meterstream.metrics import ReporterMetrics
from meterstream.report_queue import queue_windows
from meterstream.schema import window_totals
from meterstream.settings import Settings, load_settings
from reporters.carry import exact_sum, whole_units
from reporters.customers import link_customer
from reporters.cycle import CycleResult, Reporter
from reporters.ledger import all_rows, rows_for
from reporters.service import build_reporter, connect
from stripe_emulator import Emulator, ManualClock, run_stripe_emulator

SECRET = "sk_test_51H8reporterSecretXyzzy"  # noqa: S105  # a fake key the tests hunt for
CATALOGUE = """
[meters.tokens]
aggregation = "sum"
window = "1h"
stripe_event_name = "tokens"

[meters.storage]
aggregation = "sum"
window = "1h"
stripe_event_name = "storage_mb"
unit_scale = "1000"
allow_negative = true

[meters.api_calls]
aggregation = "count"
window = "1h"
stripe_event_name = "api_calls"
grace_s = 0

[meters.peak]
aggregation = "max"
window = "1mo"
stripe_event_name = "peak"
"""
STRIPE_METERS = {"tokens": "sum", "storage_mb": "sum", "api_calls": "sum", "peak": "last"}
HOUR = timedelta(hours=1)


def hour_start(hours_ago: int = 0) -> datetime:
    now = datetime.now(UTC)
    return now.replace(minute=0, second=0, microsecond=0) - hours_ago * HOUR


def month_window() -> tuple[datetime, timedelta]:
    """This calendar month: (window_start, length), as a window = "1mo" meter keeps it."""
    start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end - start


def put_total(
    engine: Engine,
    customer_id: str,
    meter: str,
    window_start: datetime,
    value: str,
    *,
    window: timedelta = HOUR,
    last_event_time: datetime | None = None,
) -> int:
    """Upsert a window total as the aggregators do: the revision grows when the value changes,
    and the window is queued for the reporter in the same transaction."""
    now = datetime.now(UTC)
    event_time = last_event_time or min(window_start + timedelta(minutes=10), now)
    key = (
        (window_totals.c.customer_id == customer_id)
        & (window_totals.c.meter == meter)
        & (window_totals.c.window_start == window_start)
    )
    with engine.begin() as connection:
        found = connection.execute(select(window_totals.c.revision).where(key)).scalar()
        if found is None:
            connection.execute(
                window_totals.insert().values(
                    customer_id=customer_id,
                    meter=meter,
                    window_start=window_start,
                    window_end=window_start + window,
                    value=Decimal(value),
                    events=1,
                    revision=1,
                    last_event_time=event_time,
                    last_event_id="e1",
                    first_applied_at=now,
                    updated_at=now,
                )
            )
            queue_windows(connection, [(customer_id, meter, window_start, 1)])
            return 1
        connection.execute(
            window_totals.update()
            .where(key)
            .values(
                value=Decimal(value),
                revision=found + 1,
                last_event_time=event_time,
                updated_at=now,
            )
        )
        queue_windows(connection, [(customer_id, meter, window_start, int(found) + 1)])
        return int(found) + 1


def create_stripe_meters(emulator: Emulator, meters: dict[str, str] = STRIPE_METERS) -> None:
    for event_name, formula in meters.items():
        emulator.state.create_meter(display_name=event_name, event_name=event_name, formula=formula)


@dataclass
class World:
    """One emulator, one migrated database, the settings that point at both."""

    emulator: Emulator
    engine: Engine
    settings: Settings
    catalogue: Catalogue
    metrics: ReporterMetrics = field(default_factory=lambda: ReporterMetrics(CollectorRegistry()))
    stop: threading.Event = field(default_factory=threading.Event)

    def reporter(self, **overrides: Any) -> Reporter:
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        connected = connect(settings, self.catalogue, self.metrics, self.stop, backoff_base_s=0.01)
        return build_reporter(connected, self.engine, self.catalogue, self.stop)

    def cycle(self) -> CycleResult:
        return self.reporter().run_cycle()

    def totals(self) -> dict[tuple[str, str], int]:
        return self.emulator.state.totals()

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def write_catalogue(tmp_path: Path) -> Path:
    path = tmp_path / "meters.toml"
    path.write_text(CATALOGUE, encoding="utf-8")
    return path


def world_settings(emulator: Emulator, database_url: str, tmp_path: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "meters_file": write_catalogue(tmp_path),
        "stripe_api_key": SECRET,
        "stripe_api_base": emulator.url,
        "stripe_rate": 1000.0,
        "metrics_port": 0,
    }
    return load_settings(**{**values, **extra})


@contextmanager
def world_on(engine: Engine, database_url: str, tmp_path: Path) -> Iterator[World]:
    """A World on ``engine`` (migrated) with an emulator of its own: the catalogue's meters,
    customers cus_a, cus_b and cus_c."""
    with run_stripe_emulator(rate_limit_per_s=None) as emulator:
        create_stripe_meters(emulator)
        for customer in ("cus_a", "cus_b", "cus_c"):
            emulator.state.create_customer(customer_id=customer)
        settings = world_settings(emulator, database_url, tmp_path)
        yield World(emulator, engine, settings, load_catalogue(settings.meters_file))


@pytest.fixture
def world(migrated_engine: Engine, database_url: str, tmp_path: Path) -> Iterator[World]:
    with world_on(migrated_engine, database_url, tmp_path) as found:
        yield found


@pytest.fixture
def pg_world(postgres_engine: Engine, postgres_url: str, tmp_path: Path) -> Iterator[World]:
    """The world on PostgreSQL only (for what only PostgreSQL has: its plans, its lanes)."""
    with world_on(postgres_engine, postgres_url, tmp_path) as found:
        yield found


def run_until_acknowledged(world: World, deadline_s: float = 60.0) -> list[CycleResult]:
    """Cycles until nothing due is unacknowledged (what cron would do), within a deadline."""
    results = []
    stop_at = datetime.now(UTC) + timedelta(seconds=deadline_s)
    reporter = world.reporter()
    while datetime.now(UTC) < stop_at:
        results.append(reporter.run_cycle())
        if results[-1].unacknowledged == 0:
            return results
    raise AssertionError(f"still unacknowledged after {deadline_s} s: {results[-1]}")


# -- differences, carry, scale ---------------------------------------------------------------


def test_fractions_carry_across_reports_until_a_whole_unit(world: World) -> None:
    seen = []
    for hours_ago in (3, 2, 1):
        put_total(world.engine, "cus_a", "tokens", hour_start(hours_ago), "0.4")
        world.cycle()
        seen.append(world.totals().get(("tokens", "cus_a"), 0))

    assert seen == [0, 0, 1]
    rows = rows_for(world.engine, "cus_a", "tokens")
    assert [(r.status, r.value) for r in rows] == [("carried", 0), ("carried", 0), ("sent", 1)]
    assert rows[-1].accounted_total == Decimal("1.2")


def test_unit_scale_1000_sends_1234_then_the_carried_unit(world: World) -> None:
    window = hour_start(2)
    put_total(world.engine, "cus_a", "storage", window, "1.2345")
    world.cycle()
    assert world.totals() == {("storage_mb", "cus_a"): 1234}

    put_total(world.engine, "cus_a", "storage", hour_start(1), "0.0005")
    world.cycle()
    assert world.totals() == {("storage_mb", "cus_a"): 1235}
    assert [e.value for e in world.emulator.state.events] == [1234, 1]


def test_late_event_sends_the_difference_of_the_new_revision(world: World) -> None:
    window = hour_start(2)
    put_total(world.engine, "cus_a", "tokens", window, "10")
    world.cycle()
    assert put_total(world.engine, "cus_a", "tokens", window, "17.5") == 2
    world.cycle()

    assert [e.value for e in world.emulator.state.events] == [10, 7]
    assert [(r.revision, r.value, r.status) for r in rows_for(world.engine, "cus_a", "tokens")] == [
        (1, 10, "sent"),
        (2, 7, "sent"),
    ]


def test_negative_correction_is_held_where_negatives_are_not_allowed(world: World) -> None:
    window = hour_start(2)
    put_total(world.engine, "cus_a", "tokens", window, "10")
    world.cycle()
    put_total(world.engine, "cus_a", "tokens", window, "4")
    reporter = world.reporter()

    held = reporter.run_cycle()
    again = reporter.run_cycle()

    assert held.held == {"negative_correction": 1} == again.held
    assert (
        world.metric("meterstream_reporter_meter_events_held_total", reason="negative_correction")
        == 1
    )
    assert world.totals() == {("tokens", "cus_a"): 10}
    put_total(world.engine, "cus_a", "tokens", window, "12")
    world.cycle()
    assert world.totals() == {("tokens", "cus_a"): 12}


def test_negative_correction_is_sent_where_the_meter_allows_it(world: World) -> None:
    window = hour_start(2)
    put_total(world.engine, "cus_a", "storage", window, "2")
    world.cycle()
    put_total(world.engine, "cus_a", "storage", window, "0.5")
    world.cycle()

    assert [e.value for e in world.emulator.state.events] == [2000, -1500]
    assert world.totals() == {("storage_mb", "cus_a"): 500}


def test_last_meter_sends_each_revision_a_second_later_than_the_one_before(world: World) -> None:
    start, length = month_window()
    newest = datetime.now(UTC) - timedelta(minutes=5)
    put_total(world.engine, "cus_a", "peak", start, "7.9", window=length, last_event_time=newest)
    world.cycle()
    # A late event raises the max without a newer event time: same last_event_time.
    put_total(world.engine, "cus_a", "peak", start, "12", window=length, last_event_time=newest)
    world.cycle()

    events = world.emulator.state.events
    assert [e.value for e in events] == [7, 12]
    # Stripe keeps the newest timestamp and does not say how it orders equal ones.
    assert events[1].timestamp == events[0].timestamp + 1


# -- customers, timestamps, rejections -------------------------------------------------------


def test_unlinked_customer_is_held_then_sent_once_linked(world: World) -> None:
    put_total(world.engine, "acme", "tokens", hour_start(2), "5")

    held = world.cycle()
    assert held.held == {"no_customer_link": 1}
    assert held.unacknowledged == 0
    assert all_rows(world.engine) == []
    assert (
        world.metric("meterstream_reporter_meter_events_held_total", reason="no_customer_link") == 1
    )

    link_customer(world.engine, "acme", "cus_b", datetime.now(UTC))
    world.cycle()
    assert world.totals() == {("tokens", "cus_b"): 5}


def test_event_timestamp_is_the_newest_event_clamped_into_the_window_and_now(world: World) -> None:
    closed, open_window = hour_start(3), hour_start(0)
    put_total(world.engine, "cus_a", "tokens", closed, "1", last_event_time=closed + 2 * HOUR)
    put_total(world.engine, "cus_b", "tokens", open_window, "1")
    world.cycle()

    stamps = {e.customer_id: e.timestamp for e in world.emulator.state.events}
    assert stamps["cus_a"] == int((closed + HOUR).timestamp()) - 1
    assert stamps["cus_b"] <= int(datetime.now(UTC).timestamp())


def test_usage_older_than_35_days_is_rejected_in_the_ledger_not_dropped(world: World) -> None:
    put_total(world.engine, "cus_a", "tokens", hour_start(36 * 24), "9")

    result = world.cycle()

    assert world.emulator.state.events == ()
    [row] = all_rows(world.engine)
    assert (row.status, row.error_code, row.value) == ("rejected", "timestamp_too_old", 9)
    assert "too old for Stripe" in (row.last_error or "")
    assert result.rejected == 1
    assert (
        world.metric("meterstream_reporter_meter_events_rejected_total", code="timestamp_too_old")
        == 1
    )


def test_stripe_400_is_recorded_with_its_code_and_message_and_not_retried(world: World) -> None:
    put_total(world.engine, "cus_nobody", "tokens", hour_start(2), "3")

    world.cycle()
    world.cycle()

    [row] = all_rows(world.engine)
    assert (row.status, row.error_code, row.attempts) == (
        "rejected",
        "meter_event_customer_not_found",
        1,
    )
    assert "No customer found with id 'cus_nobody'" in (row.last_error or "")
    code = "meter_event_customer_not_found"
    assert world.metric("meterstream_reporter_meter_events_rejected_total", code=code) == 1


def test_already_existing_identifier_marks_the_row_sent(world: World) -> None:
    put_total(world.engine, "cus_a", "tokens", hour_start(2), "3")
    world.emulator.faults.inject("drop_connection", count=3, path_prefix="/v1/billing/meter_events")
    first = world.cycle()  # Stripe recorded it, but every answer was lost
    assert first.unacknowledged == 1
    # Stripe forgets idempotency keys after 24 h; the identifier still deduplicates.
    world.emulator.state._replies.clear()

    world.cycle()

    [row] = all_rows(world.engine)
    assert row.status == "sent"
    assert [e.identifier for e in world.emulator.state.events] == [row.identifier]


def test_already_existing_identifier_in_new_words_still_marks_the_row_sent(world: World) -> None:
    # The document fixes no wording for the duplicate answer: Stripe may change it. The code,
    # type and the identifier it names still say "Stripe has this very event".
    world.emulator.state.duplicate_message = "Meter event '{identifier}' was recorded before"
    put_total(world.engine, "cus_a", "tokens", hour_start(2), "3")
    world.emulator.faults.inject("drop_connection", count=3, path_prefix="/v1/billing/meter_events")
    assert world.cycle().unacknowledged == 1  # Stripe recorded it, every answer was lost
    world.emulator.state._replies.clear()  # past Stripe's 24 h of idempotency keys

    world.cycle()

    [row] = all_rows(world.engine)
    assert (row.status, row.error_code) == ("sent", None)
    assert [e.identifier for e in world.emulator.state.events] == [row.identifier]


# -- faults ----------------------------------------------------------------------------------


def test_random_500_429_and_dropped_connections_lose_and_double_nothing(world: World) -> None:
    for kind in ("http_500", "http_429", "drop_connection"):
        world.emulator.faults.inject(
            kind, count=None, probability=0.3, path_prefix="/v1/billing/meter_events"
        )
    values = ["0.4", "1.25", "3", "0.333", "7.5"]
    for n, customer in enumerate(("cus_a", "cus_b", "cus_c")):
        for hours_ago in range(1, 5):
            window = hour_start(hours_ago)
            put_total(world.engine, customer, "tokens", window, values[(n + hours_ago) % 5])
            put_total(world.engine, customer, "storage", window, values[(n * hours_ago) % 5])
    run_until_acknowledged(world)
    # Late corrections, up and down, while the faults go on.
    put_total(world.engine, "cus_a", "tokens", hour_start(2), "9.9")
    put_total(world.engine, "cus_b", "storage", hour_start(3), "0.001")
    run_until_acknowledged(world)

    assert world.metric("meterstream_reporter_rate_limited_responses_total") > 0
    assert world.metric("meterstream_reporter_meter_events_retried_total") > 0
    _assert_stripe_matches_database(world, {"tokens": "tokens", "storage": "storage_mb"})


def _assert_stripe_matches_database(world: World, event_names: dict[str, str]) -> None:
    catalogue = world.catalogue
    with world.engine.connect() as connection:
        windows = connection.execute(select(window_totals)).mappings().all()
    exact: dict[tuple[str, str], list[Decimal]] = {}
    for window in windows:
        exact.setdefault((window["customer_id"], window["meter"]), []).append(window["value"])
    expected = {
        (event_names[meter], customer): whole_units(
            exact_sum(values), catalogue.meters[meter].unit_scale
        )
        for (customer, meter), values in exact.items()
    }
    assert {k: v for k, v in world.totals().items() if v} == {
        k: v for k, v in expected.items() if v
    }
    events = world.emulator.state.events
    identifiers = [e.identifier for e in events]
    assert len(identifiers) == len(set(identifiers))
    rows = all_rows(world.engine)
    by_identifier = {e.identifier: e for e in events}
    for row in rows:
        if row.status == "sent":
            assert by_identifier[row.identifier].value == row.value
    assert {r.identifier for r in rows if r.status == "sent"} == set(identifiers)
    newest = {(r.customer_id, r.meter, r.window_start): r.revision for r in rows}
    for window in windows:
        key = (window["customer_id"], window["meter"], window["window_start"])
        assert newest[key] == window["revision"], f"window missing from the ledger: {key}"


# -- start-up check and the secret key -------------------------------------------------------


@pytest.fixture
def bare_emulator() -> Iterator[Emulator]:
    with run_stripe_emulator(rate_limit_per_s=None) as emulator:
        yield emulator


def _connect(emulator: Emulator, tmp_path: Path, **extra: Any) -> None:
    settings = world_settings(emulator, f"sqlite:///{tmp_path / 'm.db'}", tmp_path, **extra)
    catalogue = load_catalogue(settings.meters_file)
    connect(settings, catalogue, ReporterMetrics(CollectorRegistry()), threading.Event())


def test_start_refuses_missing_inactive_and_incompatible_meters(
    bare_emulator: Emulator, tmp_path: Path
) -> None:
    create_stripe_meters(bare_emulator, {"tokens": "count", "storage_mb": "sum", "peak": "sum"})
    storage = bare_emulator.state.meters()[1]
    assert storage.event_name == "storage_mb"
    bare_emulator.state.update_meter(storage.id, active=False)

    with pytest.raises(Exception, match="do not fit the catalogue") as caught:
        _connect(bare_emulator, tmp_path)

    message = str(caught.value)
    assert "meter 'api_calls': no Stripe meter has event_name 'api_calls'" in message
    assert f"Stripe meter {storage.id} ('storage_mb') is inactive; reactivate it" in message
    assert "has formula 'count', needs 'sum'; Stripe's count formula counts events" in message
    assert "meter 'peak'" in message and "needs 'last'" in message


def test_missing_key_fails_at_start_naming_the_variable(
    bare_emulator: Emulator, tmp_path: Path
) -> None:
    create_stripe_meters(bare_emulator)
    settings = world_settings(bare_emulator, "sqlite://", tmp_path).model_copy(
        update={"stripe_api_key": None}
    )
    with pytest.raises(Exception, match="METERSTREAM_STRIPE_API_KEY is not set"):
        connect(
            settings,
            load_catalogue(settings.meters_file),
            ReporterMetrics(CollectorRegistry()),
            threading.Event(),
        )
    with pytest.raises(Exception, match="METERSTREAM_STRIPE_API_KEY") as caught:
        load_settings(stripe_api_key="pk_live_notsecret_but_wrong")
    assert "notsecret" not in str(caught.value)


def test_secret_key_never_reaches_logs_ledger_or_errors(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    world.emulator.faults.inject("http_500", count=2, path_prefix="/v1/billing/meter_events")
    put_total(world.engine, "cus_a", "tokens", hour_start(2), "4")
    put_total(world.engine, "cus_nobody", "tokens", hour_start(2), "4")
    world.cycle()
    world.cycle()
    rejected_key = "sk_live_wrongKeyValue123456"
    settings = world.settings.model_copy(update={"stripe_api_key": stripe_secret(rejected_key)})
    with pytest.raises(Exception, match="Stripe refused METERSTREAM_STRIPE_API_KEY") as caught:
        connect(settings, world.catalogue, world.metrics, world.stop)

    for secret in (SECRET, rejected_key):
        assert secret not in caplog.text
        assert secret not in str(caught.value) and secret not in repr(caught.value)
        assert all(secret not in repr(row) for row in all_rows(world.engine))
        assert secret not in (world.metrics.registry.collect().__repr__())
    assert "Invalid API Key" not in str(caught.value)


def stripe_secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


# -- v2 stream, rate limit -------------------------------------------------------------------


def test_stream_mode_sends_batches_of_100_and_renews_the_session(
    migrated_engine: Engine, database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="reporters")
    clock = ManualClock(datetime.now(UTC).timestamp())
    with run_stripe_emulator(rate_limit_per_s=None, clock=clock) as emulator:
        create_stripe_meters(emulator)
        emulator.state.create_customer(customer_id="cus_a")
        settings = world_settings(emulator, database_url, tmp_path, stripe_stream=True)
        world = World(emulator, migrated_engine, settings, load_catalogue(settings.meters_file))
        connected = connect(settings, world.catalogue, world.metrics, world.stop)
        reporter = build_reporter(
            connected,
            migrated_engine,
            world.catalogue,
            world.stop,
            clock=lambda: datetime.fromtimestamp(clock(), UTC),
        )
        for minutes_ago in range(1, 151):
            start = hour_start(0) - timedelta(minutes=minutes_ago)
            put_total(migrated_engine, "cus_a", "tokens", start, "1", window=timedelta(minutes=1))

        first = reporter.run_cycle()
        clock.advance(14 * 60 + 30)  # 30 s before the token expires, inside the renew margin
        put_total(migrated_engine, "cus_a", "tokens", hour_start(3), "2.5")
        second = reporter.run_cycle()

    assert (first.acknowledged, first.unacknowledged) == (150, 0)
    assert (second.acknowledged, second.unacknowledged) == (1, 0)
    assert emulator.state.totals() == {("tokens", "cus_a"): 152}
    assert emulator.state.async_errors == ()
    assert {r.status for r in all_rows(migrated_engine)} == {"accepted"}
    assert {e.source for e in emulator.state.events} == {"v2_stream"}
    renewals = [r for r in caplog.records if "meter event session" in r.getMessage()]
    assert len(renewals) == 2
    assert all("renewed" in r.getMessage() for r in renewals)


def test_calls_stay_under_the_configured_rate(
    migrated_engine: Engine, database_url: str, tmp_path: Path
) -> None:
    # Stripe's bucket (the emulator's) allows 4 calls a second and answers 429 beyond; the
    # reporter, told the same rate, must never be refused.
    with run_stripe_emulator(rate_limit_per_s=4) as emulator:
        create_stripe_meters(emulator)
        emulator.state.create_customer(customer_id="cus_a")
        emulator.state.create_customer(customer_id="cus_b")
        settings = world_settings(emulator, database_url, tmp_path, stripe_rate=4.0)
        world = World(emulator, migrated_engine, settings, load_catalogue(settings.meters_file))
        emulator.rate_limit.reset()
        for hours_ago in range(1, 5):
            put_total(migrated_engine, "cus_a", "tokens", hour_start(hours_ago), "1")
            put_total(migrated_engine, "cus_b", "tokens", hour_start(hours_ago), "1")
        result = world.cycle()

    assert (result.acknowledged, result.unacknowledged) == (8, 0)
    assert world.metric("meterstream_reporter_rate_limited_responses_total") == 0


# -- reconcile, status, billing lag ----------------------------------------------------------


def _reconcile(world: World, since: timedelta = timedelta(days=2)) -> list[Any]:
    from reporters.reconcile import reconcile
    from reporters.service import fetch_summary

    connected = connect(world.settings, world.catalogue, world.metrics, world.stop)
    now = datetime.now(UTC)
    return reconcile(
        world.engine,
        world.catalogue,
        connected.stripe_meters,
        fetch_summary(connected),
        now - since,
        now,
    ).lines


def test_reconcile_agrees_after_reports_and_finds_drift(world: World) -> None:
    put_total(world.engine, "cus_a", "storage", hour_start(2), "1.2345")
    start, length = month_window()
    put_total(
        world.engine, "cus_a", "peak", start, "5", window=length, last_event_time=hour_start(1)
    )
    world.cycle()

    lines = _reconcile(world)
    assert [(line.meter, line.drift) for line in lines] == [("peak", False), ("storage", False)]
    assert "Stripe 1234, ledger acknowledged 1234, database 1234" in str(lines[1])

    stripe.StripeClient(
        SECRET, base_addresses={"api": world.emulator.url}
    ).v1.billing.meter_events.create(
        params={
            "event_name": "storage_mb",
            "payload": {"stripe_customer_id": "cus_a", "value": "3"},
            "timestamp": int(hour_start(1).timestamp()),
        }
    )
    drifting = [line for line in _reconcile(world) if line.drift]
    assert [str(line).split(";")[0] for line in drifting] == [
        "DRIFT: cus_a storage (cus_a): Stripe 1237, ledger acknowledged 1234, database 1234"
    ]


def test_status_shows_counts_rejections_held_usage_and_billing_lag(world: World) -> None:
    from reporters.status import format_status, reporter_status

    closed = hour_start(3)
    put_total(world.engine, "cus_a", "api_calls", closed, "4")
    put_total(world.engine, "cus_nobody", "tokens", closed, "2")
    put_total(world.engine, "acme", "tokens", closed, "2")
    before = reporter_status(world.engine, world.catalogue, datetime.now(UTC))
    assert before["billing_lag_s"] >= 2 * 3600
    world.emulator.faults.inject("http_500", count=None, path_prefix="/v1/billing/meter_events")
    world.cycle()
    assert world.metric("meterstream_reporter_ledger_pending_rows") == 2
    world.emulator.faults.clear()
    world.cycle()

    facts = reporter_status(world.engine, world.catalogue, datetime.now(UTC))
    assert facts["ledger"] == {"sent": 1, "rejected": 1}
    assert facts["pending"] == 0
    assert [(r["customer_id"], r["code"]) for r in facts["rejected"]] == [
        ("cus_nobody", "meter_event_customer_not_found")
    ]
    assert [(h["customer_id"], h["reason"]) for h in facts["held"]] == [
        ("acme", "no_customer_link")
    ]
    # The held window cannot be sent until a person links acme: it has its own gauges, and
    # the billing lag measures what could be sent (it was pinned at the held window before).
    assert facts["billing_lag_s"] == 0
    assert facts["held_windows"] == {"no_customer_link": 1}
    assert world.metric("meterstream_reporter_held_windows", reason="no_customer_link") == 1
    assert world.metric("meterstream_reporter_held_oldest_age_seconds") > 0
    assert facts["last_sent_at"] is not None
    text = format_status(facts)
    assert "No customer found with id 'cus_nobody'" in text
    assert "no_customer_link: acme tokens" in text
    assert "held windows (not sent until a person acts; not in the billing lag): 1" in text
    link_customer(world.engine, "acme", "cus_b", datetime.now(UTC))
    world.cycle()
    assert world.metric("meterstream_reporter_billing_lag_seconds") == 0
    assert world.metric("meterstream_reporter_held_windows", reason="no_customer_link") == 0
    assert world.metric("meterstream_reporter_held_oldest_age_seconds") == 0


def test_the_due_windows_gauge_counts_what_the_cycle_left_unwritten(world: World) -> None:
    from reporters.status import format_status, reporter_status

    closed = hour_start(3)
    put_total(world.engine, "cus_a", "api_calls", closed, "4")
    put_total(world.engine, "acme", "tokens", closed, "2")
    assert reporter_status(world.engine, world.catalogue, datetime.now(UTC))["due_windows"] == 2
    world.cycle()
    # acme has no Stripe customer: its window is held, set aside, counted as held usage.
    assert world.metric("meterstream_reporter_due_windows") == 0
    assert world.metric("meterstream_reporter_held_windows", reason="no_customer_link") == 1
    facts = reporter_status(world.engine, world.catalogue, datetime.now(UTC))
    assert facts["due_windows"] == 0
    assert "due windows (changed, not yet in the ledger): 0" in format_status(facts)
    link_customer(world.engine, "acme", "cus_b", datetime.now(UTC))
    world.cycle()
    assert world.metric("meterstream_reporter_due_windows") == 0


def test_last_meter_revision_in_the_same_second_is_sent_not_held(world: World) -> None:
    # Saw it fail before the fix: a second revision written in the second its first was
    # stamped found "no later timestamp" by the reporter's clock, and the window was set aside
    # for the hourly re-check, so Stripe kept the old value (the one billed at period end).
    start, length = month_window()
    now = datetime.now(UTC).replace(microsecond=500_000)
    put_total(world.engine, "cus_a", "peak", start, "5", window=length, last_event_time=now)
    connected = connect(world.settings, world.catalogue, world.metrics, world.stop)
    # One frozen second: both cycles run within it.
    reporter = build_reporter(
        connected, world.engine, world.catalogue, world.stop, clock=lambda: now
    )
    reporter.run_cycle()
    put_total(world.engine, "cus_a", "peak", start, "9", window=length, last_event_time=now)

    result = reporter.run_cycle()

    assert result.held == {}
    events = world.emulator.state.events
    assert [e.value for e in events] == [5, 9]
    # Stripe's last value is the newest: 9, one second ahead of the clock (5 minutes allowed).
    assert events[1].timestamp == events[0].timestamp + 1 == int(now.timestamp()) + 1
