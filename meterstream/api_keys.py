"""The HTTP API's keys: made, listed, revoked, and checked on every request.

A key reads ``msk_<key_id>_<secret>``: 16 hex digits that find its row, then 256 random bits.
Only SHA-256 of the secret is stored. A slow password hash would be wrong here: it would cost
every request tens of milliseconds, and it protects low-entropy secrets, which these are not.
The digest is compared in constant time, so answer times tell nothing about it. A server keeps
the live keys it read for ``METERSTREAM_HTTP_API_KEY_CACHE_S``: a revoked key is refused
everywhere within that time, and a request costs no database query.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, get_args

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from meterstream.errors import ApiKeyError, KeysUnavailableError
from meterstream.schema import api_keys

Scope = Literal["ingest", "read", "all"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
KEY_PREFIX = "msk_"
_KEY = re.compile(r"msk_([0-9a-f]{16})_([0-9a-f]{64})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What is known of a key, never its secret."""

    name: str
    key_id: str
    source: str
    scope: Scope
    created_at: datetime
    revoked_at: datetime | None

    def allows(self, needed: Scope) -> bool:
        """Whether this key may be used for ``needed`` (ingest or read); ``all`` allows both."""
        return self.scope == "all" or self.scope == needed


# The columns of an ApiKey, in the order of its fields.
_KEY_COLUMNS = (
    api_keys.c.name,
    api_keys.c.key_id,
    api_keys.c.source,
    api_keys.c.scope,
    api_keys.c.created_at,
    api_keys.c.revoked_at,
)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def create_key(engine: Engine, name: str, source: str, scope: Scope) -> tuple[ApiKey, str]:
    """Store a new key and return it with its full text, which exists nowhere else: show it once.

    Raises ApiKeyError for a bad name, source or scope, or a name already taken (revoked keys
    keep their name, so the audit trail stays whole).
    """
    if not _NAME.fullmatch(name):
        raise ApiKeyError(
            f"name {name!r:.120}: use 1 to 100 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    if not source or len(source) > 200 or re.search(r"[\x00-\x1f\x7f]", source):
        raise ApiKeyError(
            "--source: the CloudEvents source of the producing service, 1 to 200 characters "
            "without control characters"
        )
    if scope not in SCOPES:
        raise ApiKeyError(f"--scope {scope!r}: expected one of {', '.join(SCOPES)}")
    key_id, secret = secrets.token_hex(8), secrets.token_hex(32)
    key = ApiKey(name, key_id, source, scope, datetime.now(UTC).replace(microsecond=0), None)
    try:
        with engine.begin() as connection:
            connection.execute(
                insert(api_keys).values(
                    name=name,
                    key_id=key_id,
                    secret_sha256=_digest(secret),
                    source=source,
                    scope=scope,
                    created_at=key.created_at,
                )
            )
    except IntegrityError:
        raise ApiKeyError(
            f"an API key named {name!r} exists already (revoked keys keep their name): "
            "choose another name"
        ) from None
    return key, f"{KEY_PREFIX}{key_id}_{secret}"


def list_keys(engine: Engine) -> list[ApiKey]:
    """Every key, revoked ones included, by name."""
    with engine.connect() as connection:
        rows = connection.execute(select(*_KEY_COLUMNS).order_by(api_keys.c.name)).all()
    return [ApiKey(*row) for row in rows]


def revoke_key(engine: Engine, name: str) -> ApiKey:
    """Revoke the key named ``name``; revoking it again changes nothing. Raises ApiKeyError when
    there is no such key."""
    with engine.begin() as connection:
        connection.execute(
            update(api_keys)
            .where(api_keys.c.name == name, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC).replace(microsecond=0))
        )
    for key in list_keys(engine):
        if key.name == name:
            return key
    raise ApiKeyError(f"no API key named {name!r}; meterstream api-keys list shows them")


def _live_keys(engine: Engine) -> dict[str, tuple[ApiKey, bytes]]:
    """Every live (unrevoked) key with its digest, by key id: as many rows as live keys,
    however many were made and revoked over the years."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(*_KEY_COLUMNS, api_keys.c.secret_sha256).where(api_keys.c.revoked_at.is_(None))
        ).all()
    known = len(_KEY_COLUMNS)
    return {row.key_id: (ApiKey(*row[:known]), bytes(row[known])) for row in rows}


class KeyVerifier:
    """Finds the key a request presents in a snapshot of the live keys, read whole at most
    ``ttl_s`` seconds ago: a revoked key is refused within that time.

    A key id the snapshot lacks is never remembered as unknown (a key made a moment ago must
    work at once); instead the snapshot is read again, and the caller makes misses share
    reads (:class:`meterstream.http.Authenticator`: one read at a time, each serving every
    miss that came before it). So a flood of made-up keys costs the database one query at a
    time, not one per request, and never evicts the live keys.

    :meth:`cached` answers from memory only; :meth:`refresh` reads the database (blocking: call
    it from a worker thread).
    """

    def __init__(
        self, engine: Engine, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._engine = engine
        self._ttl_s = ttl_s
        self._clock = clock
        self._keys: dict[str, tuple[ApiKey, bytes]] = {}
        self._read_started: float | None = None

    @staticmethod
    def key_id_of(presented: str) -> str | None:
        """The key id of a well-formed key, else None (then no database read is needed)."""
        match = _KEY.fullmatch(presented)
        return match.group(1) if match else None

    def now(self) -> float:
        """The verifier's clock (monotonic seconds)."""
        return self._clock()

    def read_since(self, at: float) -> bool:
        """Whether the snapshot was read by a query started at ``at`` or later."""
        return self._read_started is not None and self._read_started >= at

    def cached(self, presented: str) -> ApiKey | Literal[False] | None:
        """The live key, None when refused (malformed, wrong secret), False when memory cannot
        tell (the snapshot is stale, or lacks the key id: :meth:`refresh`, then :meth:`known`)."""
        match = _KEY.fullmatch(presented)
        if match is None:
            return None
        started = self._read_started
        if started is None or started + self._ttl_s <= self._clock():
            return False
        found = self._keys.get(match.group(1))
        return False if found is None else _checked(found, match.group(2))

    def known(self, presented: str) -> ApiKey | None:
        """The live key in the snapshot as it is, or None (unknown, revoked, wrong secret)."""
        match = _KEY.fullmatch(presented)
        if match is None:
            return None
        return _checked(self._keys.get(match.group(1)), match.group(2))

    def refresh(self) -> None:
        """Read the live keys again (blocking). Raises KeysUnavailableError when the database
        does not answer; the snapshot is then left as it was."""
        started = self._clock()
        try:
            self._keys = _live_keys(self._engine)
        except SQLAlchemyError as exc:
            raise KeysUnavailableError(
                f"the database did not answer a read of the API keys ({type(exc).__name__}); "
                "check METERSTREAM_DATABASE_URL and that the database is up"
            ) from exc
        self._read_started = started

    def load(self, presented: str) -> ApiKey | None:
        """Read the live keys, then check ``presented`` (blocking; for callers without an
        event loop). Raises KeysUnavailableError when the database does not answer."""
        if _KEY.fullmatch(presented) is None:
            return None
        self.refresh()
        return self.known(presented)


def _checked(found: tuple[ApiKey, bytes] | None, secret: str) -> ApiKey | None:
    if found is None:
        # The same work as for a known key, so timing does not tell known ids from unknown.
        hmac.compare_digest(_digest(secret), bytes(32))
        return None
    key, stored = found
    if not hmac.compare_digest(_digest(secret), stored) or key.revoked_at is not None:
        return None
    return key
