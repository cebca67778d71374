"""The stripe SDK's HTTP layer on ``http.client``: pooled keep-alive connections, nothing else.

The SDK's default client goes through ``requests`` on every call (a session per thread,
adapters, a proxy lookup in the environment, urllib3's pool and retry objects, header
merging); profiled, that was about half of the v1 reporter's CPU, with 8 threads sharing one
GIL. This client implements what ``stripe.HTTPClient`` asks of a subclass (``request`` and
``close``) and nothing more, so everything that matters for billing stays in the SDK: it builds
each request, sets the Idempotency-Key once and reuses it across its own retries
(``max_network_retries``), and decides what to retry (``_should_retry``). Like the requests
client, a failed connection, a lost answer or a timeout is raised as APIConnectionError with
``should_retry=True`` (the SDK then retries with the same key); any other TLS error (a refused
certificate, a failed handshake) and a local error (a bad URL or header) are not retried.

Connections are kept per (scheme, host, port) in a pool shared by the threads: a thread takes
an idle one (or opens one) for a call and gives it back after reading the whole answer, so a
connection serves one call at a time and outlives the reporter's per-cycle threads. One the
server closed while idle is noticed before reuse (its socket reads as ready) and replaced,
instead of costing a failed call and a retry. :meth:`KeepAliveClient.close` closes the
idle connections and, from then on, each connection whose call ends. It speaks to no proxy:
:func:`proxy_configured` tells the caller to keep the requests client when one applies.
"""

from __future__ import annotations

import http.client
import io
import select
import ssl
import threading
import urllib.parse
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NoReturn

import requests.utils  # the stripe SDK's own dependency
import stripe

_Key = tuple[str, str, int]  # (scheme, host, port)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ResponseHeaders(Mapping[str, str]):
    """Response headers looked up regardless of case (the SDK asks for both "Request-Id"
    and "request-id", as requests' CaseInsensitiveDict allows); a header sent more than once
    reads as its values joined with ", ", in the order received, as requests gives it."""

    __slots__ = ("_by_name",)

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        by_name: dict[str, str] = {}
        for name, value in pairs:
            lowered = name.lower()
            seen = by_name.get(lowered)
            by_name[lowered] = value if seen is None else f"{seen}, {value}"
        self._by_name = by_name

    def __getitem__(self, name: str) -> str:
        return self._by_name[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


def proxy_configured(url: str) -> bool:
    """True if requests would send a call to ``url`` through a proxy named in the environment:
    the scheme's own (HTTPS_PROXY, ...) or ALL_PROXY, unless NO_PROXY lists the host. Decided
    by requests' own functions, so the answer is the requests client's."""
    proxies = requests.utils.get_environ_proxies(url)
    return requests.utils.select_proxy(url, proxies) is not None


class CountsRetries(stripe.HTTPClient):
    """Calls ``_on_retry`` each time the SDK decides to retry a call (to count retries)."""

    _on_retry: Callable[[], None] | None = None

    def _should_retry(
        self,
        response: Any,
        api_connection_error: Any,
        num_retries: int,
        max_network_retries: int | None,
    ) -> bool:
        retry = bool(
            super()._should_retry(response, api_connection_error, num_retries, max_network_retries)
        )
        if retry and self._on_retry is not None:
            self._on_retry()
        return retry


class KeepAliveClient(CountsRetries):
    """A stripe.HTTPClient on http.client with pooled keep-alive connections (module doc).

    ``on_retry`` is called each time the SDK decides to retry a call (to count retries).
    """

    name = "http.client"

    def __init__(self, timeout_s: float, on_retry: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._timeout_s = timeout_s
        self._on_retry = on_retry
        # verify against the SDK's CA bundle, as the requests client does
        self._tls = ssl.create_default_context(cafile=stripe.ca_bundle_path)
        self._lock = threading.Lock()
        self._idle: dict[_Key, deque[http.client.HTTPConnection]] = {}
        self._keys: dict[tuple[str, str], _Key] = {}
        self._closed = False
        # Close idle sockets when the client is dropped (no ResourceWarning, no leaked fds).
        weakref.finalize(self, _close_all, self._idle, self._lock)

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        """One call on a pooled connection: (body as bytes, as the requests client gives it;
        status; headers). APIConnectionError if the call failed on the way (module doc)."""
        key, target = self._target(url)
        body = post_data.encode("utf-8") if isinstance(post_data, str) else post_data
        connection = self._take(key)
        connecting = connection.sock is None
        try:
            if connecting:
                connection.connect()  # apart, so a failure here is known to have sent nothing
                connecting = False
            connection.request(method.upper(), target, body, dict(headers or {}))
            response = connection.getresponse()
            content = response.read()
        except Exception as exc:
            connection.close()  # its state is unknown: never reuse it
            _raise_connection_error(exc, connecting=connecting)
        except BaseException:
            connection.close()
            raise
        self._give_back(key, connection)
        return content, response.status, ResponseHeaders(response.getheaders())

    def request_stream(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        """Not used by the reporter (no streamed answers); read whole, served as a stream."""
        content, status, found = self.request(method, url, headers, post_data)
        return io.BytesIO(content), status, found

    def close(self) -> None:
        """Close every idle connection, and from now on each connection whose call ends (a
        call in flight finishes on its own connection, which is then closed, not pooled). A
        later call still works, on a connection of its own that is closed after it."""
        self._closed = True  # before the sweep: see _give_back
        _close_all(self._idle, self._lock)

    def _target(self, url: str) -> tuple[_Key, str]:
        """((scheme, host, port), path and query) of ``url``; the parse is cached per base."""
        scheme, _, rest = url.partition("://")
        netloc, slash, path = rest.partition("/")
        key = self._keys.get((scheme, netloc))
        if key is None:
            parts = urllib.parse.urlsplit(f"{scheme}://{netloc}")
            lowered = parts.scheme.lower()
            if lowered not in _DEFAULT_PORTS or not parts.hostname:
                raise _connection_error(
                    f"cannot call {scheme}://{netloc}: only http and https addresses with a "
                    "host are supported (check METERSTREAM_STRIPE_API_BASE)",
                    retry=False,
                )
            key = (lowered, parts.hostname, parts.port or _DEFAULT_PORTS[lowered])
            self._keys[(scheme, netloc)] = key
        return key, "/" + path if slash else "/"

    def _take(self, key: _Key) -> http.client.HTTPConnection:
        idle = self._idle.get(key)
        while idle:
            try:
                connection = idle.pop()  # deque.pop is atomic: no lock on the hot path
            except IndexError:
                break
            if not _dropped(connection):
                return connection
            connection.close()
        scheme, host, port = key
        if scheme == "https":
            return http.client.HTTPSConnection(
                host, port, timeout=self._timeout_s, context=self._tls
            )
        return http.client.HTTPConnection(host, port, timeout=self._timeout_s)

    def _give_back(self, key: _Key, connection: http.client.HTTPConnection) -> None:
        if self._closed:
            connection.close()
            return
        idle = self._idle.get(key)
        if idle is None:
            with self._lock:
                idle = self._idle.setdefault(key, deque())
        idle.append(connection)
        if self._closed:
            # close() ran between the check above and the append, and its sweep may have
            # missed this connection: sweep again (close() sets the flag before sweeping, so
            # one of the two sweeps sees every connection given back).
            _close_all(self._idle, self._lock)


def _dropped(connection: http.client.HTTPConnection) -> bool:
    """True if an idle connection's socket is readable: closed by the server (or holding
    bytes nobody asked for); either way it must not carry another call."""
    sock = connection.sock
    if sock is None:
        return False  # not connected: http.client connects on the next request
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _close_all(idle: dict[_Key, deque[http.client.HTTPConnection]], lock: threading.Lock) -> None:
    with lock:
        pools = list(idle.values())
    for pooled in pools:
        while pooled:
            try:
                pooled.pop().close()
            except IndexError:
                break


# Failures of the network during a call, retried under the same Idempotency-Key as the
# requests client retries them (its ConnectionError and Timeout): reset or closed mid-call
# (ConnectionError covers refused, reset, aborted and broken pipe; RemoteDisconnected is a
# reset), a TLS connection cut off (SSLEOFError, SSLZeroReturnError), an answer cut short
# (IncompleteRead), a timeout. Anything else is not retried: another TLS error (a refused
# certificate, a failed handshake) would fail the same way again, and a local error
# (InvalidURL, a bad header, any other HTTPException or OSError) is ours to fix.
_RETRYABLE: tuple[type[BaseException], ...] = (
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
    ConnectionError,
    http.client.RemoteDisconnected,
    http.client.IncompleteRead,
    TimeoutError,
)


def _raise_connection_error(exc: Exception, *, connecting: bool) -> NoReturn:
    """APIConnectionError for a failed call, retried (same Idempotency-Key) only when the
    network failed (_RETRYABLE), as the requests client decides. While connecting (nothing
    sent yet), any socket error but a TLS one is the network's too, as requests' "failed to
    establish a new connection" is: a name that did not resolve, no route to the host."""
    retry = isinstance(exc, _RETRYABLE) or (
        connecting and isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError)
    )
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = "Could not verify Stripe's TLS certificate; is something intercepting it?"
    elif isinstance(exc, ssl.SSLError) and not retry:
        message = "The TLS connection to Stripe failed (not retried: it would fail again)."
    elif retry:
        message = "Unexpected error communicating with Stripe."
    else:
        message = "Unexpected error preparing the call to Stripe (a local problem)."
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    raise _connection_error(f"{message}\n\n(Network error: {detail})", retry=retry) from exc


def _connection_error(message: str, *, retry: bool) -> stripe.APIConnectionError:
    # The SDK's error constructors carry no annotations.
    return stripe.APIConnectionError(message, should_retry=retry)  # type: ignore[no-untyped-call]
