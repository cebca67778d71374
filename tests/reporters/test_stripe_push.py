"""send_meter_event on the wire, against the emulator over real HTTP: it sends what the SDK's
``meter_events.create`` sent (the reporter's earlier path), byte for byte where it matters,
and every answer means for the ledger what it meant before."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stripe
from prometheus_client import CollectorRegistry

from meterstream.errors import StripeAuthError
from meterstream.metrics import ReporterMetrics
from reporters.ledger import LedgerRow, identifier_for
from reporters.meters_check import StripeMeter
from reporters.pacer import Pacer
from reporters.stripe_http import KeepAliveClient
from reporters.stripe_push import (
    Outcome,
    StripeGateway,
    classify,
    meter_event_params,
    send_meter_event,
)
from stripe_emulator import Emulator, FaultKind, run_stripe_emulator
from stripe_emulator.calls import ApiRequest
from tests.reporters.test_ledger import pending_row

SECRET = "sk_test_51H8push0wire"  # noqa: S105  # a fake key
# Payload keys other than Stripe's defaults, so the meter's own keys are seen to be used.
METER = StripeMeter(
    id="mtr_push",
    event_name="tokens",
    formula="sum",
    status="active",
    customer_key="customer",
    value_key="tokens_used",
)
HOUR = timedelta(hours=1)
Send = Callable[[stripe.StripeClient, StripeGateway, LedgerRow, StripeMeter], Outcome]


def create_send(
    client: stripe.StripeClient, gateway: StripeGateway, row: LedgerRow, meter: StripeMeter
) -> Outcome:
    """The reporter's v1 call before it moved to ``raw_request``, kept as the reference."""
    params = meter_event_params(row, meter)
    try:
        answer = gateway.call(
            lambda: client.v1.billing.meter_events.create(
                params=params, options={"idempotency_key": row.identifier}
            )
        )
    except stripe.StripeError as exc:
        return classify(exc, row.identifier)
    response = answer.last_response
    return Outcome("acknowledged", request_id=response.request_id if response else None)


def a_row(value: int = -1234, hours_ago: int = 1, customer: str = "cus_push") -> LedgerRow:
    """A pending row of the window ``hours_ago`` hours back, which Stripe takes now."""
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - hours_ago * HOUR
    end = start + HOUR
    return dataclasses.replace(
        pending_row(0),
        customer_id=customer,
        window_start=start,
        window_end=end,
        value=value,
        event_name=METER.event_name,
        stripe_customer_id=customer,
        timestamp=start + timedelta(minutes=17, seconds=5),
        identifier=identifier_for(customer, "tokens", start, end, 1, deployment_id="test"),
    )


def open_account(emulator: Emulator) -> None:
    """A fresh account: the meter and the customer, no events, faults or saved answers."""
    emulator.reset()
    emulator.state.create_meter(
        display_name="tokens",
        event_name=METER.event_name,
        customer_key=METER.customer_key,
        value_key=METER.value_key,
    )
    emulator.state.create_customer(customer_id="cus_push")


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with run_stripe_emulator(rate_limit_per_s=None, keep_requests=10) as running:
        open_account(running)
        yield running


def sdk_client(emulator: Emulator, api_key: str = SECRET) -> stripe.StripeClient:
    """The client the reporter builds (reporters.stripe_push.build_client): our HTTP client,
    two network retries."""
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": emulator.url, "meter_events": emulator.url},
        max_network_retries=2,
        http_client=KeepAliveClient(10.0),
    )


def a_gateway(metrics: ReporterMetrics | None = None, max_429_attempts: int = 3) -> StripeGateway:
    return StripeGateway(
        Pacer(1000.0),
        metrics or ReporterMetrics(CollectorRegistry()),
        threading.Event(),
        max_429_attempts=max_429_attempts,
        backoff_base_s=0.001,
        seed=0,
    )


def telemetry(request: ApiRequest) -> dict[str, Any]:
    """The SDK's X-Stripe-Client-Telemetry header: metrics of the thread's previous call."""
    found: dict[str, Any] = json.loads(request.headers["x-stripe-client-telemetry"])
    return found


def test_the_request_is_the_one_meter_events_create_sent(emulator: Emulator) -> None:
    client, gateway, row, before = sdk_client(emulator), a_gateway(), a_row(), a_row(1, 2)
    # A call before, so that both calls compared carry the telemetry of the call before them.
    create_send(client, gateway, before, METER)

    new = send_meter_event(client, gateway, row, METER)
    old = create_send(client, gateway, row, METER)  # same key and body: Stripe replays

    _, by_new, by_old = emulator.received
    assert by_new.body == by_old.body
    assert by_new.headers["idempotency-key"] == by_old.headers["idempotency-key"] == row.identifier
    assert (by_new.method, by_new.path, by_new.query) == (by_old.method, by_old.path, by_old.query)
    assert (by_new.method, by_new.path, by_new.query) == ("POST", "/v1/billing/meter_events", "")
    # Every header but the telemetry of the call before is the same, in the same order
    # (Authorization, Content-Type, Stripe-Version if any, the user agents, the length).
    assert list(by_new.headers) == list(by_old.headers)
    for name in by_new.headers:
        if name != "x-stripe-client-telemetry":
            assert by_new.headers[name] == by_old.headers[name], name
    # The telemetry names the kind of call before it: a raw_request now.
    assert telemetry(by_new)["last_request_metrics"]["usage"] == ["stripe_client"]
    assert telemetry(by_old)["last_request_metrics"]["usage"] == ["raw_request"]
    assert telemetry(by_new).keys() == telemetry(by_old).keys()
    # And the body is the row's, as Stripe reads it.
    assert by_new.headers["content-type"] == "application/x-www-form-urlencoded"
    timestamp = int(row.timestamp.timestamp())
    assert by_new.body.decode() == (
        f"event_name=tokens&payload[customer]=cus_push&payload[tokens_used]=-1234"
        f"&identifier={row.identifier}&timestamp={timestamp}"
    )
    assert new == Outcome("acknowledged", request_id=new.request_id)
    assert new.request_id is not None and new.request_id.startswith("req_")
    assert old == new  # the replayed answer carries the first one's request id
    assert [(e.identifier, e.value) for e in emulator.state.events] == [
        (before.identifier, 1),
        (row.identifier, -1234),
    ]


def already_sent(emulator: Emulator, row: LedgerRow) -> None:
    """Stripe has the identifier but has forgotten the Idempotency-Key (after 24 h)."""
    create_send(sdk_client(emulator), a_gateway(), row, METER)
    emulator.state._replies.clear()


def inject(kind: FaultKind, count: int) -> Callable[[Emulator, LedgerRow], None]:
    def setup(emulator: Emulator, _row: LedgerRow) -> None:
        emulator.faults.inject(kind, count=count, path_prefix="/v1/billing/meter_events")

    return setup


def nothing(_emulator: Emulator, _row: LedgerRow) -> None:
    return None


@pytest.mark.parametrize(
    ("setup", "customer", "kind", "code"),
    [
        pytest.param(nothing, "cus_push", "acknowledged", None, id="200"),
        pytest.param(already_sent, "cus_push", "acknowledged", None, id="already-exists"),
        pytest.param(nothing, "cus_nobody", "rejected", "meter_event_customer_not_found", id="400"),
        pytest.param(inject("http_409", 3), "cus_push", "retry", None, id="409"),
        pytest.param(inject("http_429", 1), "cus_push", "acknowledged", None, id="429-then-200"),
        pytest.param(inject("http_429", 3), "cus_push", "retry", None, id="429-every-try"),
        pytest.param(inject("http_500", 2), "cus_push", "acknowledged", None, id="500-then-200"),
        pytest.param(inject("http_500", 3), "cus_push", "retry", None, id="500-every-try"),
        pytest.param(inject("drop_connection", 3), "cus_push", "retry", None, id="answer-lost"),
    ],
)
def test_every_answer_means_what_it_meant_with_meter_events_create(
    emulator: Emulator,
    setup: Callable[[Emulator, LedgerRow], None],
    customer: str,
    kind: str,
    code: str | None,
) -> None:
    row = a_row(customer=customer)
    outcomes, rate_limited, events = [], [], []
    for send in (create_send, send_meter_event):
        open_account(emulator)
        setup(emulator, row)
        metrics = ReporterMetrics(CollectorRegistry())
        outcomes.append(send(sdk_client(emulator), a_gateway(metrics), row, METER))
        rate_limited.append(
            metrics.registry.get_sample_value("meterstream_reporter_rate_limited_responses_total")
        )
        events.append([e.identifier for e in emulator.state.events])

    old, new = outcomes
    assert (new.kind, new.code, new.error) == (old.kind, old.code, old.error)
    assert (new.kind, new.code) == (kind, code)
    # Request ids differ from call to call; each is there (or not) as before.
    assert (new.request_id is None) == (old.request_id is None)
    assert rate_limited[0] == rate_limited[1]
    assert events[0] == events[1]


def test_a_refused_key_stops_the_cycle_as_before(emulator: Emulator) -> None:
    for send in (create_send, send_meter_event):
        with pytest.raises(StripeAuthError, match="HTTP 401"):
            send(sdk_client(emulator, "sk_live_refused"), a_gateway(), a_row(), METER)
