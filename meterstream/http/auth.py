"""``Authorization: Bearer <api key>`` on the routes that need a key, with its scope.

The key is never logged, never put in an error or a metric label: answers say only which rule
failed. Keys the server has not seen share database reads: one at a time (KeyVerifier). When
such a read finds the database down, the answer is 503 with Retry-After: the client cannot
tell an outage from its own error in a 500, and would not send the request again. So is a read
the database does not finish within ``read_timeout_s`` (a frozen host takes the connection and
never answers): the read is left to end on its own, and no other starts while it hangs.
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at run time, and the
# dependencies they name are local to the function that builds the router.

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from meterstream.api_keys import ApiKey, KeyVerifier, Scope
from meterstream.errors import KeysUnavailableError

_BEARER = HTTPBearer(
    auto_error=False,
    description="an API key made with `meterstream api-keys create`",
)
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
# How long a request waits for a read of the keys before it is answered 503.
_READ_TIMEOUT_S = 5.0


class Authenticator:
    """Makes the FastAPI dependency that admits a request with a live key of a scope."""

    def __init__(
        self, verifier: KeyVerifier, *, retry_after_s: int, read_timeout_s: float = _READ_TIMEOUT_S
    ) -> None:
        self._verifier = verifier
        self._retry_after_s = retry_after_s  # METERSTREAM_HTTP_RETRY_AFTER_S
        self._read_timeout_s = read_timeout_s
        # One read of the keys at a time: misses wait for it rather than each reading.
        self._reading = asyncio.Lock()
        # A read that outlived read_timeout_s, still blocked in a worker thread.
        self._hung: asyncio.Future[None] | None = None

    async def key_of(self, presented: str) -> ApiKey | None:
        """The live key ``presented`` names, or None. On a miss the keys are read again, unless
        a read that started after this request arrived has done so already: however many
        made-up keys arrive, the database serves one query at a time.

        Raises HTTPException 503 with Retry-After when the keys must be read and the database
        does not answer."""
        found = self._verifier.cached(presented)
        if found is not False:
            return found
        arrived = self._verifier.now()
        async with self._reading:
            if not self._verifier.read_since(arrived):
                try:
                    await self._refresh()
                except KeysUnavailableError as exc:
                    raise HTTPException(
                        503,
                        f"{exc}: send the request again after {self._retry_after_s} s "
                        "(nothing of it was taken)",
                        headers={"Retry-After": str(self._retry_after_s)},
                    ) from exc
        return self._verifier.known(presented)

    async def _refresh(self) -> None:
        """Read the keys in a worker thread for up to read_timeout_s. Raises
        KeysUnavailableError when the database fails, or does not answer in time."""
        if self._hung is not None and not self._hung.done():
            # Another thread would block as well, and each would hold a worker for good.
            raise KeysUnavailableError(
                "the database has not answered a read of the API keys for more than "
                f"{self._read_timeout_s:g} s; check that it is up and reachable"
            )
        read = asyncio.ensure_future(run_in_threadpool(self._verifier.refresh))
        try:
            await asyncio.wait_for(asyncio.shield(read), self._read_timeout_s)
        except TimeoutError:
            self._hung = read
            # Its outcome, when it comes, is no request's: retrieved so it is not logged.
            read.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise KeysUnavailableError(
                f"the database did not answer a read of the API keys in {self._read_timeout_s:g}"
                " s; check that it is up and reachable"
            ) from None

    def require(self, scope: Scope) -> Callable[..., Awaitable[ApiKey]]:
        """A dependency returning the request's key; 401 without a live key, 403 when the key's
        scope does not cover ``scope``."""

        async def api_key(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
        ) -> ApiKey:
            if credentials is None:
                raise HTTPException(401, "send Authorization: Bearer <api key>", headers=_CHALLENGE)
            key = await self.key_of(credentials.credentials)
            if key is None:
                raise HTTPException(
                    401,
                    "the API key is unknown or revoked: meterstream api-keys list shows the "
                    "live keys",
                    headers=_CHALLENGE,
                )
            if not key.allows(scope):
                raise HTTPException(
                    403, f"API key {key.name!r} has scope {key.scope!r}; this needs {scope!r}"
                )
            return key

        return api_key
