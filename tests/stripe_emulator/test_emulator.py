"""The Stripe emulator, driven by the real stripe SDK over HTTP: Stripe's rules and faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import stripe

from stripe_emulator import Emulator, ManualClock, run_stripe_emulator

NOW_S = 1_795_500_000  # 2026-11-24T06:00:00Z, minute-aligned
HOUR_S = 3_600
DAY_S = 86_400


@dataclass
class Account:
    emulator: Emulator
    clock: ManualClock
    customer_id: str
    meter_id: str
    make_client: Callable[..., stripe.StripeClient]

    @property
    def client(self) -> stripe.StripeClient:
        return self.make_client()

    def event(self, value: str = "1", **overrides: Any) -> Any:
        """v1 meter event params for the default customer and meter."""
        params: dict[str, Any] = {
            "event_name": "api_calls",
            "payload": {"stripe_customer_id": self.customer_id, "value": value},
            "timestamp": NOW_S,
        }
        params.update(overrides)
        return params


def _client(url: str, api_key: str = "sk_test_x", retries: int = 0) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key, base_addresses={"api": url, "meter_events": url}, max_network_retries=retries
    )


@pytest.fixture
def account() -> Iterator[Account]:
    """A running emulator, frozen at NOW_S, with one customer and one `sum` meter."""
    clock = ManualClock(NOW_S)
    with run_stripe_emulator(rate_limit_per_s=None, clock=clock) as emulator:

        def make_client(api_key: str = "sk_test_x", retries: int = 0) -> stripe.StripeClient:
            return _client(emulator.url, api_key, retries)

        client = make_client()
        customer = client.v1.customers.create(params={"name": "Acme"})
        meter = client.v1.billing.meters.create(
            params={
                "display_name": "API calls",
                "event_name": "api_calls",
                "default_aggregation": {"formula": "sum"},
                "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
                "value_settings": {"event_payload_key": "value"},
            }
        )
        yield Account(emulator, clock, customer.id, meter.id, make_client)


def _control(url: str, method: str, path: str, body: object | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)  # noqa: S310
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return json.loads(response.read())


def _rejection(account: Account, **params: Any) -> stripe.InvalidRequestError:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        account.client.v1.billing.meter_events.create(params=account.event(**params))
    assert caught.value.http_status == 400
    return caught.value


# -- v1 meter events and their rules ---------------------------------------------------------


def test_meter_event_is_answered_like_stripe_and_recorded(account: Account) -> None:
    answer = account.client.v1.billing.meter_events.create(
        params=account.event("42", identifier="evt-1")
    )

    assert answer.object == "billing.meter_event"
    assert (answer.identifier, answer.timestamp, answer.livemode) == ("evt-1", NOW_S, False)
    assert answer.payload["value"] == "42"
    assert account.emulator.state.totals() == {("api_calls", account.customer_id): 42}
    listed = _control(account.emulator.url, "GET", "/_emulator/events")["data"]
    assert [(e["identifier"], e["value"], e["customer"]) for e in listed] == [
        ("evt-1", "42", account.customer_id)
    ]


def test_duplicate_identifier_is_rejected_and_not_retried(account: Account) -> None:
    client = account.make_client(retries=2)
    client.v1.billing.meter_events.create(params=account.event(identifier="evt-dup"))

    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.billing.meter_events.create(params=account.event(identifier="evt-dup"))

    assert "An event already exists with identifier evt-dup." in str(caught.value)
    assert caught.value.headers is not None
    assert caught.value.headers["stripe-should-retry"] == "false"
    assert len(account.emulator.state.events) == 1


def test_repeated_idempotency_key_replays_the_first_answer(account: Account) -> None:
    options: Any = {"idempotency_key": "key-1"}
    meter_events = account.client.v1.billing.meter_events
    first = meter_events.create(params=account.event(identifier="evt-k"), options=options)
    again = meter_events.create(params=account.event(identifier="evt-k"), options=options)

    assert again.last_response is not None
    assert again.last_response.headers["idempotent-replayed"] == "true"
    assert again.to_dict() == first.to_dict()
    assert len(account.emulator.state.events) == 1
    with pytest.raises(stripe.IdempotencyError, match="same parameters"):
        meter_events.create(params=account.event(identifier="evt-other"), options=options)


def test_timestamp_older_than_35_days_is_rejected(account: Account) -> None:
    error = _rejection(account, timestamp=NOW_S - 35 * DAY_S - 1)
    assert error.code == "timestamp_too_far_in_past"
    assert "within the past 35 calendar days" in str(error)
    account.client.v1.billing.meter_events.create(
        params=account.event(timestamp=NOW_S - 35 * DAY_S)
    )


def test_timestamp_more_than_5_minutes_ahead_is_rejected(account: Account) -> None:
    error = _rejection(account, timestamp=NOW_S + 301)
    assert error.code == "timestamp_in_future"
    account.client.v1.billing.meter_events.create(params=account.event(timestamp=NOW_S + 300))


@pytest.mark.parametrize("value", ["1.5", "1e3", "", "ten"])
def test_value_that_is_not_a_whole_number_is_rejected(account: Account, value: str) -> None:
    error = _rejection(account, payload={"stripe_customer_id": account.customer_id, "value": value})
    assert error.code == "meter_event_invalid_value"
    assert error.param == "payload[value]"


def test_value_with_more_than_15_digits_is_rejected(account: Account) -> None:
    error = _rejection(
        account, payload={"stripe_customer_id": account.customer_id, "value": "1234567890123456"}
    )
    assert error.code == "meter_event_value_too_many_digits"
    account.client.v1.billing.meter_events.create(params=account.event("-123456789012345"))
    assert account.emulator.state.totals()[("api_calls", account.customer_id)] == -123456789012345


def test_unknown_customer_is_rejected(account: Account) -> None:
    error = _rejection(account, payload={"stripe_customer_id": "cus_nobody", "value": "1"})
    assert error.code == "meter_event_customer_not_found"
    assert "cus_nobody" in str(error)


def test_events_need_an_active_meter(account: Account) -> None:
    assert _rejection(account, event_name="unknown_calls").code == "no_meter"

    meter = account.client.v1.billing.meters.deactivate(account.meter_id)
    assert meter.status == "inactive"
    assert _rejection(account).code == "archived_meter"

    account.client.v1.billing.meters.reactivate(account.meter_id)
    account.client.v1.billing.meter_events.create(params=account.event())
    assert len(account.emulator.state.events) == 1


@pytest.mark.parametrize("api_key", ["sk_live_x", "pk_test_x"])
def test_a_test_mode_secret_key_is_required(account: Account, api_key: str) -> None:
    with pytest.raises(stripe.AuthenticationError):
        account.make_client(api_key).v1.billing.meter_events.create(params=account.event())
    assert account.emulator.state.events == ()


# -- limits ----------------------------------------------------------------------------------


def test_account_rate_limit_answers_429_which_the_sdk_does_not_retry() -> None:
    frozen_rate_clock = ManualClock(0)
    with run_stripe_emulator(rate_limit_per_s=2, rate_clock=frozen_rate_clock) as emulator:
        client = _client(emulator.url, retries=2)
        client.v1.customers.create()
        client.v1.customers.create()

        with pytest.raises(stripe.RateLimitError) as caught:
            client.v1.customers.create()

        assert caught.value.http_status == 429
        body: Any = caught.value.json_body
        assert body["error"]["code"] == "rate_limit"
        assert caught.value.headers is not None
        assert "stripe-should-retry" not in caught.value.headers
        frozen_rate_clock.advance(1)
        assert len(client.v1.customers.list().data) == 2


def test_second_concurrent_call_for_one_customer_and_meter_answers_429(account: Account) -> None:
    other = account.client.v1.customers.create()
    account.emulator.faults.inject("hold", path_prefix="/v1/billing/meter_events")
    outcome: list[object] = []

    def first_call() -> None:
        outcome.append(account.client.v1.billing.meter_events.create(params=account.event("1")))

    worker = threading.Thread(target=first_call)
    worker.start()
    try:
        assert account.emulator.faults.wait_held(1, timeout_s=10)
        with pytest.raises(stripe.RateLimitError, match="one meter event call at a time"):
            account.client.v1.billing.meter_events.create(params=account.event("2"))
        other_payload = {"stripe_customer_id": other.id, "value": "5"}
        account.client.v1.billing.meter_events.create(params=account.event(payload=other_payload))
    finally:
        account.emulator.faults.release()
        worker.join(timeout=10)

    assert len(outcome) == 1
    assert account.emulator.state.totals() == {
        ("api_calls", account.customer_id): 1,
        ("api_calls", other.id): 5,
    }


# -- v2 sessions and streams -----------------------------------------------------------------


def _stream_events(account: Account, count: int, prefix: str = "s") -> Any:
    return [
        {
            "event_name": "api_calls",
            "payload": {"stripe_customer_id": account.customer_id, "value": "2"},
            "identifier": f"{prefix}-{n}",
            "timestamp": "2026-11-24T05:59:30.000Z",
        }
        for n in range(count)
    ]


def _stream_client(account: Account) -> stripe.StripeClient:
    session = account.client.v2.billing.meter_event_session.create()
    assert session.object == "v2.billing.meter_event_session"
    assert session.expires_at == "2026-11-24T06:15:00.000Z"
    return account.make_client(session.authentication_token)


def test_stream_accepts_100_events_and_rejects_101(account: Account) -> None:
    stream = _stream_client(account).v2.billing.meter_event_stream

    stream.create(params={"events": _stream_events(account, 100)})
    with pytest.raises(stripe.InvalidRequestError, match="at most 100"):
        stream.create(params={"events": _stream_events(account, 101, prefix="big")})

    assert account.emulator.state.totals() == {("api_calls", account.customer_id): 200}


def test_invalid_stream_events_are_kept_as_async_errors(account: Account) -> None:
    events = _stream_events(account, 3)
    events[1]["payload"] = {"stripe_customer_id": "cus_nobody", "value": "2"}
    events[2]["payload"] = {"stripe_customer_id": account.customer_id, "value": "2.5"}

    _stream_client(account).v2.billing.meter_event_stream.create(params={"events": events})

    assert [e.identifier for e in account.emulator.state.events] == ["s-0"]
    assert [(e.identifier, e.code) for e in account.emulator.state.async_errors] == [
        ("s-1", "meter_event_customer_not_found"),
        ("s-2", "meter_event_invalid_value"),
    ]


def test_expired_or_unknown_session_token_raises_session_expired(account: Account) -> None:
    client = _stream_client(account)
    account.clock.advance(15 * 60)

    with pytest.raises(stripe.TemporarySessionExpiredError):
        client.v2.billing.meter_event_stream.create(params={"events": _stream_events(account, 1)})
    with pytest.raises(stripe.TemporarySessionExpiredError):
        account.make_client("mes_tok_unknown").v2.billing.meter_event_stream.create(
            params={"events": _stream_events(account, 1)}
        )
    assert account.emulator.state.events == ()


# -- adjustments and summaries ---------------------------------------------------------------


def _summaries(
    account: Account, start: int, end: int, meter_id: str | None = None, **extra: Any
) -> list[tuple[int, object]]:
    """(start_time, aggregated_value) of every summary, following Stripe's pagination."""
    params: Any = {"customer": account.customer_id, "start_time": start, "end_time": end, **extra}
    meter = meter_id or account.meter_id
    page = account.client.v1.billing.meters.event_summaries.list(meter, params=params)
    return [(s.start_time, s.aggregated_value) for s in page.auto_paging_iter()]


def test_adjustment_cancels_an_event_only_within_24_hours(account: Account) -> None:
    meter_events = account.client.v1.billing.meter_events
    adjustments = account.client.v1.billing.meter_event_adjustments
    meter_events.create(params=account.event("7", identifier="keep"))
    meter_events.create(params=account.event("5", identifier="oops"))
    meter_events.create(params=account.event("3", identifier="late"))

    adjustment = adjustments.create(
        params={"event_name": "api_calls", "type": "cancel", "cancel": {"identifier": "oops"}}
    )
    assert adjustment.object == "billing.meter_event_adjustment"
    assert _summaries(account, NOW_S - 60, NOW_S + 60) == [(NOW_S - 60, 10)]

    account.clock.advance(DAY_S + 1)
    with pytest.raises(stripe.InvalidRequestError, match="more than 24 hours ago"):
        adjustments.create(
            params={"event_name": "api_calls", "type": "cancel", "cancel": {"identifier": "late"}}
        )
    assert account.emulator.state.totals() == {("api_calls", account.customer_id): 10}


def test_event_summaries_aggregate_with_the_meter_formula(account: Account) -> None:
    client = account.client
    for formula in ("count", "last"):
        client.v1.billing.meters.create(
            params={
                "display_name": formula,
                "event_name": formula,
                "default_aggregation": {"formula": formula},
            }
        )
    day = NOW_S - NOW_S % DAY_S
    for at, value in ((day + 10, "4"), (day + HOUR_S + 5, "9"), (day + 20, "6")):
        for name in ("api_calls", "count", "last"):
            client.v1.billing.meter_events.create(
                params=account.event(value, event_name=name, timestamp=at)
            )

    assert _summaries(account, day, day + DAY_S) == [(day, 19)]
    hourly = _summaries(account, day, day + 3 * HOUR_S, value_grouping_window="hour")
    assert hourly == [(day + 2 * HOUR_S, 0), (day + HOUR_S, 9), (day, 10)]
    by_formula = {
        m.event_name: _summaries(
            account.__class__(
                account.emulator, account.clock, account.customer_id, m.id, account.make_client
            ),
            day,
            day + DAY_S,
        )
        for m in client.v1.billing.meters.list().data
    }
    assert by_formula == {"api_calls": [(day, 19)], "count": [(day, 3)], "last": [(day, 9)]}


def test_event_summaries_need_minute_aligned_times(account: Account) -> None:
    with pytest.raises(stripe.InvalidRequestError, match="minute boundaries") as caught:
        _summaries(account, NOW_S + 30, NOW_S + 120)
    assert caught.value.param == "start_time"


# -- faults ----------------------------------------------------------------------------------


def test_injected_500_is_retried_by_the_sdk_and_recorded_once(account: Account) -> None:
    account.emulator.faults.inject("http_500", path_prefix="/v1/billing/meter_events")

    account.make_client(retries=2).v1.billing.meter_events.create(params=account.event("8"))

    assert account.emulator.faults.fired == (("http_500", "/v1/billing/meter_events"),)
    assert account.emulator.state.totals() == {("api_calls", account.customer_id): 8}


def test_injected_500_without_retries_raises_api_error(account: Account) -> None:
    account.emulator.faults.inject("http_500")
    with pytest.raises(stripe.APIError):
        account.client.v1.billing.meter_events.create(params=account.event())
    assert account.emulator.state.events == ()


def test_dropped_answer_is_replayed_to_the_sdk_retry_and_recorded_once(account: Account) -> None:
    account.emulator.faults.inject("drop_connection", path_prefix="/v1/billing/meter_events")

    answer = account.make_client(retries=2).v1.billing.meter_events.create(
        params=account.event("4", identifier="evt-drop")
    )

    assert answer.last_response is not None
    assert answer.last_response.headers["idempotent-replayed"] == "true"
    assert [e.identifier for e in account.emulator.state.events] == ["evt-drop"]


def test_dropped_answer_without_retries_raises_connection_error(account: Account) -> None:
    account.emulator.faults.inject("drop_connection")
    options: Any = {"idempotency_key": "key-drop"}
    meter_events = account.client.v1.billing.meter_events

    with pytest.raises(stripe.APIConnectionError):
        meter_events.create(params=account.event(identifier="evt-lost"), options=options)
    assert [e.identifier for e in account.emulator.state.events] == ["evt-lost"]

    meter_events.create(params=account.event(identifier="evt-lost"), options=options)
    assert len(account.emulator.state.events) == 1


def test_probability_faults_repeat_with_the_same_seed() -> None:
    def fired_pattern() -> list[str]:
        with run_stripe_emulator(rate_limit_per_s=None, fault_seed=7) as emulator:
            emulator.faults.inject("http_429", count=None, probability=0.5)
            client = _client(emulator.url)
            pattern = []
            for _ in range(12):
                try:
                    client.v1.customers.list()
                    pattern.append("ok")
                except stripe.RateLimitError:
                    pattern.append("429")
            return pattern

    first = fired_pattern()
    assert first == fired_pattern()
    assert {"ok", "429"} == set(first)


def test_control_endpoint_injects_faults_and_resets(account: Account) -> None:
    url = account.emulator.url
    _control(url, "POST", "/_emulator/faults", {"kind": "http_429", "count": 1})
    with pytest.raises(stripe.RateLimitError):
        account.client.v1.billing.meter_events.create(params=account.event())
    account.client.v1.billing.meter_events.create(params=account.event("3"))
    assert _control(url, "GET", "/_emulator/faults") == {"fired": {"http_429": 1}}
    totals = _control(url, "GET", "/_emulator/totals")["data"]
    assert totals == [{"event_name": "api_calls", "customer": account.customer_id, "total": "3"}]

    _control(url, "POST", "/_emulator/reset", {})

    assert _control(url, "GET", "/_emulator/events")["data"] == []
    assert account.client.v1.billing.meters.list().data == []
    assert account.client.v1.customers.list().data == []


def test_unknown_parameter_is_rejected(account: Account) -> None:
    error = _rejection(account, quantity="3")
    assert (error.code, error.param) == ("parameter_unknown", "quantity")


def test_v2_meter_event_is_validated_synchronously(account: Account) -> None:
    meter_events = account.client.v2.billing.meter_events
    params: Any = {
        "event_name": "api_calls",
        "payload": {"stripe_customer_id": account.customer_id, "value": "6"},
        "identifier": "v2-1",
        "timestamp": "2026-11-24T05:59:00.000Z",
    }

    answer = meter_events.create(params=params)
    with pytest.raises(stripe.InvalidRequestError, match="already exists"):
        meter_events.create(params=params)

    assert (answer.object, answer.identifier) == ("v2.billing.meter_event", "v2-1")
    assert account.emulator.state.events[0].timestamp == NOW_S - 60


def test_serve_forever_runs_until_interrupted() -> None:
    script = (
        # A background job of a non-interactive shell (a CI runner, say) starts with SIGINT
        # ignored, and Python then leaves it ignored: Ctrl-C is what this test is about.
        "import signal\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from stripe_emulator import serve_forever\n"
        "serve_forever('127.0.0.1', 0, on_ready=lambda e: print(e.url, flush=True))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    ) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            _client(url).v1.customers.create(params={"name": "Acme"})
            assert [c.name for c in _client(url).v1.customers.list().data] == ["Acme"]
        finally:
            process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0


# -- dimensions ------------------------------------------------------------------------------


def test_a_meter_with_dimensions_refuses_events_without_them_and_groups_summaries(
    account: Account,
) -> None:
    client = account.client
    meter = client.v1.billing.meters.create(
        params={
            "display_name": "tokens",
            "event_name": "tokens",
            "default_aggregation": {"formula": "sum"},
            "dimension_payload_keys": ["model", "region"],
        }
    )
    assert meter.dimension_payload_keys == ["model", "region"]
    refused = _rejection(
        account,
        event_name="tokens",
        payload={"stripe_customer_id": account.customer_id, "value": "5", "model": "m1"},
    )
    assert refused.code == "missing_dimension_payload_keys"
    assert "'region'" in str(refused.user_message)
    day = NOW_S - NOW_S % DAY_S
    for model, region, value in (
        ("m1", "eu", "5"),
        ("m2", "eu", "7"),
        ("m1", "eu", "4"),
        ("m1", "us", "1"),
    ):
        client.v1.billing.meter_events.create(
            params=account.event(
                event_name="tokens",
                timestamp=day + 10,
                payload={
                    "stripe_customer_id": account.customer_id,
                    "value": value,
                    "model": model,
                    "region": region,
                },
            )
        )
    page = client.v1.billing.meters.event_summaries.list(
        meter.id,
        params={
            "customer": account.customer_id,
            "start_time": day,
            "end_time": day + DAY_S,
            "dimension_group_by_keys": ["model"],
        },
    )
    grouped = {s.dimensions["model"]: s.aggregated_value for s in page.auto_paging_iter()}
    assert grouped == {"m1": 10, "m2": 7}
    with pytest.raises(stripe.InvalidRequestError, match="not a dimension payload key"):
        client.v1.billing.meters.event_summaries.list(
            meter.id,
            params={
                "customer": account.customer_id,
                "start_time": day,
                "end_time": day + DAY_S,
                "dimension_group_by_keys": ["tier"],
            },
        )
    # The stream validates later: the event is kept as an async error with Stripe's code.
    stream = _stream_client(account)
    stream.v2.billing.meter_event_stream.create(
        params={
            "events": [
                {
                    "event_name": "tokens",
                    "identifier": "s-dim",
                    "payload": {"stripe_customer_id": account.customer_id, "value": "1"},
                }
            ]
        }
    )
    assert [(e.identifier, e.code) for e in account.emulator.state.async_errors] == [
        ("s-dim", "missing_dimension_payload_keys")
    ]


def test_an_identifier_is_forgotten_after_24_h_and_a_resend_counts_twice(
    account: Account,
) -> None:
    # Saw it fail before the fix: the emulator kept identifiers for ever and answered "already
    # exists" to a blind resend days later, which Stripe (24 h at least, not for ever) may
    # record again: a reporter billing twice passed every test against it.
    client = account.make_client()
    client.v1.billing.meter_events.create(params=account.event("5", identifier="evt-old"))
    account.clock.advance(DAY_S - 1)
    with pytest.raises(stripe.InvalidRequestError, match="already exists"):
        client.v1.billing.meter_events.create(params=account.event("5", identifier="evt-old"))

    account.clock.advance(1)
    client.v1.billing.meter_events.create(params=account.event("5", identifier="evt-old"))

    assert [e.identifier for e in account.emulator.state.events] == ["evt-old", "evt-old"]
    assert account.emulator.state.totals() == {("api_calls", account.customer_id): 10}
