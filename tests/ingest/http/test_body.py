"""The body of POST /v1/events, parsed and admitted without a server: hostile input costs only
the events it is in, each with a field and a reason; nothing else raises."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.http.body import BATCH, STRUCTURED, BodyRefusedError, admit, documents
from ingest.rules import EventRules
from meterstream.cli import missing_extra_message
from meterstream.events import decode_event
from meterstream.meters import load_catalogue
from tests.conftest import EXAMPLE_METERS
from tests.ingest.http.server import SOURCE, event

RULES = EventRules(load_catalogue(EXAMPLE_METERS), horizon_days=35, future_tolerance_s=600)
NOW = datetime.now(UTC)

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
_attribute = st.sampled_from(["specversion", "id", "source", "type", "subject", "time", "data"])


@st.composite
def _hostile_event(draw: st.DrawFn) -> Any:
    """A valid event with some attributes replaced by anything JSON holds, or anything at all."""
    if draw(st.booleans()):
        return draw(_json)
    doc: dict[str, Any] = event(draw(st.text(min_size=1, max_size=20)), meter="tokens")
    for name in draw(st.lists(_attribute, max_size=3)):
        doc[name] = draw(_json)
    if draw(st.booleans()):
        doc["data"] = {"value": draw(_json), "properties": draw(_json)}
    return doc


@settings(max_examples=300, deadline=None)
@given(st.lists(_hostile_event(), min_size=1, max_size=20))
def test_each_hostile_event_is_refused_alone_with_its_index_field_and_reason(
    docs: list[Any],
) -> None:
    body = orjson.dumps(docs)
    messages, problems = admit(documents(BATCH, {}, body, 1000), RULES, SOURCE, NOW)
    assert len(messages) + len(problems) == len(docs)
    assert len({p.index for p in problems}) == len(problems)
    for problem in problems:
        assert problem.field and problem.reason
    for _key, payload in messages:  # what is taken decodes as the workers will read it
        assert decode_event(payload).source == SOURCE


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([STRUCTURED, BATCH, "application/json", ""]))
def test_any_bytes_are_read_or_refused_with_a_status(body: bytes, content_type: str) -> None:
    headers = {"ce-specversion": "1.0"} if content_type == "application/json" else {}
    try:
        docs = documents(content_type, headers, body, 1000)
    except BodyRefusedError as refused:
        assert refused.status in (400, 413, 415) and refused.message
        return
    admit(docs, RULES, SOURCE, NOW)


def test_an_event_without_time_is_stamped_when_received() -> None:
    doc = event("no-time")
    del doc["time"]
    messages, problems = admit([doc], RULES, SOURCE, NOW)
    assert problems == []
    assert decode_event(messages[0][1]).event_time == NOW


@pytest.mark.parametrize("module", ["fastapi", "uvicorn", "starlette"])
def test_serve_without_the_http_extra_names_it(module: str) -> None:
    message = missing_extra_message(ModuleNotFoundError(f"No module named {module!r}", name=module))
    assert message is not None and "meterstream[http]" in message


def _binary(**headers: str) -> dict[str, str]:
    base = {
        "ce-specversion": "1.0",
        "ce-id": "b-1",
        "ce-source": SOURCE,
        "ce-type": "api_calls",
        "ce-subject": "c",
    }
    return {**base, **{name.replace("_", "-"): value for name, value in headers.items()}}


def test_binary_ids_whose_percent_encoding_is_not_utf8_are_refused_not_merged() -> None:
    # Decoded leniently, both ids were 'a\ufffd': two events, one dedup key, one counted.
    for bad in ("a%FF", "a%FE"):
        with pytest.raises(BodyRefusedError) as refused:
            documents("application/json", _binary(ce_id=bad), b'{"value": "1"}', 1000)
        assert refused.value.status == 400 and "ce-id" in refused.value.message


def test_a_raw_non_ascii_binary_header_is_refused_not_read_as_latin1() -> None:
    # Servers read header bytes as Latin-1: a raw 'é' arrives as 'Ã©', another customer.
    with pytest.raises(BodyRefusedError) as refused:
        documents("application/json", _binary(ce_subject="cust Ã©"), b'{"value": "1"}', 1000)
    assert refused.value.status == 400 and "ce-subject" in refused.value.message
    docs = documents("application/json", _binary(ce_subject="cust%20%C3%A9"), b'{"value": "1"}', 9)
    assert docs[0]["subject"] == "cust é"


@pytest.mark.parametrize(
    ("content_type", "headers", "body", "status", "words"),
    [
        # The Kafka binding's rules (meterstream.content_modes), which HTTP used to skip.
        ("application/json", [("ce-id", "one"), ("ce-id", "two")], b'{"value": "1"}', 400, "ce-id"),
        ("application/json", [("ce-datacontenttype", "text/plain")], b'{"value": "1"}', 400, "ce-"),
        ("application/json", [], orjson.dumps(event("whole")), 400, "both content modes"),
        (STRUCTURED, [("ce-id", "x")], orjson.dumps(event("x")), 400, "both content modes"),
        ("application/vnd.custom+json", [], b'{"value": "1"}', 415, "must be JSON"),
    ],
)
def test_http_binary_mode_follows_the_kafka_bindings_rules(
    content_type: str, headers: list[tuple[str, str]], body: bytes, status: int, words: str
) -> None:
    pairs = [*_binary().items(), *headers] if content_type != STRUCTURED else headers
    with pytest.raises(BodyRefusedError) as refused:
        documents(content_type, pairs, body, 1000)
    assert refused.value.status == status and words in refused.value.message


def test_binary_mode_without_content_type_is_json_as_on_kafka() -> None:
    docs = documents(None, _binary(), b'{"value": "2"}', 1000)
    messages, problems = admit(docs, RULES, SOURCE, NOW)
    assert problems == [] and decode_event(messages[0][1]).value == 2
