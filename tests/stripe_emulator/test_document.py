"""The emulator answers as Stripe's OpenAPI document says (tests/stripe_emulator/document.py).

Every call goes over real HTTP (urllib) and every answer, success or refusal, is checked
against the document's schema for its operation: a status the document does not give, a
missing required field, a type, an enum value or a length outside it fails the test.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stripe_emulator import Emulator, ManualClock, run_stripe_emulator
from stripe_emulator.params import paged
from tests.stripe_emulator.document import answer_problems, problems

NOW_S = 1_795_500_000  # 2026-11-24T06:00:00Z, minute-aligned
KEY = "sk_test_document"
UNKNOWN_SESSION = "mes_tok_unknown"
NOT_A_KEY = "nope"


def _form(params: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Stripe's bracket notation, as the SDK encodes a form."""
    pairs: list[tuple[str, str]] = []
    for name, value in params.items():
        key = f"{prefix}[{name}]" if prefix else name
        if isinstance(value, dict):
            pairs += _form(value, key)
        else:
            pairs.append((key, str(value)))
    return pairs


@dataclass
class Stripe:
    """Raw HTTP calls to the emulator; each answer is checked against the document."""

    emulator: Emulator
    seen: list[tuple[str, str, int]] = field(default_factory=list)

    def call(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        *,
        json_body: object | None = None,
        token: str = KEY,
    ) -> tuple[int, Any]:
        url, data = self.emulator.url + path, None
        headers = {"Authorization": f"Bearer {token}"}
        if json_body is not None:
            data = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif params and method == "GET":
            url += "?" + urllib.parse.urlencode(_form(params))
        elif params:
            data = urllib.parse.urlencode(_form(params)).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as refused:
            status, raw = refused.code, refused.read()
        body = json.loads(raw)
        found = answer_problems(method, path, status, body)
        assert not found, f"{method} {path} -> {status} {body}: {found}"
        self.seen.append((method, path, status))
        return status, body

    def error(self, method: str, path: str, params: dict[str, Any], status: int) -> Any:
        answered, body = self.call(method, path, params)
        assert answered == status, body
        return body["error"]


@pytest.fixture
def stripe_api() -> Iterator[Stripe]:
    with run_stripe_emulator(rate_limit_per_s=None, clock=ManualClock(NOW_S)) as emulator:
        yield Stripe(emulator)


def _meter(api: Stripe, event_name: str = "api_calls", **extra: Any) -> Any:
    status, meter = api.call(
        "POST",
        "/v1/billing/meters",
        {
            "display_name": "API calls",
            "event_name": event_name,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            **extra,
        },
    )
    assert status == 200, meter
    return meter


def _event(customer: str, **extra: Any) -> dict[str, Any]:
    return {
        "event_name": "api_calls",
        "payload": {"stripe_customer_id": customer, "value": "3"},
        "timestamp": NOW_S,
        **extra,
    }


def test_every_answer_of_the_meter_flow_is_as_documented(stripe_api: Stripe) -> None:
    api = stripe_api
    _, customer = api.call("POST", "/v1/customers", {"name": "Acme"})
    meter = _meter(api)
    api.call("GET", f"/v1/billing/meters/{meter['id']}")
    api.call("POST", f"/v1/billing/meters/{meter['id']}", {"display_name": "Calls"})
    api.call("GET", "/v1/billing/meters", {"status": "active"})
    api.call("GET", "/v1/customers", {"limit": 1})
    api.call("GET", f"/v1/customers/{customer['id']}")
    status, _ = api.call(
        "POST", "/v1/billing/meter_events", _event(customer["id"], identifier="ev-1")
    )
    assert status == 200
    api.call(
        "POST",
        "/v1/billing/meter_event_adjustments",
        {"event_name": "api_calls", "type": "cancel", "cancel": {"identifier": "ev-1"}},
    )
    _, summaries = api.call(
        "GET",
        f"/v1/billing/meters/{meter['id']}/event_summaries",
        {"customer": customer["id"], "start_time": NOW_S - 3600, "end_time": NOW_S + 3600},
    )
    assert summaries["data"][0]["aggregated_value"] == 0  # the one event was cancelled
    api.call("POST", f"/v1/billing/meters/{meter['id']}/deactivate")
    api.call("POST", f"/v1/billing/meters/{meter['id']}/reactivate")


def test_v2_session_stream_and_event_answers_are_as_documented(stripe_api: Stripe) -> None:
    api = stripe_api
    _, customer = api.call("POST", "/v1/customers", {"name": "Acme"})
    _meter(api)
    _, session = api.call("POST", "/v2/billing/meter_event_session", json_body={})
    event = {
        "event_name": "api_calls",
        "payload": {"stripe_customer_id": customer["id"], "value": "2"},
        "timestamp": "2026-11-24T05:59:00.000Z",
    }
    status, body = api.call(
        "POST",
        "/v2/billing/meter_event_stream",
        json_body={"events": [event]},
        token=session["authentication_token"],
    )
    assert (status, body) == (200, {})  # the document's 200 with an empty object, not 202
    status, _ = api.call("POST", "/v2/billing/meter_events", json_body=event)
    assert status == 200
    status, refused = api.call(
        "POST",
        "/v2/billing/meter_event_stream",
        json_body={"events": [event]},
        token=UNKNOWN_SESSION,
    )
    assert (status, refused["error"]["type"]) == (401, "temporary_session_expired")


def test_refusals_use_only_the_documents_types_and_codes(stripe_api: Stripe) -> None:
    api = stripe_api
    _, customer = api.call("POST", "/v1/customers", {"name": "Acme"})
    _meter(api)
    api.call("POST", "/v1/billing/meter_events", _event(customer["id"], identifier="ev-1"))
    duplicate = api.error(
        "POST", "/v1/billing/meter_events", _event(customer["id"], identifier="ev-1"), 400
    )
    assert (duplicate["code"], duplicate["param"]) == ("resource_already_exists", "identifier")
    assert "ev-1" in duplicate["message"]

    unknown = api.error("POST", "/v1/billing/meter_events", _event("x", colour="blue"), 400)
    assert (unknown["code"], unknown["param"]) == ("parameter_unknown", "colour")

    status, unauthorized = api.call("GET", "/v1/billing/meters", token=NOT_A_KEY)
    assert (status, unauthorized["error"]["type"]) == (401, "invalid_request_error")

    api.emulator.faults.inject("http_429", path_prefix="/v1/billing/meters")
    status, limited = api.call("GET", "/v1/billing/meters")
    assert (status, limited["error"]["type"], limited["error"]["code"]) == (
        429,
        "invalid_request_error",
        "rate_limit",
    )
    api.emulator.faults.inject("http_500", path_prefix="/v1/billing/meters")
    status, failed = api.call("GET", "/v1/billing/meters")
    assert (status, failed["error"]["type"]) == (500, "api_error")
    api.emulator.faults.inject("http_409", path_prefix="/v1/billing/meter_events")
    status, busy = api.call("POST", "/v1/billing/meter_events", _event(customer["id"]))
    assert (status, busy["error"]["code"]) == (409, "idempotency_key_in_use")
    api.error("GET", "/v1/billing/meters/mtr_nope", {}, 404)
    api.error("POST", "/v1/billing/meter_events", _event(customer["id"], timestamp=1), 400)
    api.error("POST", "/v1/billing/meter_events", _event("cus_nobody"), 400)
    api.error("POST", "/v1/billing/meter_events", _event("x", event_name="unknown"), 400)


LONG = "x" * 101


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("/v1/billing/meter_events", {"event_name": LONG}, "event_name"),
        ("/v1/billing/meter_events", {"identifier": LONG}, "identifier"),
        ("/v1/billing/meters", {"event_name": LONG}, "event_name"),
        ("/v1/billing/meters", {"display_name": "x" * 251}, "display_name"),
        (
            "/v1/billing/meters",
            {"customer_mapping": {"event_payload_key": LONG, "type": "by_id"}},
            "customer_mapping[event_payload_key]",
        ),
        (
            "/v1/billing/meters",
            {"value_settings": {"event_payload_key": LONG}},
            "value_settings[event_payload_key]",
        ),
        (
            "/v1/billing/meter_event_adjustments",
            {"cancel": {"identifier": LONG}},
            "cancel[identifier]",
        ),
        ("/v1/billing/meters", {"value_settings": {"key": "v"}}, "value_settings[key]"),
        ("/v1/billing/meters", {"colour": "blue"}, "colour"),
    ],
)
def test_over_long_fields_and_unknown_parameters_are_refused(
    stripe_api: Stripe, path: str, params: dict[str, Any], param: str
) -> None:
    base = {
        "/v1/billing/meter_events": _event("cus_x"),
        "/v1/billing/meters": {
            "display_name": "Calls",
            "event_name": "calls",
            "default_aggregation": {"formula": "sum"},
        },
        "/v1/billing/meter_event_adjustments": {"event_name": "calls", "type": "cancel"},
    }[path]
    error = stripe_api.error("POST", path, {**base, **params}, 400)
    assert error["param"] == param
    assert stripe_api.emulator.state.meters() == []  # refused, so nothing was created


def test_meter_list_pages_by_the_documents_cursor_rules(stripe_api: Stripe) -> None:
    api = stripe_api
    for n in range(25):
        api.emulator.state.create_meter(display_name=f"m{n}", event_name=f"m{n}")
    _, first = api.call("GET", "/v1/billing/meters")
    assert (len(first["data"]), first["has_more"], first["url"]) == (10, True, "/v1/billing/meters")
    _, rest = api.call(
        "GET", "/v1/billing/meters", {"limit": 100, "starting_after": first["data"][-1]["id"]}
    )
    assert (len(rest["data"]), rest["has_more"]) == (15, False)
    _, back = api.call(
        "GET", "/v1/billing/meters", {"limit": 3, "ending_before": rest["data"][0]["id"]}
    )
    assert [m["id"] for m in back["data"]] == [m["id"] for m in first["data"][-3:]]
    assert back["has_more"] is True
    names = [m["event_name"] for m in first["data"] + rest["data"]]
    assert sorted(names) == sorted(f"m{n}" for n in range(25))
    for bad in ({"limit": 0}, {"limit": 101}, {"status": "archived"}):
        api.error("GET", "/v1/billing/meters", bad, 400)
    both = {"starting_after": first["data"][0]["id"], "ending_before": first["data"][1]["id"]}
    assert api.error("GET", "/v1/billing/meters", both, 400)["code"] == "parameters_exclusive"
    assert api.error("GET", "/v1/billing/meters", {"limit": "ten"}, 400)["code"] == (
        "parameter_invalid_integer"
    )
    assert api.error("GET", "/v1/billing/meters", {"starting_after": "mtr_gone"}, 404)["code"] == (
        "resource_missing"
    )
    assert api.error("GET", "/v1/billing/meters", {"page": "2"}, 400)["code"] == "parameter_unknown"


def test_the_check_is_real_a_wrong_status_or_missing_field_fails() -> None:
    meter = {
        "id": "mtr_1",
        "object": "billing.meter",
        "created": 1,
        "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
        "default_aggregation": {"formula": "sum"},
        "display_name": "Calls",
        "event_name": "calls",
        "event_time_window": None,
        "livemode": False,
        "status": "active",
        "status_transitions": {"deactivated_at": None},
        "updated": 1,
        "value_settings": {"event_payload_key": "value"},
    }
    assert answer_problems("GET", "/v1/billing/meters/mtr_1", 200, meter) == []
    assert answer_problems("POST", "/v2/billing/meter_event_stream", 202, {})
    missing = {k: v for k, v in meter.items() if k != "status_transitions"}
    assert answer_problems("GET", "/v1/billing/meters/mtr_1", 200, missing) == [
        "billing.meter: missing status_transitions"
    ]
    assert answer_problems("GET", "/v1/billing/meters/mtr_1", 200, {**meter, "status": "gone"})
    assert answer_problems("GET", "/v1/billing/meters/mtr_1", 200, {**meter, "created": "1"})
    outside = {"error": {"type": "rate_limit_error", "code": "rate_limit", "message": "slow"}}
    assert answer_problems("GET", "/v1/billing/meters", 429, outside)
    made_up = {"error": {"type": "invalid_request_error", "code": "duplicate_meter_event"}}
    assert answer_problems("POST", "/v1/billing/meter_events", 400, made_up)
    assert problems("x" * 101, {"type": "string", "maxLength": 100}, "event_name")


@settings(max_examples=60, deadline=None)
@given(count=st.integers(0, 250), limit=st.integers(1, 100))
def test_paging_either_way_gives_every_item_once_in_order(count: int, limit: int) -> None:
    items = [{"id": f"it_{n}"} for n in range(count)]
    forward: list[dict[str, str]] = []
    query: dict[str, str] = {"limit": str(limit)}
    while True:
        page = paged(query, "/v1/things", items)
        assert len(page["data"]) <= limit
        forward += page["data"]
        if not page["has_more"]:
            break
        query = {"limit": str(limit), "starting_after": page["data"][-1]["id"]}
    assert forward == items
    if not items:
        return
    backward = [items[-1]]
    query = {"limit": str(limit), "ending_before": items[-1]["id"]}
    while True:
        page = paged(query, "/v1/things", items)
        backward = page["data"] + backward
        if not page["has_more"]:
            break
        query = {"limit": str(limit), "ending_before": page["data"][0]["id"]}
    assert backward == items
