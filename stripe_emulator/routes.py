"""The endpoints the emulator serves: parse Stripe's parameters, call the state, shape answers.

v1 endpoints take form bodies in bracket notation and Unix-second times; v2 endpoints take
JSON and RFC 3339 times. Each endpoint returns (HTTP status, JSON body).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from stripe_emulator import rules
from stripe_emulator.calls import Call
from stripe_emulator.records import JsonObject, StripeApiError, parse_rfc3339
from stripe_emulator.state import EmulatorState, StreamEvent

Endpoint = Callable[[EmulatorState, Call], tuple[int, object]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    endpoint: Endpoint
    auth: Literal["secret", "session"] = "secret"
    one_per_customer: bool = False  # Stripe's one concurrent call per customer and meter


def _text(params: dict[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is None or isinstance(value, str):
        return value
    raise StripeApiError(400, f"Invalid {name}: must be a string.", param=name)


def _integer(params: dict[str, Any], name: str, *, required: bool = False) -> int | None:
    raw = _text(params, name)
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


def _string_map(value: object, param: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise StripeApiError(400, f"Invalid {param}: must map strings to strings.", param=param)
    return value


def _string_list(value: object, param: str) -> list[str]:
    """A form array (`keys[0]=a&keys[1]=b`, parsed as {"0": "a", "1": "b"}) as a list."""
    if value is None:
        return []
    items = list(value.values()) if isinstance(value, dict) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
        raise StripeApiError(400, f"Invalid {param}: must be a list of strings.", param=param)
    return items


def _only(params: dict[str, Any], *allowed: str) -> dict[str, Any]:
    """Reject parameters the endpoint does not take, as Stripe does, so typos surface."""
    for name in params:
        if name not in allowed:
            raise StripeApiError(
                400, f"Received unknown parameter: {name}", code="parameter_unknown", param=name
            )
    return params


def _nested(params: dict[str, Any], name: str, *allowed: str) -> dict[str, Any]:
    """The hash parameter ``name`` ({} if absent), refusing keys it does not take."""
    value = params.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StripeApiError(400, f"Invalid {name}: must be a hash.", param=name)
    for key in value:
        if key not in allowed:
            raise StripeApiError(
                400,
                f"Received unknown parameter: {name}[{key}]",
                code="parameter_unknown",
                param=f"{name}[{key}]",
            )
    return value


_PAGING = ("limit", "starting_after", "ending_before")


def _page(query: dict[str, Any], url: str, items: Sequence[JsonObject]) -> JsonObject:
    """One page of ``items`` (in the list's order) by Stripe's cursor pagination: ``limit``
    1..100 (default 10), then the items after ``starting_after`` or before ``ending_before``
    (an id in the list; 404 if not); ``has_more`` says whether more lie that way."""
    limit = _integer(query, "limit")
    limit = 10 if limit is None else limit
    if not 1 <= limit <= 100:
        raise StripeApiError(
            400, f"Invalid limit: must be between 1 and 100, got {limit}.", param="limit"
        )
    after, before = _text(query, "starting_after"), _text(query, "ending_before")
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


# -- v1 meter events ------------------------------------------------------------------------


def create_meter_event(state: EmulatorState, call: Call) -> tuple[int, object]:
    form = _only(call.form, "event_name", "payload", "identifier", "timestamp")
    event = state.record_event(
        event_name=_text(form, "event_name"),
        payload=_string_map(form.get("payload"), "payload"),
        identifier=_text(form, "identifier") or None,
        timestamp=_integer(form, "timestamp"),
        source="v1",
    )
    return 200, event.to_stripe()


def create_adjustment(state: EmulatorState, call: Call) -> tuple[int, object]:
    form = _only(call.form, "event_name", "type", "cancel")
    kind = _text(form, "type")
    if kind != "cancel":
        if not kind:
            raise rules.param_missing("type")
        raise StripeApiError(400, f"Invalid type: must be cancel, got '{kind}'.", param="type")
    identifier = _text(_nested(form, "cancel", "identifier"), "identifier")
    rules.check_length("event_name", _text(form, "event_name"), rules.MAX_NAME_CHARS)
    rules.check_length("cancel[identifier]", identifier, rules.MAX_NAME_CHARS)
    event = state.cancel_event(event_name=_text(form, "event_name"), identifier=identifier)
    return 200, {
        "object": "billing.meter_event_adjustment",
        "cancel": {"identifier": event.identifier},
        "event_name": event.event_name,
        "livemode": False,
        "status": "complete",  # the emulator applies the cancellation at once
        "type": "cancel",
    }


# -- meters ---------------------------------------------------------------------------------


def list_meters(state: EmulatorState, call: Call) -> tuple[int, object]:
    query = _only(call.query, *_PAGING, "status")
    status = _text(query, "status")
    if status not in (None, "active", "inactive"):
        raise StripeApiError(
            400, f"Invalid status: must be active or inactive, got '{status}'.", param="status"
        )
    meters = [m.to_stripe() for m in state.meters(status)]
    return 200, _page(query, "/v1/billing/meters", meters)


def _check_meter_lengths(form: dict[str, Any], *keys: tuple[str, str]) -> None:
    rules.check_length("display_name", _text(form, "display_name"), rules.MAX_DISPLAY_NAME_CHARS)
    rules.check_length("event_name", _text(form, "event_name"), rules.MAX_NAME_CHARS)
    for hash_name, key in keys:
        value = form.get(hash_name)
        if isinstance(value, dict):
            text = _text(value, key)
            rules.check_length(f"{hash_name}[{key}]", text, rules.MAX_NAME_CHARS)


def create_meter(state: EmulatorState, call: Call) -> tuple[int, object]:
    form = _only(
        call.form,
        *("display_name", "event_name", "default_aggregation", "customer_mapping"),
        *("value_settings", "event_time_window", "dimension_payload_keys"),
    )
    if form.get("event_time_window"):
        # Pre-aggregated meters (newest event per window wins) are not emulated.
        raise StripeApiError(
            400,
            "event_time_window is not supported by the emulator; create a raw meter.",
            param="event_time_window",
        )
    aggregation = _nested(form, "default_aggregation", "formula")
    mapping = _nested(form, "customer_mapping", "event_payload_key", "type")
    value_settings = _nested(form, "value_settings", "event_payload_key")
    _check_meter_lengths(
        form, ("customer_mapping", "event_payload_key"), ("value_settings", "event_payload_key")
    )
    if _text(mapping, "type") not in (None, "by_id"):
        raise StripeApiError(
            400, "Invalid customer_mapping[type]: must be by_id.", param="customer_mapping[type]"
        )
    meter = state.create_meter(
        display_name=_text(form, "display_name"),
        event_name=_text(form, "event_name"),
        formula=_text(aggregation, "formula"),
        customer_key=_text(mapping, "event_payload_key") or "stripe_customer_id",
        value_key=_text(value_settings, "event_payload_key") or "value",
        dimension_payload_keys=_string_list(
            form.get("dimension_payload_keys"), "dimension_payload_keys"
        ),
    )
    return 200, meter.to_stripe()


def retrieve_meter(state: EmulatorState, call: Call) -> tuple[int, object]:
    _only(call.query)
    return 200, state.meter(call.path_ids[0]).to_stripe()


def update_meter(state: EmulatorState, call: Call) -> tuple[int, object]:
    form = _only(call.form, "display_name")
    _check_meter_lengths(form)
    name = _text(form, "display_name")
    return 200, state.update_meter(call.path_ids[0], display_name=name).to_stripe()


def deactivate_meter(state: EmulatorState, call: Call) -> tuple[int, object]:
    return 200, state.update_meter(call.path_ids[0], active=False).to_stripe()


def reactivate_meter(state: EmulatorState, call: Call) -> tuple[int, object]:
    return 200, state.update_meter(call.path_ids[0], active=True).to_stripe()


def list_event_summaries(state: EmulatorState, call: Call) -> tuple[int, object]:
    """A customer's summaries, newest first, one page at a time (_page)."""
    query = _only(
        call.query,
        *_PAGING,
        *("customer", "start_time", "end_time", "value_grouping_window", "dimension_group_by_keys"),
    )
    meter_id = call.path_ids[0]
    customer_id = _text(query, "customer")
    if not customer_id:
        raise rules.param_missing("customer")
    summaries = state.event_summaries(
        meter_id,
        customer_id=customer_id,
        start_time=_integer(query, "start_time", required=True) or 0,
        end_time=_integer(query, "end_time", required=True) or 0,
        window=_text(query, "value_grouping_window"),
        group_by=_string_list(query.get("dimension_group_by_keys"), "dimension_group_by_keys"),
    )
    return 200, _page(query, f"/v1/billing/meters/{meter_id}/event_summaries", summaries)


# -- customers ------------------------------------------------------------------------------


def create_customer(state: EmulatorState, call: Call) -> tuple[int, object]:
    form = call.form
    customer = state.create_customer(
        customer_id=_text(form, "id"), name=_text(form, "name"), email=_text(form, "email")
    )
    return 200, customer.to_stripe()


def retrieve_customer(state: EmulatorState, call: Call) -> tuple[int, object]:
    return 200, state.customer(call.path_ids[0]).to_stripe()


def list_customers(state: EmulatorState, call: Call) -> tuple[int, object]:
    query = _only(call.query, *_PAGING)
    return 200, _page(query, "/v1/customers", [c.to_stripe() for c in state.customers()])


# -- v2 -------------------------------------------------------------------------------------


def create_session(state: EmulatorState, call: Call) -> tuple[int, object]:
    body = call.json
    if isinstance(body, dict):
        _only(body)  # the session takes no parameters
    return 200, state.create_session().to_stripe()


def _stream_event(item: object, param: str) -> StreamEvent:
    """Check one v2 event's shape; its rules are checked later, as Stripe does."""
    if not isinstance(item, dict):
        raise StripeApiError(400, f"Invalid {param}: must be an object.", param=param)
    for key in item:
        if key not in ("event_name", "payload", "identifier", "timestamp"):
            raise StripeApiError(
                400,
                f"Received unknown parameter: {param}.{key}",
                code="parameter_unknown",
                param=f"{param}.{key}",
            )
    name = _text(item, "event_name")
    if not name:
        raise rules.param_missing(f"{param}.event_name")
    raw_time = _text(item, "timestamp")
    try:
        timestamp = None if raw_time is None else parse_rfc3339(raw_time)
    except ValueError:
        raise StripeApiError(
            400,
            f"Invalid {param}.timestamp: must be an RFC 3339 time, got '{raw_time}'.",
            param=f"{param}.timestamp",
        ) from None
    return StreamEvent(
        event_name=name,
        payload=_string_map(item.get("payload"), f"{param}.payload"),
        identifier=_text(item, "identifier") or None,
        timestamp=timestamp,
    )


def create_stream(state: EmulatorState, call: Call) -> tuple[int, object]:
    body = call.json
    if isinstance(body, dict):
        _only(body, "events")
    events = body.get("events") if isinstance(body, dict) else None
    if not isinstance(events, list) or not events:
        raise rules.param_missing("events")
    if len(events) > rules.MAX_STREAM_EVENTS:
        raise StripeApiError(
            400,
            f"Too many events: a stream call takes at most {rules.MAX_STREAM_EVENTS}, "
            f"got {len(events)}. Split them into several calls.",
            code="too_many_events",
            param="events",
        )
    state.record_stream([_stream_event(item, f"events[{i}]") for i, item in enumerate(events)])
    # The document answers 200 with an empty object: accepted, not yet validated.
    return 200, {}


def create_v2_meter_event(state: EmulatorState, call: Call) -> tuple[int, object]:
    item = _stream_event(call.json, "event")
    event = state.record_event(
        event_name=item.event_name,
        payload=item.payload,
        identifier=item.identifier,
        timestamp=item.timestamp,
        source="v2",
    )
    return 200, event.to_stripe_v2()


def retrieve_v2_event(state: EmulatorState, call: Call) -> tuple[int, object]:
    """The full event behind a thin webhook notification (the SDK's ``fetch_event()``)."""
    return 200, state.v2_event(call.path_ids[0])


_ID = r"([A-Za-z0-9_]+)"


def _route(method: str, path: str, endpoint: Endpoint, **options: Any) -> Route:
    return Route(method, re.compile(path), endpoint, **options)


ROUTES: tuple[Route, ...] = (
    _route("POST", "/v1/billing/meter_events", create_meter_event, one_per_customer=True),
    _route("POST", "/v1/billing/meter_event_adjustments", create_adjustment),
    _route("GET", "/v1/billing/meters", list_meters),
    _route("POST", "/v1/billing/meters", create_meter),
    _route("GET", f"/v1/billing/meters/{_ID}", retrieve_meter),
    _route("POST", f"/v1/billing/meters/{_ID}", update_meter),
    _route("POST", f"/v1/billing/meters/{_ID}/deactivate", deactivate_meter),
    _route("POST", f"/v1/billing/meters/{_ID}/reactivate", reactivate_meter),
    _route("GET", f"/v1/billing/meters/{_ID}/event_summaries", list_event_summaries),
    _route("POST", "/v1/customers", create_customer),
    _route("GET", "/v1/customers", list_customers),
    _route("GET", f"/v1/customers/{_ID}", retrieve_customer),
    _route("POST", "/v2/billing/meter_event_session", create_session),
    _route("POST", "/v2/billing/meter_event_stream", create_stream, auth="session"),
    _route("POST", "/v2/billing/meter_events", create_v2_meter_event),
    _route("GET", f"/v2/core/events/{_ID}", retrieve_v2_event),
)
