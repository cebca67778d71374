"""reporters.pages: Stripe's cursor pagination over plain pages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reporters.pages import all_items


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
