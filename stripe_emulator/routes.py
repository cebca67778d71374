"""The endpoints the emulator serves: read Stripe's parameters (params.py), call the state,
shape answers.

v1 endpoints take form bodies in bracket notation and Unix-second times; v2 endpoints take
JSON and RFC 3339 times. Each endpoint returns (HTTP status, JSON body).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from stripe_emulator import rules
from stripe_emulator.calls import Call
from stripe_emulator.params import (
    PAGING,
    hash_param,
    integer_param,
    only_params,
    paged,
    param_unknown,
    string_list_param,
    string_map_param,
    text_param,
)
from stripe_emulator.records import StripeApiError, parse_rfc3339
from stripe_emulator.state import EmulatorState, StreamEvent

Endpoint = Callable[[EmulatorState, Call], tuple[int, object]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    endpoint: Endpoint
    auth: Literal["secret", "session"] = "secret"
    one_per_customer: bool = False  # Stripe's one concurrent call per customer and meter


# -- v1 meter events ------------------------------------------------------------------------


def create_meter_event(state: EmulatorState, call: Call) -> tuple[int, object]:
    form = only_params(call.form, "event_name", "payload", "identifier", "timestamp")
    event = state.record_event(
        event_name=text_param(form, "event_name"),
        payload=string_map_param(form.get("payload"), "payload"),
        identifier=text_param(form, "identifier") or None,
        timestamp=integer_param(form, "timestamp"),
        source="v1",
    )
    return 200, event.to_stripe()


def create_adjustment(state: EmulatorState, call: Call) -> tuple[int, object]:
    form = only_params(call.form, "event_name", "type", "cancel")
    kind = text_param(form, "type")
    if kind != "cancel":
        if not kind:
            raise rules.param_missing("type")
        raise StripeApiError(400, f"Invalid type: must be cancel, got '{kind}'.", param="type")
    identifier = text_param(hash_param(form, "cancel", "identifier"), "identifier")
    rules.check_length("event_name", text_param(form, "event_name"), rules.MAX_NAME_CHARS)
    rules.check_length("cancel[identifier]", identifier, rules.MAX_NAME_CHARS)
    event = state.cancel_event(event_name=text_param(form, "event_name"), identifier=identifier)
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
    query = only_params(call.query, *PAGING, "status")
    status = text_param(query, "status")
    if status not in (None, "active", "inactive"):
        raise StripeApiError(
            400, f"Invalid status: must be active or inactive, got '{status}'.", param="status"
        )
    meters = [m.to_stripe() for m in state.meters(status)]
    return 200, paged(query, "/v1/billing/meters", meters)


def _check_meter_lengths(form: dict[str, Any], *keys: tuple[str, str]) -> None:
    rules.check_length(
        "display_name", text_param(form, "display_name"), rules.MAX_DISPLAY_NAME_CHARS
    )
    rules.check_length("event_name", text_param(form, "event_name"), rules.MAX_NAME_CHARS)
    for hash_name, key in keys:
        value = form.get(hash_name)
        if isinstance(value, dict):
            text = text_param(value, key)
            rules.check_length(f"{hash_name}[{key}]", text, rules.MAX_NAME_CHARS)


def create_meter(state: EmulatorState, call: Call) -> tuple[int, object]:
    form = only_params(
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
    aggregation = hash_param(form, "default_aggregation", "formula")
    mapping = hash_param(form, "customer_mapping", "event_payload_key", "type")
    value_settings = hash_param(form, "value_settings", "event_payload_key")
    _check_meter_lengths(
        form, ("customer_mapping", "event_payload_key"), ("value_settings", "event_payload_key")
    )
    if text_param(mapping, "type") not in (None, "by_id"):
        raise StripeApiError(
            400, "Invalid customer_mapping[type]: must be by_id.", param="customer_mapping[type]"
        )
    meter = state.create_meter(
        display_name=text_param(form, "display_name"),
        event_name=text_param(form, "event_name"),
        formula=text_param(aggregation, "formula"),
        customer_key=text_param(mapping, "event_payload_key") or "stripe_customer_id",
        value_key=text_param(value_settings, "event_payload_key") or "value",
        dimension_payload_keys=string_list_param(
            form.get("dimension_payload_keys"), "dimension_payload_keys"
        ),
    )
    return 200, meter.to_stripe()


def retrieve_meter(state: EmulatorState, call: Call) -> tuple[int, object]:
    only_params(call.query)
    return 200, state.meter(call.path_ids[0]).to_stripe()


def update_meter(state: EmulatorState, call: Call) -> tuple[int, object]:
    form = only_params(call.form, "display_name")
    _check_meter_lengths(form)
    name = text_param(form, "display_name")
    return 200, state.update_meter(call.path_ids[0], display_name=name).to_stripe()


def deactivate_meter(state: EmulatorState, call: Call) -> tuple[int, object]:
    return 200, state.update_meter(call.path_ids[0], active=False).to_stripe()


def reactivate_meter(state: EmulatorState, call: Call) -> tuple[int, object]:
    return 200, state.update_meter(call.path_ids[0], active=True).to_stripe()


def list_event_summaries(state: EmulatorState, call: Call) -> tuple[int, object]:
    """A customer's summaries, newest first, one page at a time (paged)."""
    query = only_params(
        call.query,
        *PAGING,
        *("customer", "start_time", "end_time", "value_grouping_window", "dimension_group_by_keys"),
    )
    meter_id = call.path_ids[0]
    customer_id = text_param(query, "customer")
    if not customer_id:
        raise rules.param_missing("customer")
    summaries = state.event_summaries(
        meter_id,
        customer_id=customer_id,
        start_time=integer_param(query, "start_time", required=True) or 0,
        end_time=integer_param(query, "end_time", required=True) or 0,
        window=text_param(query, "value_grouping_window"),
        group_by=string_list_param(query.get("dimension_group_by_keys"), "dimension_group_by_keys"),
    )
    return 200, paged(query, f"/v1/billing/meters/{meter_id}/event_summaries", summaries)


# -- customers ------------------------------------------------------------------------------


def create_customer(state: EmulatorState, call: Call) -> tuple[int, object]:
    form = call.form
    customer = state.create_customer(
        customer_id=text_param(form, "id"),
        name=text_param(form, "name"),
        email=text_param(form, "email"),
    )
    return 200, customer.to_stripe()


def retrieve_customer(state: EmulatorState, call: Call) -> tuple[int, object]:
    return 200, state.customer(call.path_ids[0]).to_stripe()


def list_customers(state: EmulatorState, call: Call) -> tuple[int, object]:
    query = only_params(call.query, *PAGING)
    return 200, paged(query, "/v1/customers", [c.to_stripe() for c in state.customers()])


# -- v2 -------------------------------------------------------------------------------------


def create_session(state: EmulatorState, call: Call) -> tuple[int, object]:
    body = call.json
    if isinstance(body, dict):
        only_params(body)  # the session takes no parameters
    return 200, state.create_session().to_stripe()


def _stream_event(item: object, param: str) -> StreamEvent:
    """Check one v2 event's shape; its rules are checked later, as Stripe does."""
    if not isinstance(item, dict):
        raise StripeApiError(400, f"Invalid {param}: must be an object.", param=param)
    for key in item:
        if key not in ("event_name", "payload", "identifier", "timestamp"):
            raise param_unknown(f"{param}.{key}")
    name = text_param(item, "event_name")
    if not name:
        raise rules.param_missing(f"{param}.event_name")
    raw_time = text_param(item, "timestamp")
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
        payload=string_map_param(item.get("payload"), f"{param}.payload"),
        identifier=text_param(item, "identifier") or None,
        timestamp=timestamp,
    )


def create_stream(state: EmulatorState, call: Call) -> tuple[int, object]:
    body = call.json
    if isinstance(body, dict):
        only_params(body, "events")
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
