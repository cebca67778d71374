"""reporters.pages: Stripe's cursor pagination, over plain pages and over the SDK and the
emulator (more than 100 meters: the start-up check reads every page)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import stripe
from prometheus_client import CollectorRegistry

from meterstream.meters import load_catalogue
from meterstream.metrics import ReporterMetrics
from reporters.meters_check import list_stripe_meters
from reporters.pages import all_items
from reporters.service import connect
from stripe_emulator import Emulator, run_stripe_emulator
from tests.reporters.test_reporter import (
    SECRET,
    STRIPE_METERS,
    create_stripe_meters,
    world_settings,
)


@dataclass
class Item:
    id: str


@dataclass
class Page:
    data: list[Item]
    has_more: bool


def test_all_items_follows_the_cursor_and_keeps_the_params() -> None:
    items = [Item(f"it_{n}") for n in range(5)]
    asked: list[dict[str, Any]] = []

    def call(params: dict[str, Any]) -> Page:
        asked.append(params)
        start = next(
            (i + 1 for i, item in enumerate(items) if item.id == params.get("starting_after")), 0
        )
        page = items[start : start + 2]
        return Page(page, start + 2 < len(items))

    assert [item.id for item in all_items(call, {"limit": 2})] == [i.id for i in items]
    assert asked == [
        {"limit": 2},
        {"limit": 2, "starting_after": "it_1"},
        {"limit": 2, "starting_after": "it_3"},
    ]


def test_all_items_stops_on_an_empty_page_that_claims_more() -> None:
    assert list(all_items(lambda _params: Page([], True), {})) == []


# -- through the real stripe SDK over HTTP, against the emulator's paging -------------------

EXTRA_METERS = 205


def _crowded_account(emulator: Emulator) -> None:
    """The catalogue's meters first (so, listed newest first, they are on the last page),
    then 205 others: 3 pages of 100."""
    create_stripe_meters(emulator)
    for n in range(EXTRA_METERS):
        emulator.state.create_meter(display_name=f"other {n}", event_name=f"other_{n}")


def _meter_list_calls(emulator: Emulator) -> list[str]:
    return [r.query for r in emulator.received if r.path == "/v1/billing/meters"]


def test_more_than_100_meters_are_listed_page_after_page_through_the_sdk() -> None:
    with run_stripe_emulator(rate_limit_per_s=None, keep_requests=20) as emulator:
        _crowded_account(emulator)
        client = stripe.StripeClient(
            SECRET, base_addresses={"api": emulator.url}, max_network_retries=0
        )
        found = list_stripe_meters(lambda params: client.v1.billing.meters.list(params=params))

        total = EXTRA_METERS + len(STRIPE_METERS)
        assert len({m.id for m in found}) == len(found) == total
        assert {m.event_name for m in found} >= set(STRIPE_METERS)
        calls = _meter_list_calls(emulator)
        assert len(calls) == 3  # 100 + 100 + the rest, each after the last id of the one before
        assert all("limit=100" in query for query in calls)
        assert ["starting_after" in query for query in calls] == [False, True, True]


def test_the_start_up_meter_check_finds_a_meter_on_the_third_page(tmp_path: Path) -> None:
    with run_stripe_emulator(rate_limit_per_s=None, keep_requests=20) as emulator:
        _crowded_account(emulator)
        settings = world_settings(emulator, "sqlite://", tmp_path)
        catalogue = load_catalogue(settings.meters_file)

        connected = connect(
            settings, catalogue, ReporterMetrics(CollectorRegistry()), threading.Event()
        )
        try:
            assert {m.event_name for m in connected.stripe_meters.values()} == set(STRIPE_METERS)
            assert len(_meter_list_calls(emulator)) == 3
        finally:
            connected.http_client.close()  # type: ignore[no-untyped-call]  # SDK: unannotated
