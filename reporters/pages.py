"""Stripe's cursor pagination, once: every item of a list, page after page."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

# One page of a Stripe list: ``call(params)`` (through the gateway, so it is paced like every
# call) returns an object with ``data`` (items with an ``id``) and ``has_more``.
ListPage = Callable[[dict[str, Any]], Any]


def all_items(call: ListPage, params: Mapping[str, Any]) -> Iterator[Any]:
    """Every item of the list ``call`` reads with ``params``, in Stripe's order: each next
    page starts after the last item's id, until Stripe says there is no more."""
    page_params = dict(params)
    while True:
        page = call(page_params)
        yield from page.data
        if not page.has_more or not page.data:
            return
        page_params = {**page_params, "starting_after": page.data[-1].id}
