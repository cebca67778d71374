"""Catalogue changes against stored totals: accepted where nothing stored depends on them,
refused at worker start (with how to do it instead) where totals would be read wrongly."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select

from aggregators.definitions import check_definitions
from meterstream.errors import CatalogueChangedError
from meterstream.meters import Catalogue, parse_catalogue
from meterstream.schema import meter_definitions, window_totals
from meterstream.settings import Settings
from tests.aggregators.test_batch import stored_totals
from tests.aggregators.test_worker import migrated
from tests.aggregators.workers import environment

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
TOKENS = {"aggregation": "sum", "window": "1h"}
USERS = {"aggregation": "unique_count", "window": "1mo", "unique_property": "user_id"}
CALLS = {"aggregation": "count", "window": "1m"}


def catalogue(**meters: dict[str, Any]) -> Catalogue:
    return parse_catalogue({"meters": meters})


def check(engine: Engine, current: Catalogue) -> None:
    check_definitions(engine, current, NOW, "meters.toml")


def store_total(engine: Engine, meter: str) -> None:
    start = datetime(2026, 12, 4, 11, tzinfo=UTC)
    with engine.begin() as connection:
        connection.execute(
            insert(window_totals).values(
                customer_id="customer-1",
                meter=meter,
                window_start=start,
                window_end=start.replace(hour=12),
                value=Decimal(5),
                events=1,
                revision=1,
                first_applied_at=NOW,
                updated_at=NOW,
            )
        )


def recorded(engine: Engine) -> dict[str, tuple[str, str, str | None]]:
    c = meter_definitions.c
    with engine.connect() as connection:
        rows = connection.execute(select(c.meter, c.aggregation, c.window, c.unique_property))
        return {r.meter: (r.aggregation, r.window, r.unique_property) for r in rows}


def test_definitions_are_recorded_and_a_new_meter_is_accepted(migrated_engine: Engine) -> None:
    check(migrated_engine, catalogue(tokens=TOKENS))
    store_total(migrated_engine, "tokens")
    check(migrated_engine, catalogue(tokens=TOKENS))  # unchanged: starts again
    check(migrated_engine, catalogue(tokens=TOKENS, api_calls=CALLS))
    assert recorded(migrated_engine) == {
        "tokens": ("sum", "1h", None),
        "api_calls": ("count", "1m", None),
    }


@pytest.mark.parametrize(
    ("changed", "says"),
    [
        ({"aggregation": "max", "window": "1h"}, "aggregation 'sum' -> 'max'"),
        ({"aggregation": "sum", "window": "1d"}, "window '1h' -> '1d'"),
        ({**TOKENS, "dimensions": ["model"]}, "dimensions '' -> 'model'"),
        ({**TOKENS, "value_property": "tokens"}, "value_property None -> 'tokens'"),
    ],
    ids=["aggregation", "window", "dimensions", "value_property"],
)
def test_redefining_a_meter_with_totals_is_refused_and_nothing_changes(
    migrated_engine: Engine, changed: dict[str, Any], says: str
) -> None:
    check(migrated_engine, catalogue(tokens=TOKENS, api_calls=CALLS))
    store_total(migrated_engine, "tokens")
    before = stored_totals(migrated_engine)
    with pytest.raises(CatalogueChangedError, match="new meter") as refused:
        check(migrated_engine, catalogue(tokens=changed, api_calls=CALLS))
    assert says in str(refused.value)
    assert "api_calls" not in str(refused.value)
    assert recorded(migrated_engine)["tokens"] == ("sum", "1h", None)
    assert stored_totals(migrated_engine) == before


def test_changing_the_unique_property_of_a_meter_with_totals_is_refused(
    migrated_engine: Engine,
) -> None:
    check(migrated_engine, catalogue(users=USERS))
    store_total(migrated_engine, "users")
    with pytest.raises(CatalogueChangedError, match="unique_property 'user_id' -> 'team_id'"):
        check(migrated_engine, catalogue(users={**USERS, "unique_property": "team_id"}))


def test_listing_a_meters_dimensions_in_another_order_is_no_change(
    migrated_engine: Engine,
) -> None:
    # A combination's key sorts its dimensions (meterstream.dimensions), Stripe's check compares
    # them as a set: the same totals, so the worker starts (a new meter is not asked for).
    by_model_region = {**TOKENS, "dimensions": ["model", "region"]}
    check(migrated_engine, catalogue(tokens=by_model_region))
    store_total(migrated_engine, "tokens")
    check(migrated_engine, catalogue(tokens={**TOKENS, "dimensions": ["region", "model"]}))
    with pytest.raises(CatalogueChangedError, match="dimensions 'model,region' -> 'model'"):
        check(migrated_engine, catalogue(tokens={**TOKENS, "dimensions": ["model"]}))


@pytest.mark.parametrize("renamed", [False, True], ids=["removed", "renamed"])
def test_removing_or_renaming_a_meter_with_totals_is_refused(
    migrated_engine: Engine, renamed: bool
) -> None:
    check(migrated_engine, catalogue(tokens=TOKENS, api_calls=CALLS))
    store_total(migrated_engine, "tokens")
    after = {"llm_tokens": TOKENS} if renamed else {}
    with pytest.raises(CatalogueChangedError, match="'tokens' has stored totals but is not in"):
        check(migrated_engine, catalogue(api_calls=CALLS, **after))
    assert "llm_tokens" not in recorded(migrated_engine)


def test_a_meter_without_totals_may_change_or_go(migrated_engine: Engine) -> None:
    check(migrated_engine, catalogue(tokens=TOKENS, api_calls=CALLS))
    store_total(migrated_engine, "api_calls")
    check(
        migrated_engine, catalogue(tokens={"aggregation": "max", "window": "1d"}, api_calls=CALLS)
    )
    assert recorded(migrated_engine)["tokens"] == ("max", "1d", None)
    check(migrated_engine, catalogue(api_calls=CALLS))
    assert set(recorded(migrated_engine)) == {"api_calls"}


def test_a_database_with_totals_but_no_definitions_yet_records_them_unless_a_meter_is_gone(
    migrated_engine: Engine,
) -> None:
    store_total(migrated_engine, "tokens")
    store_total(migrated_engine, "seats")
    with pytest.raises(CatalogueChangedError, match="'seats' has stored totals"):
        check(migrated_engine, catalogue(tokens=TOKENS))
    assert recorded(migrated_engine) == {}
    check(migrated_engine, catalogue(tokens=TOKENS, seats={"aggregation": "last", "window": "1h"}))
    assert set(recorded(migrated_engine)) == {"tokens", "seats"}


def test_the_worker_refuses_to_start_and_says_how_to_migrate(
    settings_factory: Callable[..., Settings], postgres_url: str, tmp_path: Path
) -> None:
    meters = tmp_path / "meters.toml"
    meters.write_text('[meters.tokens]\naggregation = "sum"\nwindow = "1h"\n')
    settings = settings_factory(database_url=postgres_url, meters_file=meters)
    engine = migrated(settings)
    check_definitions(engine, catalogue(tokens=TOKENS), NOW, str(meters))
    store_total(engine, "tokens")
    meters.write_text('[meters.tokens]\naggregation = "sum"\nwindow = "1d"\n')
    done = subprocess.run(
        [sys.executable, "-m", "meterstream", "aggregate"],
        env=environment(settings),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "window '1h' -> '1d'" in done.stderr.decode()
    assert "add the new one as a new meter" in done.stderr.decode()
    engine.dispose()
