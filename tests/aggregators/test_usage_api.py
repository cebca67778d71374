"""GET /v1/usage and GET /v1/meters on a running ``meterstream serve``, with real HTTP clients
(requests, and curl), over windows the real batch apply wrote, on PostgreSQL and SQLite."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import Engine

from aggregators.batch import BatchApplier, Message
from meterstream.api_keys import create_key
from meterstream.db import build_engine, migrate
from meterstream.events import UsageEvent, encode_event
from meterstream.meters import load_catalogue
from meterstream.metrics import AggregatorMetrics
from meterstream.settings import Settings
from tests.aggregators.serving import served
from tests.conftest import EXAMPLE_METERS

SettingsFactory = Callable[..., Settings]
CATALOGUE = load_catalogue(EXAMPLE_METERS)


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _apply(engine: Engine, events: list[UsageEvent]) -> None:
    applier = BatchApplier(engine, CATALOGUE, AggregatorMetrics(), horizon_days=35)
    messages = [Message("usage", 0, i, encode_event(e)) for i, e in enumerate(events)]
    assert applier.apply(messages).rejected == []


def test_usage_and_meters_over_http(
    settings_factory: SettingsFactory, database_url: str, tmp_path: Path
) -> None:
    settings = settings_factory(database_url=database_url)
    engine = build_engine(settings)
    migrate(engine)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    day = hour.replace(hour=0)
    month = day.replace(day=1)
    _apply(
        engine,
        [
            UsageEvent("a", "svc", "c1", "tokens", Decimal("0.000000000001"), hour),
            UsageEvent("b", "svc", "c1", "tokens", Decimal("12.5"), hour + timedelta(minutes=5)),
            UsageEvent("c", "svc", "c1", "tokens", Decimal(3), hour + timedelta(hours=1)),
            UsageEvent("d", "svc", "c2", "tokens", Decimal(99), hour),
            UsageEvent("e", "svc", "c1", "active_users", 1, hour, {"user_id": "u1"}),
        ],
    )
    keys = {
        scope: create_key(engine, f"k-{scope}", "svc", scope)[1]
        for scope in ("read", "ingest", "all")
    }
    engine.dispose()

    def get(path: str, key: str | None = "read", **params: str) -> requests.Response:
        headers = {"Authorization": f"Bearer {keys[key]}"} if key else {}
        return requests.get(f"{base}{path}", params=params, headers=headers, timeout=30)

    both_days = {
        "customer": "c1",
        "meter": "tokens",
        "from": _iso(day),
        "to": _iso(day + timedelta(days=2)),
    }
    with served(settings, tmp_path / "serve.log") as base:
        own = get("/v1/usage", **both_days)
        assert own.status_code == 200, own.text
        assert own.json() == {
            "customer": "c1",
            "meter": "tokens",
            "aggregation": "sum",
            "window": "1h",
            "from": _iso(day),
            "to": _iso(day + timedelta(days=2)),
            "windows": [
                {
                    "start": _iso(hour),
                    "end": _iso(hour + timedelta(hours=1)),
                    "value": "12.500000000001",
                    "events": 2,
                    "revision": 1,
                },
                {
                    "start": _iso(hour + timedelta(hours=1)),
                    "end": _iso(hour + timedelta(hours=2)),
                    "value": "3",
                    "events": 1,
                    "revision": 1,
                },
            ],
        }
        total = get("/v1/usage", **both_days, window="total").json()
        assert total["window"] == "total"
        assert [(w["value"], w["events"], w["revision"]) for w in total["windows"]] == [
            ("15.500000000001", 3, 2)
        ]
        daily = get("/v1/usage", **both_days, window="1d").json()
        assert [w["start"] for w in daily["windows"]] == [_iso(day)]
        # Refusals name the parameter, in the API's one error shape.
        off = get("/v1/usage", **{**both_days, "from": _iso(day + timedelta(minutes=30))})
        assert off.status_code == 400 and off.json()["error"].startswith("from: ")
        # This month and the next: two distinct counts, which cannot be added.
        two_months = (month + timedelta(days=62)).replace(day=1)
        several = get(
            "/v1/usage",
            customer="c1",
            meter="active_users",
            window="total",
            **{"from": _iso(month), "to": _iso(two_months)},
        )
        assert several.status_code == 400 and "cannot be added" in several.json()["error"]
        assert get("/v1/usage", **{**both_days, "meter": "gpu"}).status_code == 400
        assert get("/v1/usage", **{**both_days, "window": "1w"}).status_code == 422
        # The key: none or unknown is 401, an ingest-only key 403, read and all pass.
        assert get("/v1/usage", key=None, **both_days).status_code == 401
        assert (
            requests.get(
                f"{base}/v1/meters", headers={"Authorization": "Bearer msk_nope"}, timeout=30
            ).status_code
            == 401
        )
        assert get("/v1/usage", key="ingest", **both_days).status_code == 403
        assert get("/v1/usage", key="all", **both_days).json() == own.json()
        meters = _curl(f"{base}/v1/meters", keys["read"])
    assert [m["name"] for m in meters["meters"]] == sorted(CATALOGUE.meters)
    storage = next(m for m in meters["meters"] if m["name"] == "storage_gb_hours")
    assert (storage["unit_scale"], storage["allow_negative"], storage["window"]) == (
        "1000",
        True,
        "1h",
    )


def _curl(url: str, key: str) -> Any:
    done = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "-H", f"Authorization: Bearer {key}", url],
        capture_output=True,
        check=True,
        timeout=30,
    )
    return json.loads(done.stdout)
