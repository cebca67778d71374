"""Reading Stripe's request parameters as Stripe does: typed values, unknown names refused
(so a typo surfaces), hashes and form arrays, and cursor pagination of list answers. Errors are
Stripe's (400; 404 for a cursor that names no item), naming the parameter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stripe_emulator import rules
from stripe_emulator.records import JsonObject, StripeApiError

__all__ = [
    "PAGING",
    "hash_param",
    "integer_param",
    "only_params",
    "paged",
    "param_unknown",
    "string_list_param",
    "string_map_param",
    "text_param",
]


def param_unknown(param: str) -> StripeApiError:
    """Stripe's 400 for a parameter the endpoint does not take."""
    return StripeApiError(
        400, f"Received unknown parameter: {param}", code="parameter_unknown", param=param
    )


def text_param(params: dict[str, Any], name: str) -> str | None:
    """The string parameter ``name``, None if absent; a 400 if it is not a string."""
    value = params.get(name)
    if value is None or isinstance(value, str):
        return value
    raise StripeApiError(400, f"Invalid {name}: must be a string.", param=name)


def integer_param(params: dict[str, Any], name: str, *, required: bool = False) -> int | None:
    """The integer parameter ``name`` (sent as text), None if absent or empty unless
    ``required``; a 400 otherwise."""
    raw = text_param(params, name)
    if raw is None or raw == "":
        if required:
            raise rules.param_missing(name)
        return None
    try:
        return int(raw)
    except ValueError:
        raise StripeApiError(
            400, f"Invalid integer: {raw}", code="parameter_invalid_integer", param=name
        ) from None


def string_map_param(value: object, param: str) -> dict[str, str]:
    """A hash of strings to strings ({} if absent), as a dict; a 400 otherwise."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise StripeApiError(400, f"Invalid {param}: must map strings to strings.", param=param)
    return value


def string_list_param(value: object, param: str) -> list[str]:
    """A form array (`keys[0]=a&keys[1]=b`, parsed as {"0": "a", "1": "b"}) as a list."""
    if value is None:
        return []
    items = list(value.values()) if isinstance(value, dict) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
        raise StripeApiError(400, f"Invalid {param}: must be a list of strings.", param=param)
    return items


def only_params(params: dict[str, Any], *allowed: str) -> dict[str, Any]:
    """Reject parameters the endpoint does not take, as Stripe does, so typos surface."""
    for name in params:
        if name not in allowed:
            raise param_unknown(name)
    return params


def hash_param(params: dict[str, Any], name: str, *allowed: str) -> dict[str, Any]:
    """The hash parameter ``name`` ({} if absent), refusing keys it does not take."""
    value = params.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StripeApiError(400, f"Invalid {name}: must be a hash.", param=name)
    for key in value:
        if key not in allowed:
            raise param_unknown(f"{name}[{key}]")
    return value


PAGING = ("limit", "starting_after", "ending_before")


def paged(query: dict[str, Any], url: str, items: Sequence[JsonObject]) -> JsonObject:
    """One page of ``items`` (in the list's order) by Stripe's cursor pagination: ``limit``
    1..100 (default 10), then the items after ``starting_after`` or before ``ending_before``
    (an id in the list; 404 if not); ``has_more`` says whether more lie that way."""
    limit = integer_param(query, "limit")
    limit = 10 if limit is None else limit
    if not 1 <= limit <= 100:
        raise StripeApiError(
            400, f"Invalid limit: must be between 1 and 100, got {limit}.", param="limit"
        )
    after, before = text_param(query, "starting_after"), text_param(query, "ending_before")
    if after and before:
        raise StripeApiError(
            400,
            "starting_after and ending_before cannot both be given: page one way at a time.",
            code="parameters_exclusive",
            param="ending_before",
        )
    ids = [item["id"] for item in items]
    if before:
        end = _position(ids, before, "ending_before")
        start = max(0, end - limit)
        return _list(url, list(items[start:end]), has_more=start > 0)
    start = _position(ids, after, "starting_after") + 1 if after else 0
    return _list(url, list(items[start : start + limit]), has_more=start + limit < len(items))


def _position(ids: list[str], cursor: str, param: str) -> int:
    try:
        return ids.index(cursor)
    except ValueError:
        raise rules.resource_missing("object", cursor, param) from None


def _list(url: str, data: list[JsonObject], has_more: bool = False) -> JsonObject:
    return {"object": "list", "data": data, "has_more": has_more, "url": url}
