"""uvicorn's httptools protocol with a bound on a request's head (request line and headers).

uvicorn and httptools keep every byte of a head until it is complete, without limit: one
unauthenticated client sending headers for ever grew the server by a megabyte per megabyte sent
(measured: 100 MB of headers, +115 MB resident), so a few connections could take the server's
memory. A head over :data:`MAX_HEAD_BYTES` is answered 431 and its connection closed.
"""

from __future__ import annotations

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


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Counts the bytes of the head being read; refuses it past MAX_HEAD_BYTES."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # a connection starts with a request's head
        self._head_bytes = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
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
            self.transport.write(_ANSWER)
            self.transport.close()
