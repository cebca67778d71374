"""A usage event from a Kafka message in either CloudEvents content mode (Kafka protocol binding).

- *Structured* (what the SDK writes): the value is the whole event as JSON
  (meterstream/events.py); headers, if any, carry no ``ce_`` attribute (a ``content-type``
  header says ``application/cloudevents+json``, or ``application/json`` from older bindings).
- *Binary* (the default of several CloudEvents Kafka bindings): the attributes are headers
  (``ce_specversion``, ``ce_id``, ``ce_source``, ``ce_type``, ``ce_subject``, ``ce_time``), the
  ``content-type`` header is the data's media type (``application/json``; absent means JSON),
  and the value is the data alone: ``{"value": "12.5", "properties": {...}}``.

Both end in the same checks (:func:`meterstream.events.event_from_document`), so both follow
the same rules. What fits neither is refused with :class:`HeaderError` naming the header: a
message with ``ce_`` headers *and* a structured content type (which one is the event?), a header
twice (which one counts?), a header value that is absent or not UTF-8, or a content type that is
not JSON.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from meterstream.errors import HeaderError, InvalidEventError
from meterstream.events import UsageEvent, decode_event, event_from_document
from meterstream.meters import Catalogue

# A Kafka header as the clients give it: its name, and its value (Kafka allows none).
Header = tuple[str, bytes | None]
Headers = Sequence[Header]

_PREFIX = "ce_"
_CONTENT_TYPE = "content-type"
_STRUCTURED = "application/cloudevents"
# Binary-mode attributes that map onto our event; other ce_ headers are extensions (the
# binding's ce_partitionkey, say) and are let through unread.
_ATTRIBUTES = ("specversion", "id", "source", "type", "subject", "time")
# In binary mode the data's media type is the content-type header; a ce_ copy of it, or of the
# data itself, would be a second answer to the same question.
_FORBIDDEN = ("datacontenttype", "data", "data_base64")
_JSON_TYPES = ("application/json", "text/json")


def decode_message(
    value: bytes, headers: Headers, catalogue: Catalogue | None = None
) -> UsageEvent:
    """The usage event of one Kafka message, in whichever content mode it was written.

    Raises :class:`HeaderError` (headers at fault) or InvalidEventError (the event at fault),
    each naming the field or header and the reason.
    """
    named = _by_name(headers)
    content_type = named.get(_CONTENT_TYPE)
    attributes = {name[len(_PREFIX) :]: text for name, text in named.items() if _is_ce(name)}
    if is_structured(content_type, attributes, _PREFIX) or not attributes:
        # Without ce_ headers the value must be the whole event, whatever the content type
        # says: the SDK's older Kafka binding (cloudevents.v1.kafka) labels structured events
        # application/json, as the SDK's own reader accepts.
        return decode_event(value, catalogue)
    document = binary_document(attributes, content_type, value, _PREFIX)
    return event_from_document(document, field_prefix=_PREFIX, catalogue=catalogue)


def is_structured(content_type: str | None, attributes: Mapping[str, str], prefix: str) -> bool:
    """Whether ``content_type`` says structured mode (an event, or an HTTP batch). Raises
    HeaderError when ``attributes`` (binary-mode headers, named without ``prefix``) are set
    too: which one is the event? The rule of both bindings, Kafka's and HTTP's."""
    structured = content_type is not None and _media_type(content_type).startswith(_STRUCTURED)
    if structured and attributes:
        names = ", ".join(prefix + name for name in sorted(attributes))
        raise HeaderError(
            "headers",
            f"both content modes: content-type {content_type!r:.80} says structured, but "
            f"{prefix} headers are set ({names[:200]}); send one or the other",
        )
    return structured


def binary_document(
    attributes: Mapping[str, str], content_type: str | None, value: bytes, prefix: str
) -> dict[str, Any]:
    """The CloudEvents document of a binary-mode event: ``attributes`` (its ``ce`` headers as
    the transport's binding decoded them, named without ``prefix``) with its data, ``value``.

    The one set of binary-mode rules for Kafka (``ce_`` headers, here) and HTTP (``ce-``
    headers, ingest/http/body.py): what one refuses the other refuses. Attributes not sent are
    None in the document. Raises HeaderError naming the header (``prefix`` + attribute, or
    content-type) or InvalidEventError (``data``).
    """
    for name in _FORBIDDEN:
        if name in attributes:
            raise HeaderError(
                f"{prefix}{name}",
                "not allowed in binary mode: the content-type header is the data's type and "
                "the body is the data",
            )
    if content_type is not None and _media_type(content_type) not in _JSON_TYPES:
        raise HeaderError(
            _CONTENT_TYPE,
            f"must be application/json in binary mode (the data is JSON), got {content_type!r:.80}",
        )
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidEventError("data", f"not JSON: {exc}") from None
    if isinstance(data, dict) and "specversion" in data:
        raise HeaderError(
            "headers",
            f"both content modes: {prefix} headers are set, but the body is a whole CloudEvent; "
            f"send the event structured without {prefix} headers, or only its data in binary mode",
        )
    document: dict[str, Any] = {name: attributes.get(name) for name in _ATTRIBUTES}
    document["data"] = data
    return document


def _by_name(headers: Headers) -> dict[str, str]:
    """The headers by lower-case name, decoded; HeaderError on a name twice or a value that is
    absent or not UTF-8. Kafka names are case-sensitive, but ``ce_ID`` beside ``ce_id`` would be
    two answers to one question."""
    named: dict[str, str] = {}
    for name, raw in headers:
        key = name.lower()
        if not (_is_ce(key) or key == _CONTENT_TYPE):
            continue  # tracing and the like: not ours to judge
        if key in named:
            raise HeaderError(key, "appears more than once; which one counts is unknowable")
        if raw is None:
            raise HeaderError(key, "has no value")
        try:
            named[key] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise HeaderError(key, f"is not UTF-8: {raw[:40]!r}") from None
    return named


def _is_ce(name: str) -> bool:
    return name.startswith(_PREFIX)


def _media_type(content_type: str) -> str:
    """``application/json`` of ``Application/JSON; charset=utf-8``."""
    return content_type.split(";", 1)[0].strip().lower()


def encode_headers(headers: Headers) -> bytes | None:
    """``headers`` as bytes a database column keeps (JSON pairs, values in base64), or None
    when there are none; :func:`decode_headers` gives them back in order, duplicates kept."""
    if not headers:
        return None
    # Names in base64 as well: a name a client decoded leniently may not be valid UTF-8.
    pairs = [
        [_b64(name.encode("utf-8", "surrogatepass")), None if value is None else _b64(value)]
        for name, value in headers
    ]
    return orjson.dumps(pairs)


def decode_headers(stored: bytes | None) -> tuple[Header, ...]:
    """The headers :func:`encode_headers` stored."""
    if stored is None:
        return ()
    return tuple(
        (
            base64.b64decode(name).decode("utf-8", "surrogatepass"),
            None if value is None else base64.b64decode(value),
        )
        for name, value in orjson.loads(stored)
    )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
