"""The emulator's HTTP server: stdlib ThreadingHTTPServer, one thread per connection.

It speaks HTTP/1.1 with keep-alive, because stripe-python (through requests) reuses
connections, and a dropped-connection fault must hit a live, reused socket to look like
a real lost answer. Paths under /_emulator/ are the control API for tests in another
process: inspect events, reset, inject faults.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from stripe_emulator.api import ApiResponse, StripeApi, error_response
from stripe_emulator.calls import ApiRequest
from stripe_emulator.faults import Faults
from stripe_emulator.limits import CallSlots, RefusingRateLimit
from stripe_emulator.notifications import Notifier
from stripe_emulator.records import StripeApiError
from stripe_emulator.state import EmulatorState, EpochSeconds
from stripe_emulator.webhooks import WebhookSender

DEFAULT_RATE_LIMIT_PER_S = 100  # Stripe's live-mode default per account
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Emulator:
    """A running emulator: point StripeClient's `api` and `meter_events` bases at `url`.

    `received` holds the last API calls as they arrived (control calls apart), as many as
    `run_stripe_emulator(keep_requests=...)` asked for (none by default), for tests that
    check what went over the wire. `webhooks` delivers the account's events to the endpoint
    configured with `webhooks.configure(url, secrets)`; `notifier` makes them.
    """

    url: str
    state: EmulatorState
    faults: Faults
    rate_limit: RefusingRateLimit
    webhooks: WebhookSender
    notifier: Notifier
    received: deque[ApiRequest] = field(default_factory=lambda: deque(maxlen=0))

    def reset(self) -> None:
        """Empty the account, clear faults, refill the rate limit, forget deliveries."""
        self.state.reset()
        self.faults.clear()
        self.rate_limit.reset()
        self.notifier.reset()
        self.webhooks.reset()

    def close(self) -> None:
        """Stop the webhook threads."""
        self.notifier.close()
        self.webhooks.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stalled or idle keep-alive connection must not block exit

    def __init__(self, address: tuple[str, int], emulator_of: Callable[[str], Emulator]) -> None:
        super().__init__(address, _Handler)
        host, port = self.server_address[:2]
        self.emulator = emulator_of(f"http://{host!s}:{port}")
        self.api = StripeApi(
            self.emulator.state, self.emulator.faults, self.emulator.rate_limit, CallSlots()
        )
        # Added to every API call's answer: the round trip to Stripe (tens of ms from a data
        # centre), which the loopback hides; a benchmark sets it to show what the number of
        # calls in flight does.
        self.latency_s = 0.0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # close idle keep-alive connections so their threads end
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK (about 40 ms), capping every keep-alive connection near 25 calls/s.
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: a line per call would bury test output; the state keeps the record."""

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        url = urlsplit(self.path)
        request = ApiRequest(
            method=self.command,
            path=url.path,
            query=url.query,
            headers={name.lower(): value for name, value in self.headers.items()},
            body=self.rfile.read(length) if length else b"",
        )
        try:
            if url.path.startswith("/_emulator/"):
                response = _control(self.server.emulator, request)
            else:
                if self.server.latency_s:
                    time.sleep(self.server.latency_s)
                self.server.emulator.received.append(request)
                response = self.server.api.handle(request)
        except Exception:
            # The edge of the request loop: an emulator bug must reach the client as a 500
            # (which the SDK retries) and the log, not as a silently dropped socket.
            _log.exception("stripe emulator failed on %s %s", self.command, self.path)
            response = error_response(
                StripeApiError(500, "The Stripe emulator failed; see its log.", type="api_error"),
                request,
            )
        if response.drop:
            # Close without a byte of answer: the client sees the connection die mid-call.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(response.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)


def _control(emulator: Emulator, request: ApiRequest) -> ApiResponse:
    """The test-only API: GET events/totals, POST reset, GET (fired)/POST/DELETE faults,
    POST release."""
    target = (request.method, request.path.removeprefix("/_emulator/").rstrip("/"))
    state = emulator.state
    body: object
    if target == ("GET", "events"):
        body = {
            "object": "list",
            "data": [e.to_json() for e in state.events],
            "async_errors": [e.to_json() for e in state.async_errors],
        }
    elif target == ("GET", "totals"):
        body = {
            "data": [
                {"event_name": name, "customer": customer, "total": str(total)}
                for (name, customer), total in sorted(state.totals().items())
            ]
        }
    elif target == ("POST", "reset"):
        emulator.reset()
        body = {"reset": True}
    elif target == ("GET", "faults"):
        # How often each kind fired, so a test in another process can see its faults were met.
        fired: dict[str, int] = {}
        for kind, _path in emulator.faults.fired:
            fired[kind] = fired.get(kind, 0) + 1
        body = {"fired": fired}
    elif target == ("POST", "faults"):
        return _inject(emulator.faults, request.body)
    elif target == ("DELETE", "faults"):
        emulator.faults.clear()
        body = {"cleared": True}
    elif target == ("POST", "faults/release"):
        emulator.faults.release()
        body = {"released": True}
    elif target[1] in _WEBHOOK_CONTROLS:
        return _webhook_control(emulator, request)
    else:
        return _control_error(404, f"Unknown control call {request.method} {request.path}.")
    return ApiResponse(200, json.dumps(body).encode())


_WEBHOOK_CONTROLS = frozenset(
    {"webhooks", "webhooks/resend", "invoices", "subscriptions", "billing_alerts"}
)


def _webhook_control(emulator: Emulator, request: ApiRequest) -> ApiResponse:
    """GET webhooks (deliveries); POST webhooks {"url", "secrets"}; POST webhooks/resend
    {"event_id"}; POST invoices / subscriptions / billing_alerts: make and send one event
    (see Notifier)."""
    target = (request.method, request.path.removeprefix("/_emulator/").rstrip("/"))
    if target == ("GET", "webhooks"):
        deliveries = [d.to_json() for d in emulator.webhooks.deliveries()]
        return ApiResponse(200, json.dumps({"data": deliveries}).encode())
    try:
        spec = json.loads(request.body or b"{}")
        if not isinstance(spec, dict) or request.method != "POST":
            raise ValueError("POST a JSON object")
        body: object
        if target[1] == "webhooks":
            secrets = spec.get("secrets") or []
            if not isinstance(secrets, list) or not all(isinstance(x, str) for x in secrets):
                raise ValueError("secrets must be a list of strings")
            emulator.webhooks.configure(spec.get("url"), secrets)
            body = {"configured": spec.get("url")}
        elif target[1] == "webhooks/resend":
            body = {"resent": emulator.webhooks.resend(str(spec.get("event_id")))}
        elif target[1] == "invoices":
            body = emulator.notifier.invoice_event(spec)
        elif target[1] == "subscriptions":
            body = emulator.notifier.subscription_event(spec)
        else:
            body = emulator.notifier.billing_alert_event(spec)
    except StripeApiError as exc:
        return _control_error(exc.status, exc.message)
    except (TypeError, ValueError) as exc:
        return _control_error(400, f"Bad webhook control call {request.body!r}: {exc}.")
    return ApiResponse(200, json.dumps(body).encode())


def _inject(faults: Faults, raw: bytes) -> ApiResponse:
    """POST /_emulator/faults {"kind": ..., "count": 1, "probability": null, "path_prefix": ...}."""
    try:
        spec = json.loads(raw or b"{}")
        if not isinstance(spec, dict):
            raise ValueError("body must be a JSON object")
        faults.inject(
            spec["kind"],
            count=spec.get("count", 1),
            probability=spec.get("probability"),
            path_prefix=spec.get("path_prefix"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        return _control_error(400, f"Bad fault spec {raw!r}: {exc!r}.")
    return ApiResponse(200, json.dumps({"injected": spec}).encode())


def _control_error(status: int, message: str) -> ApiResponse:
    return ApiResponse(status, json.dumps({"error": {"message": message}}).encode())


def _make_server(
    host: str,
    port: int,
    *,
    rate_limit_per_s: int | None,
    clock: EpochSeconds,
    rate_clock: Callable[[], float],
    fault_seed: int,
    keep_requests: int = 0,
) -> _Server:
    def emulator_of(url: str) -> Emulator:
        state = EmulatorState(clock)
        sender = WebhookSender()
        return Emulator(
            url,
            state,
            Faults(fault_seed),
            RefusingRateLimit(rate_limit_per_s, rate_clock),
            sender,
            Notifier(state, sender),
            deque(maxlen=keep_requests),
        )

    return _Server((host, port), emulator_of)


@contextmanager
def run_stripe_emulator(
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    rate_limit_per_s: int | None = DEFAULT_RATE_LIMIT_PER_S,
    clock: EpochSeconds = time.time,
    rate_clock: Callable[[], float] = time.monotonic,
    fault_seed: int = 0,
    keep_requests: int = 0,
    latency_s: float = 0.0,
) -> Iterator[Emulator]:
    """Serve the emulator on a background thread for the `with` body, then stop it.

    `port=0` picks a free port (read it from `.url`). `clock` is Stripe's clock (Unix
    seconds: timestamps, session expiry, the 24 h cancel window); `rate_clock` drives the
    account rate limit; `rate_limit_per_s=None` turns the account rate limit off;
    `keep_requests`: how many of the latest API calls `Emulator.received` keeps;
    `latency_s`: added to every API call (a network's round trip).
    """
    server = _make_server(
        host,
        port,
        rate_limit_per_s=rate_limit_per_s,
        clock=clock,
        rate_clock=rate_clock,
        fault_seed=fault_seed,
        keep_requests=keep_requests,
    )
    server.latency_s = latency_s
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server.emulator
    finally:
        server.emulator.faults.release()  # let stalled calls finish instead of hanging
        server.shutdown()
        server.server_close()
        thread.join()
        server.emulator.close()


def serve_forever(
    host: str = "127.0.0.1",
    port: int = 12111,
    *,
    rate_limit_per_s: int | None = DEFAULT_RATE_LIMIT_PER_S,
    fault_seed: int = 0,
    on_ready: Callable[[Emulator], None] | None = None,
    webhook_url: str | None = None,
    webhook_secrets: tuple[str, ...] = (),
) -> None:
    """Serve on the calling thread until interrupted (Ctrl-C returns normally).

    `on_ready` gets the running emulator once the port is bound, e.g. to print its url.
    `webhook_url`: where the account's events are sent, signed with `webhook_secrets`.
    """
    server = _make_server(
        host,
        port,
        rate_limit_per_s=rate_limit_per_s,
        clock=time.time,
        rate_clock=time.monotonic,
        fault_seed=fault_seed,
    )
    if webhook_url:
        server.emulator.webhooks.configure(webhook_url, webhook_secrets)
    with server:
        if on_ready is not None:
            on_ready(server.emulator)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            return
        finally:
            server.emulator.close()
