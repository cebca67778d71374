"""The body of ``POST /v1/events`` in its three CloudEvents forms, checked by the SDK's rules.

- structured: ``application/cloudevents+json``, one event object;
- batch: ``application/cloudevents-batch+json``, an array of event objects;
- binary: the attributes in ``ce-*`` headers, the body is the event's ``data``.

Each event's JSON readings (``data.value``, ``time``) are the workers' (``meterstream.events``);
then it is checked and encoded by the SDK's rules (``ingest.rules.encode_checked``): the same
code, so an event the API takes is one ``record()`` would take and the workers will count.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import orjson

from ingest.rules import EventRules, encode_checked
from meterstream.content_modes import binary_document, is_structured
from meterstream.errors import HeaderError, InvalidEventError
from meterstream.events import SPECVERSION, parse_json_time, parse_json_value

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
# The SDK's field names, as the API's clients know them: the CloudEvents attributes.
_CLOUDEVENTS_FIELD = {
    "customer": "subject",
    "meter": "type",
    "value": "data.value",
    "timestamp": "time",
    "event_id": "id",
    "properties": "data.properties",
}
_HTTP_PREFIX = "ce-"
# What a header value may hold before percent-decoding (the HTTP binding encodes the rest).
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


@dataclass(frozen=True, slots=True)
class Problem:
    """Why the event at ``index`` of the request (0 for a single event) was refused."""

    index: int
    field: str
    reason: str


class BodyRefusedError(Exception):
    """The body as a whole cannot be read: answered with ``status`` and ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header, without parameters, lower case."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def documents(
    content_type: str | None,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    body: bytes,
    max_events: int,
) -> list[Any]:
    """The event documents of a request. Raises BodyRefusedError (400, 413 or 415).

    ``headers`` are the request's, every one of them (a Starlette ``Headers`` keeps a header
    sent twice): binary mode refuses a ``ce-`` header twice, as the Kafka binding does.
    """
    kind = media_type(content_type)
    try:
        attributes = _ce_headers(headers)
        structured = is_structured(content_type, attributes, _HTTP_PREFIX)
    except HeaderError as exc:
        raise BodyRefusedError(400, f"header {exc.field}: {exc.reason}") from None
    if structured and kind == BATCH:
        batch = _json(body)
        if not isinstance(batch, list):
            raise BodyRefusedError(400, f"{BATCH} must be a JSON array of events")
        if not batch:
            raise BodyRefusedError(400, f"the batch is empty: send 1 to {max_events} events")
        if len(batch) > max_events:
            raise BodyRefusedError(
                413, f"the batch holds {len(batch)} events; at most {max_events} per request"
            )
        return batch
    if structured and kind == STRUCTURED:
        return [_json(body)]
    if "specversion" in attributes:
        return [_binary_document(content_type, attributes, body)]
    raise BodyRefusedError(
        415,
        f"Content-Type {kind or 'missing'!r}: send {STRUCTURED} (one event), {BATCH} (an "
        "array), or an event in binary mode (ce-* headers and Content-Type application/json)",
    )


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BodyRefusedError(400, f"the body is not JSON: {exc}") from None


def _ce_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """The ``ce-`` headers by attribute name, percent-decoded as the HTTP binding says.

    Refused (HeaderError): a header twice (which one counts?); a value with characters the
    binding says must be percent-encoded (servers read raw bytes as Latin-1: ``é`` sent raw
    would arrive as ``Ã©``, another customer); a percent-encoding that is not UTF-8 (decoded
    leniently, ``a%FF`` and ``a%FE`` would both be ``a\ufffd``: two events, one dedup key).
    """
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    found: dict[str, str] = {}
    for raw_name, raw_value in pairs:
        name = raw_name.lower()
        if not name.startswith(_HTTP_PREFIX):
            continue
        attribute = name[len(_HTTP_PREFIX) :]
        if attribute in found:
            raise HeaderError(name, "appears more than once; which one counts is unknowable")
        if not _PRINTABLE_ASCII.fullmatch(raw_value):
            raise HeaderError(
                name,
                "holds characters outside printable ASCII: percent-encode them as UTF-8 "
                "(the CloudEvents HTTP binding), e.g. é as %C3%A9",
            )
        try:
            found[attribute] = unquote(raw_value, errors="strict")
        except UnicodeDecodeError:
            raise HeaderError(
                name, f"its percent-encoding is not UTF-8: {raw_value!r:.80}"
            ) from None
    return found


def _binary_document(
    content_type: str | None, attributes: dict[str, str], body: bytes
) -> dict[str, Any]:
    """The Kafka binding's binary-mode rules (meterstream.content_modes), the same code."""
    try:
        return binary_document(attributes, content_type, body, _HTTP_PREFIX)
    except HeaderError as exc:
        status = 415 if exc.field == "content-type" else 400
        raise BodyRefusedError(
            status,
            f"binary mode: header {exc.field}: {exc.reason}; the data must be JSON"
            if status == 415
            else f"binary mode: header {exc.field}: {exc.reason}",
        ) from None
    except InvalidEventError as exc:
        raise BodyRefusedError(
            400, f"binary mode: the body is not the event's data: {exc}"
        ) from None


def _checked(doc: Any, rules: EventRules, source: str, now: datetime) -> tuple[str, bytes]:
    """(customer, CloudEvents JSON) of one document, or InvalidEventError. The JSON-specific
    readings (specversion, data, data.value, time) are the workers' own; every rule after them
    is the SDK's (encode_checked)."""
    if not isinstance(doc, dict):
        raise InvalidEventError("event", "expected a CloudEvents JSON object")
    get = doc.get
    if get("specversion") != SPECVERSION:
        raise InvalidEventError("specversion", f"expected '1.0', got {get('specversion')!r:.40}")
    data = get("data")
    if not isinstance(data, dict):
        raise InvalidEventError("data", "expected an object with 'value' and 'properties'")
    if get("source") != source:
        raise InvalidEventError(
            "source", f"this API key sends events of source {source!r}, not {get('source')!r:.80}"
        )
    raw_time = get("time")
    meter_name = get("type")
    meter = rules.catalogue.meters.get(meter_name) if type(meter_name) is str else None
    properties = data.get("properties")
    if meter is None:
        value_key = "value"
    else:
        value_key = meter.value_key
        if meter.dimensions and (properties is None or isinstance(properties, dict)):
            properties = _lift_dimensions(meter.dimensions, data, properties)
    payload = encode_checked(
        rules,
        source=source,
        event_id=get("id"),
        customer=get("subject"),
        meter=meter_name,
        value=parse_json_value(data.get(value_key), f"data.{value_key}"),
        # An event without time is stamped when received, as record() does.
        event_time=None if raw_time is None else parse_json_time(raw_time),
        properties=properties,
        now=now,
    )
    customer: str = doc["subject"]  # checked by encode_checked: a non-empty string
    return customer, payload


def _lift_dimensions(
    dimensions: tuple[str, ...], data: dict[str, Any], properties: dict[str, Any] | None
) -> dict[str, Any] | None:
    """An OpenMeter-shaped event carries its dimensions as data fields; the message keeps them
    as properties, where the workers read them first.

    Not meterstream.dimensions.read_combination, though it reads the same fields first: that
    one also returns the catalogue's defaults (the message would then carry them as
    properties) and refuses a data field that is neither a string nor an integer, which this
    leaves out, so the event counts under the dimension's default if it has one."""
    lifted = {
        name: str(data[name])
        for name in dimensions
        if type(data.get(name)) in (str, int) and name not in (properties or {})
    }
    return {**(properties or {}), **lifted} if lifted else properties


def admit(
    docs: list[Any], rules: EventRules, source: str, now: datetime | None = None
) -> tuple[list[tuple[bytes, bytes]], list[Problem]]:
    """Each document as a Kafka message (key = customer, value = CloudEvents JSON), or the
    problems of those that break a rule. The caller produces nothing unless problems is empty.

    ``source`` is the API key's: an event naming another is refused, so one producer cannot
    take another's deduplication keys. An event without ``time`` is stamped ``now``.
    """
    now = now or datetime.now(UTC)
    messages: list[tuple[bytes, bytes]] = []
    problems: list[Problem] = []
    for index, doc in enumerate(docs):
        try:
            customer, payload = _checked(doc, rules, source, now)
        except InvalidEventError as exc:
            head, dot, rest = exc.field.partition(".")
            field = _CLOUDEVENTS_FIELD.get(head, head) + dot + rest
            problems.append(Problem(index, field, exc.reason))
            continue
        # key = customer id so one customer's events stay ordered in one partition.
        messages.append((customer.encode(), payload))
    return messages, problems
