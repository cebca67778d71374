"""Meters with dimensions to Stripe (issue #18): one meter event per (customer, meter, window,
combination), the dimension values in its payload, the carry per combination.

Real stripe SDK over HTTP to the emulator (which refuses an event lacking a dimension payload
key, as Stripe does), PostgreSQL and SQLite. Tests write window_totals rows per combination
themselves, as the aggregators do, and compare what Stripe holds per combination with the floor
of the exact total per combination.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import stripe
from alembic import command
from alembic.config import Config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from sqlalchemy import Column, Engine, MetaData, Table, event, func, insert, select

from meterstream.db import MIGRATIONS, build_engine, migrate
from meterstream.dimensions import combination_digest, combination_key, combination_values
from meterstream.errors import ConfigError, LedgerError
from meterstream.meters import load_catalogue
from meterstream.metrics import ReporterMetrics
from meterstream.report_queue import queue_combinations
from meterstream.schema import ledger, report_queue, window_totals
from meterstream.settings import load_settings
from reporters.backstop import queue_missed
from reporters.carry import exact_sum, whole_units
from reporters.customers import link_customer
from reporters.due import DueWindow, take_due
from reporters.ledger import (
    LedgerRow,
    all_rows,
    combination_heads,
    identifier_for,
    insert_rows,
)
from reporters.ledger.model import values_of
from reporters.reconcile import Line, reconcile
from reporters.reconcile_database import _heads
from reporters.retention import prunable
from reporters.rows import RowJob, write_row, write_rows
from reporters.service import connect, fetch_summary
from reporters.status import format_status, reporter_status
from stripe_emulator import Emulator, run_stripe_emulator
from tests.reporters.test_reporter import (
    SECRET,
    World,
    hour_start,
    month_window,
    run_until_acknowledged,
    world_settings,
)

CATALOGUE = """
[meters.tokens]
aggregation = "sum"
window = "1h"
stripe_event_name = "tokens"
allow_negative = true

[meters.llm_tokens]
aggregation = "sum"
window = "1h"
stripe_event_name = "llm_tokens"
dimensions = ["model", "region"]
unit_scale = "10"
allow_negative = true

[meters.peak_by_model]
aggregation = "max"
window = "1mo"
stripe_event_name = "peak_by_model"
dimensions = ["model"]
"""
# event name -> (formula, dimension payload keys)
STRIPE_METERS = {
    "tokens": ("sum", ()),
    "llm_tokens": ("sum", ("model", "region")),
    "peak_by_model": ("last", ("model",)),
}
EVENT_NAMES = {"tokens": "tokens", "llm_tokens": "llm_tokens", "peak_by_model": "peak_by_model"}
HOUR = timedelta(hours=1)
NOW = datetime.now(UTC)
FAULTS = ("http_500", "http_429", "drop_connection")
CombinationTotal = tuple[str, str, tuple[tuple[str, str], ...]]  # (event, customer, values)


def put_combination(
    engine: Engine,
    customer_id: str,
    meter: str,
    window_start: datetime,
    values: dict[str, str],
    value: str,
    *,
    window: timedelta = HOUR,
    last_event_time: datetime | None = None,
) -> int:
    """Upsert one combination's window total as the aggregators do: the revision grows when the
    value changes, and the window is queued for the reporter in the same transaction."""
    now = datetime.now(UTC)
    combination = combination_key(values)
    digest = combination_digest(combination)
    key = (
        (window_totals.c.customer_id == customer_id)
        & (window_totals.c.meter == meter)
        & (window_totals.c.window_start == window_start)
        & (window_totals.c.combination_digest == digest)
    )
    event_time = last_event_time or min(window_start + timedelta(minutes=10), now)
    with engine.begin() as connection:
        found = connection.execute(select(window_totals.c.revision).where(key)).scalar()
        revision = 1 if found is None else int(found) + 1
        if found is None:
            connection.execute(
                window_totals.insert().values(
                    customer_id=customer_id,
                    meter=meter,
                    window_start=window_start,
                    combination=combination,
                    combination_digest=digest,
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
        else:
            connection.execute(
                window_totals.update()
                .where(key)
                .values(
                    value=Decimal(value),
                    revision=revision,
                    last_event_time=event_time,
                    updated_at=now,
                )
            )
        queue_combinations(connection, [(customer_id, meter, window_start, combination, revision)])
    return revision


def _world_settings(emulator: Emulator, database_url: str, tmp_path: Path, **extra: Any) -> Any:
    settings = world_settings(emulator, database_url, tmp_path, **extra)
    settings.meters_file.write_text(CATALOGUE, encoding="utf-8")
    return settings


@pytest.fixture
def dims_world(migrated_engine: Engine, database_url: str, tmp_path: Path) -> Iterator[World]:
    with run_stripe_emulator(rate_limit_per_s=None) as emulator:
        for event_name, (formula, keys) in STRIPE_METERS.items():
            emulator.state.create_meter(
                display_name=event_name,
                event_name=event_name,
                formula=formula,
                dimension_payload_keys=keys,
            )
        for customer in ("cus_a", "cus_b", "cus_c"):
            emulator.state.create_customer(customer_id=customer)
        settings = _world_settings(emulator, database_url, tmp_path)
        yield World(emulator, migrated_engine, settings, load_catalogue(settings.meters_file))


def stripe_totals(world: World) -> dict[CombinationTotal, int]:
    """What Stripe holds per (event name, customer, dimension values): its live events' sum."""
    totals: dict[CombinationTotal, int] = {}
    for meter_event in world.emulator.state.events:
        if meter_event.cancelled:
            continue
        keys = STRIPE_METERS[meter_event.event_name][1]
        values = tuple((k, meter_event.payload[k]) for k in keys)
        key = (meter_event.event_name, meter_event.customer_id, values)
        totals[key] = totals.get(key, 0) + meter_event.value
    return totals


def exact_totals(world: World) -> dict[CombinationTotal, int]:
    """The floor of each combination's exact total over all its windows, in Stripe units."""
    with world.engine.connect() as connection:
        windows = connection.execute(select(window_totals)).mappings().all()
    exact: dict[tuple[str, str, str], list[Decimal]] = {}
    for window in windows:
        key = (window["customer_id"], window["meter"], window["combination"])
        exact.setdefault(key, []).append(window["value"])
    return {
        (
            EVENT_NAMES[meter],
            customer,
            tuple(sorted(combination_values(combination).items())),
        ): whole_units(exact_sum(values), world.catalogue.meters[meter].unit_scale)
        for (customer, meter, combination), values in exact.items()
    }


def _nonzero(totals: dict[CombinationTotal, int]) -> dict[CombinationTotal, int]:
    return {k: v for k, v in totals.items() if v}


M1_EU = {"model": "m1", "region": "eu"}
M2_EU = {"model": "m2", "region": "eu"}


def test_each_combination_carries_its_own_fraction(dims_world: World) -> None:
    world = dims_world
    # 0.06 x unit_scale 10 = 0.6 units each: a carry per (customer, meter) would send 1 unit
    # for the two together, which neither combination has.
    put_combination(world.engine, "cus_a", "llm_tokens", hour_start(3), M1_EU, "0.06")
    put_combination(world.engine, "cus_a", "llm_tokens", hour_start(3), M2_EU, "0.06")
    world.cycle()
    assert _nonzero(stripe_totals(world)) == {}

    put_combination(world.engine, "cus_a", "llm_tokens", hour_start(2), M1_EU, "0.06")
    world.cycle()

    m1 = ("llm_tokens", "cus_a", (("model", "m1"), ("region", "eu")))
    assert _nonzero(stripe_totals(world)) == {m1: 1}
    (event,) = world.emulator.state.events
    assert dict(event.payload) == {
        "stripe_customer_id": "cus_a",
        "value": "1",
        "model": "m1",
        "region": "eu",
    }
    rows = all_rows(world.engine)
    assert sorted((r.combination, r.status, r.value) for r in rows) == [
        (combination_key(M1_EU), "carried", 0),
        (combination_key(M1_EU), "sent", 1),
        (combination_key(M2_EU), "carried", 0),
    ]
    # The rows of a (customer, meter) share its sequence, whatever the combination.
    assert sorted(r.sequence for r in rows) == [1, 2, 3]


def test_a_late_revision_of_one_combination_sends_its_difference_only(dims_world: World) -> None:
    world = dims_world
    window = hour_start(2)
    put_combination(world.engine, "cus_a", "llm_tokens", window, M1_EU, "1")
    put_combination(world.engine, "cus_a", "llm_tokens", window, M2_EU, "2")
    world.cycle()
    put_combination(world.engine, "cus_a", "llm_tokens", window, M2_EU, "2.55")
    world.cycle()

    assert [(e.payload["model"], e.value) for e in world.emulator.state.events] == [
        ("m1", 10),
        ("m2", 20),
        ("m2", 5),
    ]
    assert stripe_totals(world) == exact_totals(world)


def test_identifiers_name_the_combination_and_keep_the_dimensionless_ones() -> None:
    start = datetime(2026, 12, 1, 10, tzinfo=UTC)
    end = start + HOUR
    # Computed by the reporter before dimensions existed: such identifiers are in Stripe
    # already, and a resend of an old row must repeat its identifier.
    assert (
        identifier_for("cus_a", "tokens", start, end, 3, deployment_id="d0")
        == "ms2_d0_02c81eafd6f8467d7bb152d839611d05141d31a26111c77b"
        == identifier_for("cus_a", "tokens", start, end, 3, deployment_id="d0", combination="")
    )
    m1 = identifier_for(
        "cus_a", "tokens", start, end, 3, deployment_id="d0", combination=combination_key(M1_EU)
    )
    m2 = identifier_for(
        "cus_a", "tokens", start, end, 3, deployment_id="d0", combination=combination_key(M2_EU)
    )
    other_deployment = identifier_for(
        "cus_a", "tokens", start, end, 3, deployment_id="d1", combination=combination_key(M1_EU)
    )
    assert len({m1, m2, other_deployment, "ms2_d0_02c81eafd6f8467d7bb152d839611d05141d31"}) == 4
    assert all(len(i) <= 100 for i in (m1, m2, other_deployment))


@pytest.mark.parametrize("stream", [False, True], ids=["v1", "stream"])
def test_random_500_429_and_dropped_connections_lose_and_double_nothing_per_combination(
    migrated_engine: Engine, database_url: str, tmp_path: Path, stream: bool
) -> None:
    with run_stripe_emulator(rate_limit_per_s=None) as emulator:
        for event_name, (formula, keys) in STRIPE_METERS.items():
            emulator.state.create_meter(
                display_name=event_name,
                event_name=event_name,
                formula=formula,
                dimension_payload_keys=keys,
            )
        for customer in ("cus_a", "cus_b"):
            emulator.state.create_customer(customer_id=customer)
        settings = _world_settings(emulator, database_url, tmp_path, stripe_stream=stream)
        world = World(emulator, migrated_engine, settings, load_catalogue(settings.meters_file))
        path = "/v2/billing/meter_event_stream" if stream else "/v1/billing/meter_events"
        # Each fault once for sure (a stream cycle makes few calls), then at random.
        for kind in FAULTS:
            emulator.faults.inject(kind, count=1, path_prefix=path)
        for kind in FAULTS:
            emulator.faults.inject(kind, count=None, probability=0.3, path_prefix=path)
        values = ["0.04", "0.125", "3", "0.0333", "7.55"]
        combinations = [M1_EU, M2_EU, {"model": "m1", "region": "us"}]
        for n, customer in enumerate(("cus_a", "cus_b")):
            for hours_ago in range(1, 4):
                window = hour_start(hours_ago)
                put_combination(
                    migrated_engine, customer, "tokens", window, {}, values[(n + hours_ago) % 5]
                )
                for c, combination in enumerate(combinations):
                    value = values[(n + c * hours_ago) % 5]
                    put_combination(
                        migrated_engine, customer, "llm_tokens", window, combination, value
                    )
        run_until_acknowledged(world)
        # Late corrections, up and down, while the faults go on.
        put_combination(migrated_engine, "cus_a", "llm_tokens", hour_start(2), M2_EU, "9.99")
        put_combination(migrated_engine, "cus_b", "llm_tokens", hour_start(3), M1_EU, "0.001")
        put_combination(migrated_engine, "cus_a", "tokens", hour_start(1), {}, "12")
        run_until_acknowledged(world)

        assert {kind for kind, _path in emulator.faults.fired} == set(FAULTS)
        assert world.metric("meterstream_reporter_rate_limited_responses_total") > 0
        assert emulator.state.async_errors == ()
        assert _nonzero(stripe_totals(world)) == _nonzero(exact_totals(world))
        identifiers = [e.identifier for e in emulator.state.events]
        assert len(identifiers) == len(set(identifiers))
        rows = all_rows(migrated_engine)
        acknowledged = {r.identifier for r in rows if r.status in ("sent", "accepted")}
        assert acknowledged == set(identifiers)
        newest: dict[tuple[str, str, datetime, str], int] = {}
        for row in rows:
            key = (row.customer_id, row.meter, row.window_start, row.combination)
            newest[key] = max(newest.get(key, 0), row.revision)
        with migrated_engine.connect() as connection:
            for window in connection.execute(select(window_totals)).mappings():
                key = (
                    window["customer_id"],
                    window["meter"],
                    window["window_start"],
                    window["combination"],
                )
                assert newest[key] == window["revision"], f"missing from the ledger: {key}"


def test_start_refuses_a_dimension_that_is_also_the_customer_or_value_key(
    tmp_path: Path,
) -> None:
    with run_stripe_emulator(rate_limit_per_s=None) as emulator:
        emulator.state.create_meter(display_name="t", event_name="tokens", formula="sum")
        emulator.state.create_meter(
            display_name="l",
            event_name="llm_tokens",
            formula="sum",
            value_key="model",
            dimension_payload_keys=("model", "region"),
        )
        settings = _world_settings(emulator, f"sqlite:///{tmp_path / 'm.db'}", tmp_path)
        with pytest.raises(ConfigError, match="do not fit the catalogue") as caught:
            connect(
                settings,
                load_catalogue(settings.meters_file),
                ReporterMetrics(CollectorRegistry()),
                threading.Event(),
            )
    assert "meter 'llm_tokens': Stripe meter" in str(caught.value)
    assert "['model'] is a dimension too" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_a_ledger_from_before_0018_keeps_its_identifiers_and_running_totals(
    database_url: str, tmp_path: Path
) -> None:
    engine = build_engine(load_settings(database_url=database_url))
    try:
        migrate(engine, "0017")
        start = hour_start(3)
        old = _row_of(start, "")
        columns = {k: v for k, v in values_of(old).items() if not k.startswith("combination")}
        with engine.begin() as connection:
            connection.execute(insert(_ledger_before_0018()), [columns])
        migrate(engine)

        (row,) = all_rows(engine)
        assert (row.identifier, row.combination, row.combination_digest) == (
            old.identifier,
            "",
            b"",
        )
        # The next revision of that window continues its running totals (2.5 -> 3.7: 1 unit).
        path = tmp_path / "meters.toml"
        path.write_text(CATALOGUE, encoding="utf-8")
        meter = load_catalogue(path).meters["tokens"]
        window = DueWindow("cus_a", "tokens", start, start + HOUR, 2, Decimal("3.7"), start)
        (written,) = write_rows(
            engine, [RowJob(window, meter, "tokens", "cus_a", "d")], datetime.now(UTC), 35
        )
        assert isinstance(written, LedgerRow)
        assert (written.sequence, written.value, written.units_total) == (2, 1, 3)
        assert written.identifier == identifier_for(
            "cus_a", "tokens", start, start + HOUR, 2, deployment_id="d"
        )
    finally:
        engine.dispose()


def _ledger_before_0018() -> Table:
    """The ledger as migration 0017 left it (without the combination columns)."""
    key = {"customer_id", "meter", "window_start", "revision"}
    columns = [
        Column(c.name, c.type, primary_key=c.name in key)
        for c in ledger.columns
        if not c.name.startswith("combination")
    ]
    return Table("ledger", MetaData(), *columns)


def test_reconcile_compares_each_combination_with_stripe_grouped_by_dimension(
    dims_world: World,
) -> None:
    world = dims_world
    put_combination(world.engine, "cus_a", "llm_tokens", hour_start(2), M1_EU, "1.25")
    put_combination(world.engine, "cus_a", "llm_tokens", hour_start(2), M2_EU, "0.3")
    put_combination(world.engine, "cus_a", "tokens", hour_start(2), {}, "4")
    world.cycle()

    lines = _reconcile(world)
    assert [(line.meter, line.combination, line.drift) for line in lines] == [
        ("llm_tokens", combination_key(M1_EU), False),
        ("llm_tokens", combination_key(M2_EU), False),
        ("tokens", "", False),
    ]
    assert str(lines[0]) == (
        'ok: cus_a llm_tokens {"model":"m1","region":"eu"} (cus_a): Stripe 12, ledger '
        "acknowledged 12, database 12"
    )
    assert str(lines[2]) == "ok: cus_a tokens (cus_a): Stripe 4, ledger acknowledged 4, database 4"

    # Usage someone else sent: to a combination we have, and to one we never had. The meter's
    # total would hide neither if they cancelled out; per combination, both drift.
    client = stripe.StripeClient(SECRET, base_addresses={"api": world.emulator.url})
    for model, value in (("m2", "3"), ("m9", "5")):
        client.v1.billing.meter_events.create(
            params={
                "event_name": "llm_tokens",
                "payload": {
                    "stripe_customer_id": "cus_a",
                    "value": value,
                    "model": model,
                    "region": "eu",
                },
                "timestamp": int(hour_start(1).timestamp()),
            }
        )
    drifting = [str(line).split(";")[0] for line in _reconcile(world) if line.drift]
    assert drifting == [
        'DRIFT: cus_a llm_tokens {"model":"m2","region":"eu"} (cus_a): Stripe 6, ledger '
        "acknowledged 3, database 3",
        'DRIFT: cus_a llm_tokens {"model":"m9","region":"eu"} (): Stripe 5, ledger '
        "acknowledged 0, database 0",
    ]


def _reconcile(world: World) -> list[Line]:
    connected = connect(world.settings, world.catalogue, world.metrics, world.stop)
    found = reconcile(
        world.engine,
        world.catalogue,
        connected.stripe_meters,
        fetch_summary(connected),
        datetime.now(UTC) - timedelta(days=1),
        datetime.now(UTC),
    )
    return found.lines


def test_a_downgrade_below_0018_refuses_to_drop_rows_of_combinations(database_url: str) -> None:
    engine = build_engine(load_settings(database_url=database_url))
    try:
        migrate(engine)
        start = hour_start(2)
        combination = combination_key(M1_EU)
        row = _row_of(start, combination)
        with engine.begin() as connection:
            connection.execute(insert(ledger), [values_of(row)])
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        refused = pytest.raises(LedgerError, match="rows of meters with dimensions")
        with refused, engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0017")
        assert [r.combination for r in all_rows(engine)] == [combination]
        with engine.begin() as connection:
            connection.execute(ledger.delete())
            config.attributes["connection"] = connection
            command.downgrade(config, "0017")
            command.upgrade(config, "head")
    finally:
        engine.dispose()


def _row_of(start: datetime, combination: str) -> LedgerRow:
    """A sent ledger row of cus_a's tokens window at ``start``, revision 1."""
    return LedgerRow(
        customer_id="cus_a",
        meter="tokens",
        window_start=start,
        window_end=start + HOUR,
        revision=1,
        sequence=1,
        window_value=Decimal("2.5"),
        accounted_total=Decimal("2.5"),
        units_total=2,
        value=2,
        event_name="tokens",
        stripe_customer_id="cus_a",
        timestamp=start,
        identifier=identifier_for(
            "cus_a", "tokens", start, start + HOUR, 1, deployment_id="d", combination=combination
        ),
        status="sent",
        attempts=1,
        first_attempt_at=start,
        error_code=None,
        last_error=None,
        stripe_request_id="req_1",
        created_at=start,
        updated_at=start,
        sent_at=start,
        unit_scale=Decimal(1),
        combination=combination,
        combination_digest=combination_digest(combination),
    )


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    updates=st.lists(
        st.tuples(
            st.integers(1, 3),  # hours ago
            st.integers(0, 2),  # combination
            st.decimals(min_value=0, max_value=50, places=3, allow_nan=False),
        ),
        min_size=1,
        max_size=15,
    ),
    cycle_every=st.integers(1, 6),
    one_by_one=st.booleans(),
)
def test_each_combination_issues_the_floor_of_its_exact_total_however_cycles_fall(
    migrated_engine: Engine,
    tmp_path_factory: pytest.TempPathFactory,
    updates: Any,
    cycle_every: int,
    one_by_one: bool,
) -> None:
    """Window totals of three combinations and a dimensionless meter change in any order; the
    reporter's batch writes (write_rows, as a cycle makes them) run every few changes. After the
    last, each combination's newest row has accounted its exact total and issued its floor."""
    customer = f"c-{uuid.uuid4().hex[:8]}"
    path = tmp_path_factory.mktemp("catalogue") / "meters.toml"
    path.write_text(CATALOGUE, encoding="utf-8")
    catalogue = load_catalogue(path)
    combinations = [M1_EU, M2_EU, {"model": "m1", "region": "us"}]
    for n, (hours_ago, index, value) in enumerate(updates, start=1):
        put_combination(
            migrated_engine,
            customer,
            "llm_tokens",
            hour_start(hours_ago),
            combinations[index],
            str(value),
        )
        put_combination(migrated_engine, customer, "tokens", hour_start(hours_ago), {}, str(value))
        if n % cycle_every == 0 or n == len(updates):
            jobs = [
                RowJob(window, catalogue.meters[window.meter], window.meter, "cus_a", "d")
                for (c, _meter), windows in take_due(
                    migrated_engine, ["tokens", "llm_tokens"]
                ).items()
                if c == customer
                for window in windows
            ]
            if one_by_one:  # the reporter's path when a batch meets a second writer
                for job in jobs:
                    window = job.window
                    write_row(
                        migrated_engine, window, job.meter, window.meter, "cus_a", NOW, 35, "d"
                    )
            else:
                write_rows(migrated_engine, jobs, NOW, 35)

    with migrated_engine.connect() as connection:
        windows = (
            connection.execute(select(window_totals).where(window_totals.c.customer_id == customer))
            .mappings()
            .all()
        )
    exact: dict[tuple[str, str], list[Decimal]] = {}
    for window in windows:
        exact.setdefault((window["meter"], window["combination"]), []).append(window["value"])
    newest: dict[tuple[str, str], LedgerRow] = {}
    for row in all_rows(migrated_engine):
        key = (row.meter, row.combination)
        if row.customer_id == customer and (
            key not in newest or row.sequence > newest[key].sequence
        ):
            newest[key] = row
    assert set(newest) == set(exact)
    for (meter, combination), values in exact.items():
        row = newest[(meter, combination)]
        total = exact_sum(values)
        assert row.accounted_total == total
        assert row.units_total == whole_units(total, catalogue.meters[meter].unit_scale)
        assert row.units_total == sum(
            r.value
            for r in all_rows(migrated_engine)
            if (r.customer_id, r.meter, r.combination) == (customer, meter, combination)
        )


def test_a_max_meter_by_model_sends_each_models_value_a_second_later_each_revision(
    dims_world: World,
) -> None:
    world = dims_world
    start, length = month_window()
    # Older than reconcile's settling delay (5 minutes), so reconcile compares it.
    newest = max(start, datetime.now(UTC) - timedelta(minutes=10))
    for model, value in (("m1", "7.9"), ("m2", "3")):
        put_combination(
            world.engine,
            "cus_a",
            "peak_by_model",
            start,
            {"model": model},
            value,
            window=length,
            last_event_time=newest,
        )
    world.cycle()
    # A late event raises m1's max without a newer event time; m2 does not change.
    put_combination(
        world.engine,
        "cus_a",
        "peak_by_model",
        start,
        {"model": "m1"},
        "12",
        window=length,
        last_event_time=newest,
    )
    world.cycle()

    events = [(e.payload["model"], e.value, e.timestamp) for e in world.emulator.state.events]
    stamp = int(newest.replace(microsecond=0).timestamp())
    assert events == [("m1", 7, stamp), ("m2", 3, stamp), ("m1", 12, stamp + 1)]
    lines = _reconcile(world)
    assert [(line.combination, line.stripe_value, line.drift) for line in lines] == [
        ('{"model":"m1"}', 12, False),
        ('{"model":"m2"}', 3, False),
    ]


def test_held_windows_of_combinations_are_listed_with_their_values_and_sent_once_linked(
    dims_world: World,
) -> None:
    world = dims_world
    for combination, value in ((M1_EU, "1"), (M2_EU, "2")):
        put_combination(world.engine, "acme", "llm_tokens", hour_start(2), combination, value)

    held = world.cycle()

    assert held.held == {"no_customer_link": 2}
    facts = reporter_status(world.engine, world.catalogue, datetime.now(UTC))
    assert [h["dimensions"] for h in facts["held"]] == [M1_EU, M2_EU]
    assert "no_customer_link: acme llm_tokens model=m2 region=eu window" in format_status(facts)
    link_customer(world.engine, "acme", "cus_b", datetime.now(UTC))
    world.cycle()
    assert stripe_totals(world) == {
        ("llm_tokens", "cus_b", (("model", "m1"), ("region", "eu"))): 10,
        ("llm_tokens", "cus_b", (("model", "m2"), ("region", "eu"))): 20,
    }


def test_the_backstop_queues_a_missed_combination_under_its_own_key(dims_world: World) -> None:
    world = dims_world
    put_combination(world.engine, "cus_a", "llm_tokens", hour_start(2), M1_EU, "1")
    world.cycle()
    put_combination(world.engine, "cus_a", "llm_tokens", hour_start(2), M2_EU, "2")
    with world.engine.begin() as connection:  # a writer that forgot the queue
        connection.execute(report_queue.delete())

    assert queue_missed(world.engine, ["llm_tokens"]) == 1
    world.cycle()

    assert _nonzero(stripe_totals(world)) == _nonzero(exact_totals(world))
    assert queue_missed(world.engine, ["llm_tokens"]) == 0


def test_a_combinations_running_totals_are_read_through_its_index_not_its_history(
    migrated_engine: Engine,
) -> None:
    """The newest row of a combination (its running totals: rows.py, reconcile, retention) is
    one backward step of ledger_by_combination, a partial index the reads must name the
    predicate of; a meter without dimensions keeps reading ledger_sequence."""
    start = datetime(2026, 11, 1, tzinfo=UTC)
    models = [combination_key({"model": f"m{k}"}) for k in range(3)]
    rows = []
    for customer in range(60):
        sequence = 0
        for hour in range(30):
            for combination in models if customer % 2 else [""]:
                sequence += 1
                row = replace(
                    _row_of(start + hour * HOUR, combination),
                    customer_id=f"c{customer}",
                    sequence=sequence,
                )
                rows.append(replace(row, identifier=f"{row.identifier[:60]}-{customer}"))
    with migrated_engine.begin() as connection:
        insert_rows(connection, rows)
        connection.exec_driver_sql("ANALYZE")
    sqlite = migrated_engine.dialect.name == "sqlite"
    plans: list[str] = []

    def explain(connection: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            cursor = connection.connection.dbapi_connection.cursor()
            prefix = "EXPLAIN QUERY PLAN" if sqlite else "EXPLAIN"
            cursor.execute(f"{prefix} {statement}", parameters)
            plans.append("\n".join(str(r[-1] if sqlite else r[0]) for r in cursor.fetchall()))

    event.listen(migrated_engine, "before_cursor_execute", explain)
    try:
        with migrated_engine.connect() as connection:
            digest = combination_digest(models[1])
            heads = combination_heads(connection, {("c1", "tokens", digest)})
            read = _heads(connection, {("c1", "tokens", models[1]), ("c0", "tokens", "")})
            connection.execute(
                select(func.count())
                .select_from(ledger)
                .where(prunable(start + 400 * HOUR), ledger.c.customer_id == "c1")
            )
    finally:
        event.remove(migrated_engine, "before_cursor_execute", explain)

    assert heads[("c1", "tokens", digest)].sequence == 89  # hour 29, the second model
    assert {key: row.sequence for key, row in read.items()} == {
        ("c1", "tokens", models[1]): 89,
        ("c0", "tokens", ""): 30,
    }
    # combination_heads; reconcile's heads without then with dimensions; retention's heads.
    assert len(plans) == 4
    assert ["ledger_by_combination" in plan for plan in plans] == [True, False, True, True], plans
    assert "ledger_sequence" in plans[1] and "ledger_sequence" in plans[3], plans


def test_reconcile_settles_an_unknown_row_of_a_combination_from_its_minute(
    dims_world: World,
) -> None:
    world = dims_world
    put_combination(world.engine, "cus_a", "llm_tokens", hour_start(2), M1_EU, "1")
    put_combination(world.engine, "cus_a", "llm_tokens", hour_start(2), M2_EU, "2")
    world.cycle()
    (m1,) = [r for r in all_rows(world.engine) if r.combination == combination_key(M1_EU)]
    with world.engine.begin() as connection:  # Stripe has it; its answer was lost 21 h ago
        connection.execute(
            ledger.update().where(ledger.c.identifier == m1.identifier).values(status="unknown")
        )

    connected = connect(world.settings, world.catalogue, world.metrics, world.stop)
    found = reconcile(
        world.engine,
        world.catalogue,
        connected.stripe_meters,
        fetch_summary(connected),
        datetime.now(UTC) - timedelta(days=1),
        datetime.now(UTC),
    )

    # The minute's summary (both combinations, 10 + 20) equals its sent row plus this one.
    assert found.settled == [f"{m1.identifier}: Stripe has it; marked sent"]
    assert {r.status for r in all_rows(world.engine)} == {"sent"}
    assert found.drifting == 0
