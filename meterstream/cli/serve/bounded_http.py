"""uvicorn's httptools protocol with bounds on a request's head (request line and headers).

uvicorn and httptools keep every byte of a head until it is complete, without limit and without
a deadline: one unauthenticated client sending headers for ever grew the server by a megabyte
per megabyte sent (measured: 100 MB of headers, +115 MB resident), and a client trickling them
(slowloris), or sending nothing after connecting, held its connection for ever. A head over
:data:`MAX_HEAD_BYTES` is answered 431, one not complete within ``head_timeout_s`` of its first
byte (or of the connection, for the first) is cut off; both close the connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Generous for any real client (h11's default is 16 KiB); an API key is under 100 bytes.
MAX_HEAD_BYTES = 64 * 1024
_REFUSAL = b"the request's headers exceed 65536 bytes"
_ANSWER = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: " + str(len(_REFUSAL)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _REFUSAL
)


def bounded_protocol(head_timeout_s: float) -> type[HttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, heads due within ``head_timeout_s``."""

    class BoundedHttpToolsProtocol(_Bounded):
        _head_timeout_s = head_timeout_s

    return BoundedHttpToolsProtocol


class _Bounded(HttpToolsProtocol):
    """Counts the bytes of the head being read and times it; refuses it past either bound."""

    _head_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # a connection starts with a request's head
        self._head_bytes = 0
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._start_head_deadline()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_deadline()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        # Only a chunk that began and ended inside one head is counted whole (a chunk where a
        # head begins may hold the end of the previous body): never more than the head's bytes.
        began_in_head = self._in_head
        super().data_received(data)
        if not (began_in_head and self._in_head) or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._in_head = False
            self._cancel_head_deadline()
            self.transport.write(_ANSWER)
            self.transport.close()

    def _start_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self._head_timeout_s, self._head_overdue)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_overdue(self) -> None:
        self._head_deadline = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()
