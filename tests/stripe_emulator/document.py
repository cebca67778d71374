"""What Stripe's OpenAPI document says our endpoints answer, as our own test data.

Transcribed by hand (our words and layout; nothing copied in bulk) from the subset of
stripe/openapi ``openapi/spec3.json`` and ``openapi/spec3.sdk.json`` at 2026-07-29.dahlia
(commit af5309ca of that repository) that the emulator serves: the ``billing.meter``,
``billing.meter_event``, ``billing.meter_event_adjustment`` and ``billing.meter_event_summary``
objects, the list object with its ``url`` patterns, the v1 ``error`` object (``api_errors``:
``type`` enum; ``code`` from the document's enum), the request maxLengths the emulator enforces
(routes.py) and the operations' success statuses. ``customer`` is only the few fields the
emulator gives, with the types the document uses for them; its required list was not read
from the document. Those files carry no ``/v2`` paths or ``v2.*`` schemas at this version:
the v2 shapes below (session, meter event, the stream's empty 200 answer,
``{"error": {type, code, message}}``) follow Stripe's v2 API reference and stripe-python's v2
types and error mapping.

Schemas use a small JSON-Schema dialect (``type``, ``nullable``, ``enum``, ``maxLength``,
``pattern``, ``required``, ``properties``, ``additionalProperties``, ``items``, ``ref``),
checked by :func:`problems`. As in OpenAPI, properties the document does not name are
allowed; everything it does name is checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

Schema = dict[str, Any]

_ID = {"type": "string", "maxLength": 5000}
_TIME = {"type": "integer"}  # format unix-time
_RFC3339 = {
    "type": "string",
    "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$",
}
_BOOL = {"type": "boolean"}


def _const(value: str) -> Schema:
    return {"type": "string", "enum": [value]}


def _object(required: list[str], **properties: Schema) -> Schema:
    return {"type": "object", "required": required, "properties": properties}


def _list_of(ref: str, url_pattern: str) -> Schema:
    return _object(
        ["data", "has_more", "object", "url"],
        data={"type": "array", "items": {"ref": ref}},
        has_more=_BOOL,
        object=_const("list"),
        url={"type": "string", "maxLength": 5000, "pattern": url_pattern},
    )


# api_errors.code: the entries of the document's enum (spec3.sdk.json) an emulator of the
# meter API can have a use for. Then the billing meter error-report codes
# (reason.error_types[].code; stripe-python's enum, generated from Stripe's spec, listed in
# /work/shared/reference/stripe-meters.md section 3): the emulator answers them for the same
# failures when it checks an event at once. Outside api_errors' enum: see the report.
API_ERROR_CODES = frozenset(
    {
        "api_key_expired",
        "idempotency_key_in_use",
        "lock_timeout",
        "parameter_invalid_empty",
        "parameter_invalid_integer",
        "parameter_invalid_string_blank",
        "parameter_invalid_string_empty",
        "parameter_missing",
        "parameter_unknown",
        "parameters_exclusive",
        "rate_limit",
        "resource_already_exists",
        "resource_missing",
    }
)
METER_ERROR_REPORT_CODES = frozenset(
    {
        "archived_meter",
        "meter_event_customer_not_found",
        "meter_event_invalid_value",
        "meter_event_no_customer_defined",
        "meter_event_value_too_many_digits",
        "no_meter",
        "timestamp_in_future",
        "timestamp_too_far_in_past",
    }
)

SCHEMAS: dict[str, Schema] = {
    "billing.meter": _object(
        [
            "created",
            "customer_mapping",
            "default_aggregation",
            "display_name",
            "event_name",
            "id",
            "livemode",
            "object",
            "status",
            "status_transitions",
            "updated",
            "value_settings",
        ],
        created=_TIME,
        customer_mapping=_object(
            ["event_payload_key", "type"],
            event_payload_key={"type": "string", "maxLength": 5000},
            type={"type": "string", "enum": ["by_id"]},
        ),
        default_aggregation=_object(
            ["formula"], formula={"type": "string", "enum": ["count", "last", "sum"]}
        ),
        display_name={"type": "string", "maxLength": 5000},
        event_name={"type": "string", "maxLength": 5000},
        event_time_window={"type": "string", "enum": ["day", "hour"], "nullable": True},
        id=_ID,
        livemode=_BOOL,
        object=_const("billing.meter"),
        status={"type": "string", "enum": ["active", "inactive"]},
        status_transitions=_object([], deactivated_at={**_TIME, "nullable": True}),
        updated=_TIME,
        value_settings=_object(
            ["event_payload_key"], event_payload_key={"type": "string", "maxLength": 5000}
        ),
    ),
    "billing.meter_event": _object(
        ["created", "event_name", "identifier", "livemode", "object", "payload", "timestamp"],
        created=_TIME,
        event_name={"type": "string", "maxLength": 100},
        identifier={"type": "string", "maxLength": 5000},
        livemode=_BOOL,
        object=_const("billing.meter_event"),
        payload={
            "type": "object",
            "additionalProperties": {"type": "string", "maxLength": 100},
        },
        timestamp=_TIME,
    ),
    "billing.meter_event_adjustment": _object(
        ["event_name", "livemode", "object", "status", "type"],
        cancel={
            **_object([], identifier={"type": "string", "maxLength": 100, "nullable": True}),
            "nullable": True,
        },
        event_name={"type": "string", "maxLength": 100},
        livemode=_BOOL,
        object=_const("billing.meter_event_adjustment"),
        status={"type": "string", "enum": ["complete", "pending"]},
        type={"type": "string", "enum": ["cancel"]},
    ),
    "billing.meter_event_summary": _object(
        ["aggregated_value", "end_time", "id", "livemode", "meter", "object", "start_time"],
        aggregated_value={"type": "number"},
        end_time=_TIME,
        id=_ID,
        livemode=_BOOL,
        meter={"type": "string", "maxLength": 5000},
        object=_const("billing.meter_event_summary"),
        start_time=_TIME,
    ),
    "customer": _object(
        ["created", "id", "livemode", "object"],
        created=_TIME,
        email={"type": "string", "maxLength": 5000, "nullable": True},
        id=_ID,
        livemode=_BOOL,
        metadata={"type": "object", "additionalProperties": {"type": "string", "maxLength": 500}},
        name={"type": "string", "maxLength": 5000, "nullable": True},
        object=_const("customer"),
    ),
    "error": _object(
        ["error"],
        error=_object(
            ["type"],
            code={"type": "string", "enum": sorted(API_ERROR_CODES | METER_ERROR_REPORT_CODES)},
            message={"type": "string", "maxLength": 40000},
            param={"type": "string", "maxLength": 5000},
            type={
                "type": "string",
                "enum": ["api_error", "card_error", "idempotency_error", "invalid_request_error"],
            },
        ),
    ),
    "v2.billing.meter_event_session": _object(
        ["authentication_token", "created", "expires_at", "id", "livemode", "object"],
        authentication_token={"type": "string"},
        created=_RFC3339,
        expires_at=_RFC3339,
        id={"type": "string"},
        livemode=_BOOL,
        object=_const("v2.billing.meter_event_session"),
    ),
    "v2.billing.meter_event": _object(
        ["created", "event_name", "identifier", "livemode", "object", "payload", "timestamp"],
        created=_RFC3339,
        event_name={"type": "string", "maxLength": 100},
        identifier={"type": "string"},
        livemode=_BOOL,
        object=_const("v2.billing.meter_event"),
        payload={"type": "object", "additionalProperties": {"type": "string"}},
        timestamp=_RFC3339,
    ),
    "v2.empty": {"type": "object", "properties": {}, "additionalProperties": False},
    "v2.error": _object(
        ["error"],
        error=_object(
            ["type", "message"],
            type={"type": "string"},
            code={"type": "string"},
            message={"type": "string"},
        ),
    ),
}
SCHEMAS["billing.meter.list"] = _list_of("billing.meter", "^/v1/billing/meters")
SCHEMAS["billing.meter_event_summary.list"] = _list_of(
    "billing.meter_event_summary", "^/v1/billing/meters/[^/]+/event_summaries"
)
SCHEMAS["customer.list"] = _list_of("customer", "^/v1/customers")


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # a regular expression over the request path
    success: int
    schema: str
    error_schema: str = "error"


OPERATIONS: tuple[Operation, ...] = (
    Operation("GET", r"/v1/billing/meters", 200, "billing.meter.list"),
    Operation("POST", r"/v1/billing/meters", 200, "billing.meter"),
    Operation("GET", r"/v1/billing/meters/[^/]+", 200, "billing.meter"),
    Operation("POST", r"/v1/billing/meters/[^/]+", 200, "billing.meter"),
    Operation("POST", r"/v1/billing/meters/[^/]+/(de|re)activate", 200, "billing.meter"),
    Operation(
        "GET", r"/v1/billing/meters/[^/]+/event_summaries", 200, "billing.meter_event_summary.list"
    ),
    Operation("POST", r"/v1/billing/meter_events", 200, "billing.meter_event"),
    Operation(
        "POST", r"/v1/billing/meter_event_adjustments", 200, "billing.meter_event_adjustment"
    ),
    Operation("GET", r"/v1/customers", 200, "customer.list"),
    Operation("POST", r"/v1/customers", 200, "customer"),
    Operation("GET", r"/v1/customers/[^/]+", 200, "customer"),
    Operation(
        "POST",
        r"/v2/billing/meter_event_session",
        200,
        "v2.billing.meter_event_session",
        "v2.error",
    ),
    Operation("POST", r"/v2/billing/meter_event_stream", 200, "v2.empty", "v2.error"),
    Operation("POST", r"/v2/billing/meter_events", 200, "v2.billing.meter_event", "v2.error"),
)


def operation(method: str, path: str) -> Operation:
    found = [op for op in OPERATIONS if op.method == method and re.fullmatch(op.path, path)]
    if not found:
        raise LookupError(f"{method} {path} is not an operation the document lists")
    return found[0]


def answer_problems(method: str, path: str, status: int, body: object) -> list[str]:
    """Where an answer (``status``, parsed JSON ``body``) departs from the document."""
    op = operation(method, path)
    if status == op.success:
        return problems(body, SCHEMAS[op.schema], op.schema)
    if 400 <= status <= 599:
        return problems(body, SCHEMAS[op.error_schema], op.error_schema)
    return [f"{method} {path}: status {status} is not in the document (it answers {op.success})"]


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def problems(value: object, schema: Schema, where: str) -> list[str]:
    """Every way ``value`` breaks ``schema`` (empty: it conforms)."""
    if "ref" in schema:
        return problems(value, SCHEMAS[schema["ref"]], where)
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: null, not nullable"]
    wanted = schema.get("type")
    if wanted is not None:
        is_bool = isinstance(value, bool)
        if not isinstance(value, _TYPES[wanted]) or (is_bool and wanted != "boolean"):
            return [f"{where}: {type(value).__name__}, not {wanted}"]
    found: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)):
            found.append(f"{where}: longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            found.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list):
        for index, item in enumerate(value):
            found += problems(item, schema.get("items", {}), f"{where}[{index}]")
    if isinstance(value, dict):
        found += _object_problems(value, schema, where)
    return found


def _object_problems(value: dict[str, Any], schema: Schema, where: str) -> list[str]:
    found = [f"{where}: missing {name}" for name in schema.get("required", ()) if name not in value]
    properties: dict[str, Schema] = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            found += problems(item, properties[name], f"{where}.{name}")
        elif extra is False:
            found.append(f"{where}: {name} is not in the document")
        elif isinstance(extra, dict):
            found += problems(item, extra, f"{where}.{name}")
    return found
