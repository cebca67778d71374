"""A request as the emulator's endpoints see it: method, path, headers and body, with the form,
query and JSON parsed once. Its own module so the router (api.py) and the endpoints (routes.py)
both import it and not each other."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import parse_qsl

from stripe_emulator.records import StripeApiError

_BRACKETS = re.compile(r"\[([^\]]*)\]")


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str
    query: str
    headers: Mapping[str, str]  # names in lower case
    body: bytes


@dataclass
class Call:
    """What an endpoint sees: the request, its path ids, its parsed body and query."""

    request: ApiRequest
    path_ids: tuple[str, ...]
    stall: Callable[[], None]  # blocks while a `hold` fault is on this call

    @cached_property
    def form(self) -> dict[str, Any]:
        return parse_form(self.request.body.decode("utf-8"))

    @cached_property
    def query(self) -> dict[str, Any]:
        return parse_form(self.request.query)

    @cached_property
    def json(self) -> Any:
        try:
            return json.loads(self.request.body or b"{}")
        except ValueError as exc:
            raise StripeApiError(400, f"Invalid JSON body: {exc}.") from exc


def parse_form(text: str) -> dict[str, Any]:
    """Stripe's bracket notation to nested dicts: `payload[value]=3` -> {"payload": {...}}."""
    parsed: dict[str, Any] = {}
    for name, value in parse_qsl(text, keep_blank_values=True):
        head, _, rest = name.partition("[")
        keys = [head, *_BRACKETS.findall("[" + rest)] if rest else [head]
        target = parsed
        for key in keys[:-1]:
            child = target.setdefault(key, {})
            if not isinstance(child, dict):
                raise StripeApiError(400, f"Invalid parameter {name}.", param=name)
            target = child
        target[keys[-1]] = value
    return parsed
