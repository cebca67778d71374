"""The v2 stream call, posted without the SDK's request builder: it must send what the SDK
sends (same body, same headers) and raise what the SDK raises for every answer the ledger
tells apart."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import stripe
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine
from sqlalchemy.exc import DatabaseError

from meterstream.deployment import stored_deployment_id
from meterstream.errors import StripeAuthError
from meterstream.meters import load_catalogue
from meterstream.metrics import ReporterMetrics
from reporters import stream_sender
from reporters.bookkeeping import Bookkeeper
from reporters.cycle import Reporter
from reporters.ledger import LedgerRow, all_rows, insert_rows
from reporters.service import connect
from reporters.stream import STREAM_PATH, StreamSender, stream_error, stream_event
from reporters.stream_sender import BATCHES_PER_STAMP, V2StreamSender
from reporters.stripe_http import KeepAliveClient
from reporters.stripe_push import (
    SDK_NETWORK_RETRIES,
    Outcome,
    build_client,
    classify,
)
from stripe_emulator import Emulator
from tests.reporters.test_ledger import pending_row, refuse_updates_of
from tests.reporters.test_reporter import (
    SECRET,
    World,
    create_stripe_meters,
    hour_start,
    put_total,
    world_settings,
)

Request = tuple[str, str, dict[str, str], str]


class Transport(KeepAliveClient):
    """The reporter's transport, noting every request; ``on_stream`` may answer a stream
    call in its place."""

    def __init__(self, on_stream: Any) -> None:
        super().__init__(30.0)
        self.on_stream = on_stream
        self.sent: list[Request] = []

    def request(
        self, method: str, url: str, headers: Any, post_data: Any = None, **kwargs: Any
    ) -> Any:
        self.sent.append((method, url, dict(headers), post_data))
        if url.endswith(STREAM_PATH):
            answer = self.on_stream()
            if answer is not None:
                return answer
        return super().request(method, url, headers, post_data, **kwargs)


def stream_rows() -> list[LedgerRow]:
    """Three rows of cus_a's tokens, an hour old (well within Stripe's limits)."""
    hour_ago = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    return [dataclasses.replace(pending_row(n), timestamp=hour_ago) for n in range(3)]


def test_stream_call_sends_the_sdks_body_and_headers(
    bare_emulator: Emulator, tmp_path: Path
) -> None:
    create_stripe_meters(bare_emulator)
    bare_emulator.state.create_customer(customer_id="cus_a")
    settings = world_settings(
        bare_emulator, f"sqlite:///{tmp_path / 'm.db'}", tmp_path, stripe_stream=True
    )
    metrics = ReporterMetrics(CollectorRegistry())
    connected = connect(settings, load_catalogue(settings.meters_file), metrics, threading.Event())
    recorder = Transport(lambda: None)
    try:
        sender = StreamSender(
            build_client(SECRET, settings, metrics, recorder),
            connected.gateway,
            recorder,
            settings.meter_events_base,
            lambda: datetime.now(UTC),
            max_network_retries=SDK_NETWORK_RETRIES,
        )
        rows = stream_rows()
        assert sender.send_batch(rows, connected.stripe_meters) == Outcome("acknowledged")
        ours = [r for r in recorder.sent if r[1].endswith(STREAM_PATH)]
        token = ours[0][2]["Authorization"].removeprefix("Bearer ")
        events = [stream_event(row, connected.stripe_meters[row.meter]) for row in rows]
        session = build_client(token, settings, metrics, recorder)
        session.v2.billing.meter_event_stream.create(params={"events": events})
    finally:
        recorder.close()  # type: ignore[no-untyped-call]  # SDK: unannotated
        connected.close()
    (method, url, headers, body), (sdk_method, sdk_url, sdk_headers, sdk_body) = [
        r for r in recorder.sent if r[1].endswith(STREAM_PATH)
    ]
    assert (method, url, body) == (sdk_method, sdk_url, sdk_body)
    assert headers.keys() == sdk_headers.keys()
    # Each call has an Idempotency-Key of its own, and telemetry about the call before it
    # (added by the SDK's HTTP client to both); the SDK's user agent has telemetry more.
    different = {"Idempotency-Key", "X-Stripe-Client-Telemetry", "X-Stripe-Client-User-Agent"}
    assert {k: v for k, v in headers.items() if k not in different} == {
        k: v for k, v in sdk_headers.items() if k not in different
    }
    assert headers["Idempotency-Key"] != sdk_headers["Idempotency-Key"]
    ours_agent = json.loads(headers["X-Stripe-Client-User-Agent"])
    assert ours_agent.items() <= json.loads(sdk_headers["X-Stripe-Client-User-Agent"]).items()
    # Both calls reached Stripe; the second was deduplicated by identifier.
    assert bare_emulator.state.totals() == {("tokens", "cus_a"): 9}


def _error(kind: str | None, message: str, code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message}
    if kind is not None:
        error["type"] = kind
    if code is not None:
        error["code"] = code
    return {"error": error}


ANSWERS: list[tuple[int, Any]] = [
    (400, _error("invalid_request", "bad event", "invalid_value")),
    (400, _error("invalid_request_error", "An event already exists with identifier ms1_x.")),
    (404, _error(None, "No such meter", "resource_missing")),
    (400, _error("idempotency_error", "Keys for idempotent requests can only be used once")),
    (401, _error("authentication_error", "Invalid API Key provided: sk_test_****")),
    (403, _error("permission_error", "not allowed")),
    (429, _error("rate_limit", "Too many requests")),
    (429, _error("rate_limit_error", "Too many requests")),
    (400, _error("invalid_request_error", "slow down", "rate_limit")),
    (409, _error("api_error", "Another request with this key is in progress")),
    (500, _error("api_error", "Something went wrong")),
    (401, _error("temporary_session_expired", "The session expired")),
    (400, _error("temporary_session_expired", "The session expired")),
    (400, _error("blocked_by_stripe", "blocked")),
    (401, _error("unauthorized", "Invalid token")),
    (403, _error("forbidden", "Not allowed")),
    (429, _error("slow_down", "Too many requests")),
    (502, "<html>Bad Gateway</html>"),
    (500, {"error": "server_error"}),
]


def _sdk_error(status: int, body: str, headers: dict[str, str]) -> stripe.StripeError | None:
    """The SDK's own reading of an answer (private; used here only to hold ours to it); None
    if the SDK fails on it with an error of another kind."""
    requestor = stripe.StripeClient("sk_test_x")._requestor
    try:
        requestor._interpret_response(body, status, headers, "V2")
    except stripe.StripeError as error:
        return error
    except Exception:  # e.g. AttributeError on {"error": "a string"}
        return None
    raise AssertionError("the SDK took an error answer for a success")


def _classified(error: stripe.StripeError) -> Outcome | str:
    try:
        return classify(error, "ms1_x")
    except StripeAuthError:
        return "auth"


def _kind(outcome: Outcome | str) -> str:
    return outcome if isinstance(outcome, str) else outcome.kind


# The classes stream_error raises, as the SDK does for the same answers.
SAME_CLASS = (
    stripe.APIError,
    stripe.InvalidRequestError,
    stripe.IdempotencyError,
    stripe.RateLimitError,
    stripe.AuthenticationError,
    stripe.PermissionError,
    stripe.TemporarySessionExpiredError,
)


@pytest.mark.parametrize(("status", "answer"), ANSWERS)
def test_stream_errors_are_the_sdks(status: int, answer: Any) -> None:
    body = answer if isinstance(answer, str) else json.dumps(answer)
    headers = {"request-id": "req_123"}
    ours, sdk = stream_error(body, status, headers), _sdk_error(status, body, headers)

    assert ours.http_status == status
    if sdk is None:
        assert _kind(_classified(ours)) == "retry"  # where the SDK itself fails
        return
    assert _kind(_classified(ours)) == _kind(_classified(sdk))
    if type(sdk) in SAME_CLASS:
        assert type(ours) is type(sdk)
        assert (ours.code, ours.user_message) == (sdk.code, sdk.user_message)
        ours_outcome, sdk_outcome = _classified(ours), _classified(sdk)
        if isinstance(ours_outcome, Outcome) and sdk.request_id is None:
            # The SDK drops the request id of an answer that is not JSON; ours keeps it.
            ours_outcome = dataclasses.replace(ours_outcome, request_id=None)
        assert ours_outcome == sdk_outcome
    else:
        # A v2 type the SDK has a class of its own for: a plain APIError here, retried.
        assert type(ours) is stripe.APIError
    if sdk.request_id is not None:
        assert ours.request_id == sdk.request_id


def test_a_stream_error_of_an_unknown_type_is_retried_not_rejected() -> None:
    error = stream_error(json.dumps(_error("brand_new_kind", "?")), 400, {})

    assert isinstance(error, stripe.APIError)
    assert classify(error, "ms1_x").kind == "retry"


class FailingSecondCall(KeepAliveClient):
    """The reporter's transport, answering 500 to every try of the second stream call (or
    the ``failing``-th, from 0; the SDK retries it with the same Idempotency-Key), without
    passing it on."""

    def __init__(self, failing: int = 1) -> None:
        super().__init__(30.0)
        self.calls: list[str] = []
        self.failing = failing

    def request(
        self, method: str, url: str, headers: Any, post_data: Any = None, **kwargs: Any
    ) -> Any:
        if url.endswith(STREAM_PATH):
            key = headers["Idempotency-Key"]
            if key not in self.calls:
                self.calls.append(key)
            if self.calls.index(key) == self.failing:
                return json.dumps(_error("api_error", "boom")), 500, {}
        return super().request(method, url, headers, post_data, **kwargs)


def test_a_failed_call_stops_the_stream_and_the_rows_after_it_wait_unstamped(
    world: World,
) -> None:
    """Three batches of 100 rows, written by one thread while another sends: the first call
    is accepted, the second fails (500 three times), so the third is neither stamped nor
    sent; every row is still written, and the next cycle sends the rest, each once."""
    customers = due_customers(world, 250)
    transport = FailingSecondCall()
    with stream_reporter(world, transport) as reporter:
        first = reporter.run_cycle()

    rows = sorted(all_rows(world.engine), key=lambda r: r.customer_id)
    assert len(transport.calls) == 2
    assert (first.acknowledged, first.unacknowledged) == (100, 150)
    assert len(rows) == 250
    assert [(r.status, r.attempts) for r in rows[:100]] == [("accepted", 1)] * 100
    assert [(r.status, r.attempts) for r in rows[100:200]] == [("pending", 1)] * 100
    assert [(r.status, r.attempts) for r in rows[200:]] == [("pending", 0)] * 50
    assert len(world.emulator.state.events) == 100

    second = world.reporter(stripe_stream=True).run_cycle()

    assert (second.acknowledged, second.unacknowledged) == (150, 0)
    assert sorted(e.identifier for e in world.emulator.state.events) == sorted(
        r.identifier for r in rows
    )
    assert world.totals() == {("tokens", c): 2 for c in customers}


def test_a_refused_key_stops_the_cycle_whatever_its_error_type() -> None:
    for status, kind in ((401, "unauthorized"), (403, "forbidden"), (401, None)):
        with pytest.raises(StripeAuthError):
            classify(stream_error(json.dumps(_error(kind, "no")), status, {}), None)


@contextmanager
def stream_reporter(
    world: World,
    transport: KeepAliveClient,
    session_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    lanes: int = 1,
) -> Iterator[Reporter]:
    """A stream Reporter on ``transport`` (its sessions timed by ``session_clock``), in one
    sending lane unless told (the tests of a call sequence read one lane's); its connection
    and ``transport`` are closed on exit."""
    settings = world.settings.model_copy(update={"stripe_stream": True})
    connected = connect(settings, world.catalogue, world.metrics, world.stop)
    stream = StreamSender(
        build_client(SECRET, settings, world.metrics, transport),
        connected.gateway,
        transport,
        settings.meter_events_base,
        session_clock,
        max_network_retries=SDK_NETWORK_RETRIES,
    )
    sender = V2StreamSender(stream)
    sender.lanes = lanes
    reporter = Reporter(
        world.engine,
        world.catalogue,
        connected.stripe_meters,
        world.metrics,
        sender=sender,
        clock=lambda: datetime.now(UTC),
        stop=world.stop,
        horizon_days=settings.horizon_days,
        deployment_id=stored_deployment_id(world.engine),
    )
    try:
        yield reporter
    finally:
        connected.close()
        transport.close()


def test_a_call_failing_at_the_end_of_a_group_takes_back_the_stamp_of_the_next_group(
    world: World,
) -> None:
    """Calls are stamped BATCHES_PER_STAMP at a time, and the next group is taken and
    stamped while a group's calls are made: the last call of the first group fails, so the
    next group, stamped meanwhile, is never called and its stamp is taken back. The next
    cycle sends the rest, each once."""
    calls = BATCHES_PER_STAMP + 2
    customers = due_customers(world, 100 * calls)
    transport = FailingSecondCall(failing=BATCHES_PER_STAMP - 1)
    with stream_reporter(world, transport) as reporter:
        first = reporter.run_cycle()

    rows = sorted(all_rows(world.engine), key=lambda r: r.customer_id)
    accepted = 100 * (BATCHES_PER_STAMP - 1)
    assert len(transport.calls) == BATCHES_PER_STAMP
    assert first.acknowledged == accepted
    assert [(r.status, r.attempts) for r in rows[:accepted]] == [("accepted", 1)] * accepted
    assert [(r.status, r.attempts) for r in rows[accepted : accepted + 100]] == [
        ("pending", 1)
    ] * 100
    assert [(r.status, r.attempts, r.first_attempt_at) for r in rows[accepted + 100 :]] == [
        ("pending", 0, None)
    ] * 200

    second = world.reporter(stripe_stream=True).run_cycle()

    assert (second.acknowledged, second.unacknowledged) == (300, 0)
    assert sorted(e.identifier for e in world.emulator.state.events) == sorted(
        r.identifier for r in rows
    )
    assert world.totals() == {("tokens", c): 2 for c in customers}


def test_calls_accepted_while_an_acceptance_is_written_are_recorded_together(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The acceptor records every call accepted since its last record in one transaction:
    held on its first record until three more calls are answered, it records those three
    in one, not three."""
    due_customers(world, 400)
    transport = Transport(lambda: None)
    three_more = threading.Event()
    recorded: list[int] = []
    accept = Bookkeeper.accept_and_stamp

    def held_first(self: Bookkeeper, accepted: Any, batch: Any, result: Any) -> Any:
        if not recorded:
            assert three_more.wait(timeout=30)
        recorded.append(len(accepted))
        return accept(self, accepted, batch, result)

    add = stream_sender.Acceptor.add
    added: list[int] = []

    def note_accepted(self: stream_sender.Acceptor, calls: Any) -> None:
        add(self, calls)
        added.append(len(calls))
        if len(added) == 4:
            three_more.set()

    monkeypatch.setattr(stream_sender.Acceptor, "add", note_accepted)
    monkeypatch.setattr(Bookkeeper, "accept_and_stamp", held_first)
    with stream_reporter(world, transport) as reporter:
        result = reporter.run_cycle()

    assert result.acknowledged == 400
    assert recorded == [100, 300]
    assert {(r.status, r.attempts) for r in all_rows(world.engine)} == {("accepted", 1)}


def test_a_failed_call_whose_answer_cannot_be_recorded_takes_back_the_rest_of_its_group(
    world: World,
) -> None:
    """The second call of a group fails (500) and recording that answer fails too (a trigger
    refuses one of its rows' update): the group's last two batches and the group taken
    meanwhile are never called, so none of their rows may stay stamped."""
    due_customers(world, 100 * (BATCHES_PER_STAMP + 2))
    refuse_recorded_error_of(world.engine, "cus_150")
    transport = FailingSecondCall()
    with stream_reporter(world, transport) as reporter, pytest.raises(DatabaseError):
        reporter.run_cycle()

    rows = sorted(all_rows(world.engine), key=lambda r: r.customer_id)
    assert len(transport.calls) == 2
    assert [(r.status, r.attempts) for r in rows[:100]] == [("accepted", 1)] * 100
    assert [(r.status, r.attempts) for r in rows[100:200]] == [("pending", 1)] * 100
    assert [(r.status, r.attempts, r.first_attempt_at) for r in rows[200:]] == [
        ("pending", 0, None)
    ] * 400


def refuse_recorded_error_of(engine: Engine, customer_id: str) -> None:
    """A trigger failing the update that records a failed call's error on ``customer_id``'s
    row (its stamp, which sets no error, goes through)."""
    when = f"OLD.customer_id = '{customer_id}' AND NEW.last_error IS NOT NULL"
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql(
                f"CREATE TRIGGER refuse_error BEFORE UPDATE ON ledger WHEN {when} "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
            return
        connection.exec_driver_sql(
            "CREATE FUNCTION refuse_error() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql"
        )
        connection.exec_driver_sql(
            "CREATE TRIGGER refuse_error BEFORE UPDATE ON ledger FOR EACH ROW "
            f"WHEN ({when}) EXECUTE FUNCTION refuse_error()"
        )


class NoSessionAfterTheFirst(Transport):
    """Stream calls go through; every meter event session after the first is refused with a
    500 (the SDK retries it, then gives up)."""

    def __init__(self, on_stream: Any) -> None:
        super().__init__(on_stream)
        self.sessions = 0

    def request(
        self, method: str, url: str, headers: Any, post_data: Any = None, **kwargs: Any
    ) -> Any:
        if url.endswith("/v2/billing/meter_event_session"):
            self.sessions += 1
            if self.sessions > 1:
                self.sent.append((method, url, dict(headers), post_data))
                return json.dumps(_error("api_error", "down")), 500, {}
        return super().request(method, url, headers, post_data, **kwargs)


def test_a_session_that_cannot_be_renewed_before_a_group_leaves_that_group_unstamped(
    world: World,
) -> None:
    """The session is due for renewal once the first group's last call is made, and Stripe
    will not open a new one: the second group, stamped while the first group's calls were
    made, is never called, so none of its rows may stay stamped (a stamp older than 20 h
    makes a row unknown, never resent)."""
    due_customers(world, 100 * (BATCHES_PER_STAMP + 2))
    later = timedelta()

    def session_due_after_the_first_group() -> None:
        nonlocal later
        if sum(1 for r in transport.sent if r[1].endswith(STREAM_PATH)) == BATCHES_PER_STAMP:
            later = timedelta(minutes=15)  # the session's whole life

    transport = NoSessionAfterTheFirst(session_due_after_the_first_group)
    with stream_reporter(world, transport, lambda: datetime.now(UTC) + later) as reporter:
        result = reporter.run_cycle()

    rows = sorted(all_rows(world.engine), key=lambda r: r.customer_id)
    accepted = 100 * BATCHES_PER_STAMP
    assert sum(1 for r in transport.sent if r[1].endswith(STREAM_PATH)) == BATCHES_PER_STAMP
    assert transport.sessions > 1
    assert result.acknowledged == accepted
    assert [(r.status, r.attempts) for r in rows[:accepted]] == [("accepted", 1)] * accepted
    assert [(r.status, r.attempts, r.first_attempt_at) for r in rows[accepted:]] == [
        ("pending", 0, None)
    ] * 200


class AcceptedThenRateLimited(KeepAliveClient):
    """The first call on ``path`` reaches Stripe (accepted) but its answer is lost (a 500 to
    the SDK, which retries it); the retry is answered 429, and a stop comes then."""

    def __init__(self, stop: threading.Event, path: str = STREAM_PATH) -> None:
        super().__init__(30.0)
        self.stop = stop
        self.path = path
        self.tries = 0

    def request(
        self, method: str, url: str, headers: Any, post_data: Any = None, **kwargs: Any
    ) -> Any:
        if url.endswith(self.path):
            self.tries += 1
            if self.tries == 1:
                super().request(method, url, headers, post_data, **kwargs)
                return json.dumps(_error("api_error", "lost")), 500, {}
            if self.tries == 2:
                self.stop.set()
                return json.dumps(_error("rate_limit", "slow down")), 429, {}
        return super().request(method, url, headers, post_data, **kwargs)


def test_a_stop_while_a_made_call_backs_off_keeps_its_stamps(world: World) -> None:
    """A stop that comes while a call backs off a 429 comes after the call was made (an
    earlier try of it, retried by the SDK, may have reached Stripe, as here): its rows keep
    their stamps (unknown after 20 h, never resent blindly past Stripe's 24 h of
    deduplication); the other batches of its group, never called, are unstamped."""
    due_customers(world, 250)
    transport = AcceptedThenRateLimited(world.stop)
    with stream_reporter(world, transport) as reporter:
        reporter.run_cycle()

    rows = sorted(all_rows(world.engine), key=lambda r: r.customer_id)
    assert transport.tries == 2
    assert len(world.emulator.state.events) == 100  # Stripe has the first call's events
    assert all(r.status == "pending" for r in rows)
    assert all(r.attempts == 1 and r.first_attempt_at for r in rows[:100])
    assert [(r.attempts, r.first_attempt_at) for r in rows[100:]] == [(0, None)] * 150


def due_customers(world: World, count: int) -> list[str]:
    customers = [f"cus_{n:03d}" for n in range(count)]
    for customer in customers:
        world.emulator.state.create_customer(customer_id=customer)
        put_total(world.engine, customer, "tokens", hour_start(2), "2")
    return customers


def test_a_2xx_answer_that_is_not_json_is_not_taken_for_acceptance(world: World) -> None:
    due_customers(world, 3)
    transport = Transport(lambda: ("<html>Welcome</html>", 200, {}))
    with stream_reporter(world, transport) as reporter:
        result = reporter.run_cycle()

    assert (result.acknowledged, result.unacknowledged) == (0, 3)
    assert {r.status for r in all_rows(world.engine)} == {"pending"}


def test_a_stop_request_stamps_no_batch_it_will_not_send(world: World) -> None:
    due_customers(world, 250)
    transport = Transport(lambda: world.stop.set())  # then the call goes out as usual
    with stream_reporter(world, transport) as reporter:
        result = reporter.run_cycle()

    assert result.acknowledged == 100
    stamped = [r for r in all_rows(world.engine) if r.attempts]
    assert len(stamped) == 100
    assert {r.status for r in stamped} == {"accepted"}


def test_an_accepted_batch_is_recorded_even_if_taking_the_next_one_fails(world: World) -> None:
    """The next group of batches is taken while this group's calls are made and before their
    answers are written; if taking it fails, the answers are still written."""
    due_customers(world, 100 * BATCHES_PER_STAMP)
    stuck = dataclasses.replace(pending_row(1), customer_id="cus_zzz", identifier="ms1_stuck")
    with world.engine.begin() as connection:
        insert_rows(connection, [stuck])
    refuse_updates_of(world.engine, stuck.identifier)  # its check before the call fails
    transport = Transport(lambda: None)
    with stream_reporter(world, transport) as reporter, pytest.raises(DatabaseError):
        reporter.run_cycle()

    statuses = {r.customer_id: r.status for r in all_rows(world.engine)}
    assert statuses.pop("cus_zzz") == "pending"
    assert set(statuses.values()) == {"accepted"}
    assert len(statuses) == 100 * BATCHES_PER_STAMP


def test_every_row_of_a_call_is_stamped_and_committed_before_the_call(world: World) -> None:
    """The next batch is taken and stamped while a call is in flight: at each call, seen from
    another connection, every row in its body is already stamped (committed)."""
    due_customers(world, 350)
    unstamped_at_call: list[int] = []

    def check_stamps() -> None:
        body = json.loads(transport.sent[-1][3])
        identifiers = {event["identifier"] for event in body["events"]}
        rows = [r for r in all_rows(world.engine) if r.identifier in identifiers]
        assert len(rows) == len(identifiers)
        unstamped_at_call.append(sum(1 for r in rows if not r.attempts))

    transport = Transport(check_stamps)
    with stream_reporter(world, transport) as reporter:
        result = reporter.run_cycle()

    assert result.acknowledged == 350
    assert unstamped_at_call == [0, 0, 0, 0]
    assert {(r.status, r.attempts) for r in all_rows(world.engine)} == {("accepted", 1)}


def test_a_key_refused_on_a_call_leaves_the_batch_taken_meanwhile_unstamped(
    world: World,
) -> None:
    """The second call is refused (401): the third batch, taken and stamped while that call
    was in flight, is never called, so its stamp is taken back."""
    due_customers(world, 250)
    calls: list[int] = []

    def refuse_the_second() -> Any:
        calls.append(len(calls))
        if len(calls) == 2:
            return json.dumps(_error("invalid_request_error", "revoked")), 401, {}
        return None

    transport = Transport(refuse_the_second)
    with stream_reporter(world, transport) as reporter, pytest.raises(StripeAuthError):
        reporter.run_cycle()

    rows = sorted(all_rows(world.engine), key=lambda r: r.customer_id)
    assert len(calls) == 2
    assert [(r.status, r.attempts) for r in rows[:100]] == [("accepted", 1)] * 100
    assert [(r.status, r.attempts) for r in rows[100:200]] == [("pending", 1)] * 100
    assert [(r.status, r.attempts, r.first_attempt_at) for r in rows[200:]] == [
        ("pending", 0, None)
    ] * 50


def test_an_acceptance_that_cannot_be_recorded_is_raised_and_resent_next_cycle(
    world: World,
) -> None:
    """Acceptances are recorded off the sending path: one that fails (here a trigger refuses
    one row's move to accepted) leaves its call's rows pending and stamped, the other calls
    go on, the cycle raises it at the end, and the next cycle resends those rows under their
    identifiers (Stripe counts each once)."""
    customers = due_customers(world, 250)
    refuse_acceptance_of(world.engine, "cus_050")
    transport = Transport(lambda: None)
    with stream_reporter(world, transport) as reporter, pytest.raises(DatabaseError):
        reporter.run_cycle()

    rows = sorted(all_rows(world.engine), key=lambda r: r.customer_id)
    assert [(r.status, r.attempts) for r in rows[:100]] == [("pending", 1)] * 100
    assert [(r.status, r.attempts) for r in rows[100:]] == [("accepted", 1)] * 150
    assert len(world.emulator.state.events) == 250

    drop_refusal(world.engine)
    second = world.reporter(stripe_stream=True).run_cycle()

    assert (second.acknowledged, second.unacknowledged) == (100, 0)
    assert {r.status for r in all_rows(world.engine)} == {"accepted"}
    assert world.totals() == {("tokens", c): 2 for c in customers}


def refuse_acceptance_of(engine: Engine, customer_id: str) -> None:
    """A trigger failing the update that marks ``customer_id``'s rows accepted."""
    when = f"OLD.customer_id = '{customer_id}' AND NEW.status = 'accepted'"
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql(
                f"CREATE TRIGGER refuse_accepted BEFORE UPDATE ON ledger WHEN {when} "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
            return
        connection.exec_driver_sql(
            "CREATE FUNCTION refuse_accepted() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql"
        )
        connection.exec_driver_sql(
            "CREATE TRIGGER refuse_accepted BEFORE UPDATE ON ledger FOR EACH ROW "
            f"WHEN ({when}) EXECUTE FUNCTION refuse_accepted()"
        )


def drop_refusal(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "DROP TRIGGER refuse_accepted"
            + ("" if engine.dialect.name == "sqlite" else " ON ledger")
        )


def two_windows_each(world: World, count: int) -> list[str]:
    """``count`` customers, each with two due windows of tokens (two rows of one key)."""
    customers = [f"cus_{n:03d}" for n in range(count)]
    for customer in customers:
        world.emulator.state.create_customer(customer_id=customer)
        put_total(world.engine, customer, "tokens", hour_start(3), "2")
        put_total(world.engine, customer, "tokens", hour_start(2), "3")
    return customers


def called_identifiers(transport: Transport) -> set[str]:
    return {
        event["identifier"]
        for _method, url, _headers, body in transport.sent
        if url.endswith(STREAM_PATH)
        for event in json.loads(body)["events"]
    }


def test_lanes_on_postgresql_send_every_row_once_each_keys_rows_in_order(
    pg_world: World,
) -> None:
    """Four lanes, sixteen chunks: calls go out side by side from several threads, every
    row is sent once and accepted, and each (customer, meter)'s rows reach Stripe in
    ledger order (both of a key's rows are in one chunk, so in one lane)."""
    world = pg_world
    customers = two_windows_each(world, 400)
    threads: set[str] = set()
    transport = Transport(lambda: threads.add(threading.current_thread().name))
    with stream_reporter(world, transport, lanes=4) as reporter:
        sender = reporter.sender
        assert isinstance(sender, V2StreamSender)
        sender.keys_per_chunk = 25
        result = reporter.run_cycle()

    rows = all_rows(world.engine)
    assert (result.acknowledged, result.unacknowledged) == (800, 0)
    assert {(r.status, r.attempts) for r in rows} == {("accepted", 1)}
    events = world.emulator.state.events
    assert sorted(e.identifier for e in events) == sorted(r.identifier for r in rows)
    arrival: dict[str, list[int]] = {}
    for event in events:
        arrival.setdefault(event.customer_id, []).append(event.timestamp)
    assert all(times == sorted(times) and len(times) == 2 for times in arrival.values())
    assert len(arrival) == len(customers)
    assert len(threads) > 1


def test_a_key_refused_in_one_lane_ends_every_lane_with_no_uncalled_row_stamped(
    pg_world: World,
) -> None:
    """Five calls a lane; the third call is refused (401): the cycle raises, every lane ends
    after at most the call it had in flight, and exactly the rows of the calls made are
    stamped (the groups taken meanwhile are taken back)."""
    world = pg_world
    two_windows_each(world, 1_000)
    calls: list[int] = []
    lock = threading.Lock()

    def refuse_the_fifth() -> Any:
        with lock:
            calls.append(len(calls))
            if len(calls) == 3:
                return json.dumps(_error("invalid_request_error", "revoked")), 401, {}
        return None

    transport = Transport(refuse_the_fifth)
    with stream_reporter(world, transport, lanes=4) as reporter, pytest.raises(StripeAuthError):
        sender = reporter.sender
        assert isinstance(sender, V2StreamSender)
        sender.keys_per_chunk = 50
        reporter.run_cycle()

    rows = all_rows(world.engine)
    called = called_identifiers(transport)
    accepted = {e.identifier for e in world.emulator.state.events}
    assert len(rows) == 2_000  # every chunk written all the same
    assert len(calls) <= 3 + 3  # the refused one's lane ends; the others after one more
    assert {r.identifier for r in rows if r.attempts} == called
    assert {r.identifier for r in rows if r.status == "accepted"} == accepted
    assert all(r.status == "pending" for r in rows if r.identifier not in accepted)


def test_when_lanes_fail_a_refused_key_is_the_error_the_cycle_raises() -> None:
    """A lane's acceptance that could not be recorded and another lane's refused key: the
    refused key is raised (it stops the reporter), whichever lane failed first."""
    unrecorded = DatabaseError("UPDATE ledger", None, Exception("gone"))
    refused = StripeAuthError("the key is refused")

    assert stream_sender._most_telling([unrecorded, refused]) is refused
    assert stream_sender._most_telling([refused, unrecorded]) is refused
    assert stream_sender._most_telling([unrecorded]) is unrecorded
