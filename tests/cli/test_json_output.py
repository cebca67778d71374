"""--json on status, reconcile, customers list and totals: one document a script can parse,
exact values as strings, times ISO-8601 UTC with Z."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine

from meterstream.cli.json_output import json_document
from stripe_emulator import Emulator
from tests.cli.commands import meterstream
from tests.reporters.test_reporter import hour_start, put_total


def parse(env: dict[str, str], *args: str, exit_code: int = 0) -> Any:
    done = meterstream(env, *args)
    assert done.returncode == exit_code, done.stdout + done.stderr
    return json.loads(done.stdout)


def utc(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text)


def test_totals_json_gives_exact_values_as_strings(
    env: dict[str, str], migrated_engine: Engine
) -> None:
    window = hour_start(2)
    put_total(migrated_engine, "acme", "storage", window, "0.0125")

    [total] = parse(env, "totals", "--json")

    assert total["customer"] == "acme" and total["meter"] == "storage"
    assert total["value"] == "0.0125"
    assert utc(total["window_start"]) == window


def test_customers_list_json_is_an_array_of_links(
    env: dict[str, str], migrated_engine: Engine
) -> None:
    assert parse(env, "customers", "list", "--json") == []
    assert meterstream(env, "customers", "link", "acme", "cus_a").returncode == 0

    links = parse(env, "customers", "list", "--json")

    assert links == [{"customer_id": "acme", "stripe_customer_id": "cus_a"}]


def test_status_json_shows_held_usage_with_its_exact_total_then_what_was_sent(
    env: dict[str, str], migrated_engine: Engine
) -> None:
    window = hour_start(2)
    put_total(migrated_engine, "acme", "storage", window, "0.0125")
    assert meterstream(env, "report", "--once").returncode == 3  # acme is not linked

    held = parse(env, "status", "--json")

    assert held["aggregators"]["windows"] == 1
    assert held["aggregators"]["events"] == 1
    [item] = held["reporter"]["held"]
    assert item["reason"] == "no_customer_link"
    assert item["total"] == "0.0125"
    assert utc(item["window_start"]) == window
    assert held["reporter"]["last_sent_at"] is None

    assert meterstream(env, "customers", "link", "acme", "cus_a").returncode == 0
    assert meterstream(env, "report", "--once").returncode == 0
    sent = parse(env, "status", "--json")

    assert sent["reporter"]["held"] == []
    assert sent["reporter"]["ledger"] == {"sent": 1}
    assert utc(sent["reporter"]["last_sent_at"]) <= datetime.now(UTC)


def test_reconcile_json_compares_each_stripe_customer_meter_and_exits_1_on_drift(
    emulator: Emulator, env: dict[str, str], migrated_engine: Engine
) -> None:
    window = hour_start(2)
    put_total(migrated_engine, "cus_a", "storage", window, "0.0125")
    assert meterstream(env, "report", "--once").returncode == 0  # 12 units sent, 0.5 carried

    agreed = parse(env, "reconcile", "--json")

    assert agreed["compared"] == 1 and agreed["drifting"] == 0
    [line] = agreed["lines"]
    assert line["stripe_customer_id"] == "cus_a" and line["meter"] == "storage"
    assert line["stripe_value"] == "12"
    assert (line["ledger_value"], line["database_value"], line["drift"]) == (12, 12, False)
    assert utc(agreed["start"]) < utc(agreed["end"])

    # Usage Stripe holds that the ledger never sent: drift, exit 1, still one JSON document.
    emulator.state.record_event(
        event_name="storage_mb",
        payload={"stripe_customer_id": "cus_a", "value": "5"},
        identifier=None,
        timestamp=int((window + timedelta(minutes=10)).timestamp()),
        source="dashboard",
    )
    drifted = parse(env, "reconcile", "--json", exit_code=1)

    assert drifted["drifting"] == 1
    assert drifted["lines"][0]["stripe_value"] == "17"
    assert drifted["lines"][0]["drift"] is True


def test_json_document_keeps_decimals_exact_and_times_in_utc() -> None:
    naive = datetime(2026, 1, 2, 3, 4, 5)  # SQLite gives times back without a zone: UTC
    document = json_document(
        {"value": Decimal("1E-30"), "at": naive, "lag": {0: 3}, "seconds": 1.5, "n": 10**20}
    )

    assert json.loads(document) == {
        "value": "0.000000000000000000000000000001",
        "at": "2026-01-02T03:04:05Z",
        "lag": {"0": 3},
        "seconds": 1.5,
        "n": 10**20,
    }
