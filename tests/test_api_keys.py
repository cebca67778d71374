"""meterstream.api_keys on PostgreSQL and SQLite: keys made, checked, cached and revoked."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from fastapi import HTTPException
from sqlalchemy import Engine, create_engine, event, select

from meterstream.api_keys import ApiKey, KeyVerifier, create_key, list_keys, revoke_key
from meterstream.errors import ApiKeyError
from meterstream.http import Authenticator
from meterstream.schema import api_keys


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_key_is_stored_as_a_digest_and_checked_through_the_cache(
    migrated_engine: Engine,
) -> None:
    key, text = create_key(migrated_engine, "checkout", "checkout-svc", "ingest")
    with migrated_engine.connect() as connection:
        row = connection.execute(select(api_keys)).one()
    secret = text.rsplit("_", 1)[1]
    assert secret.encode() not in bytes(row.secret_sha256) and secret not in str(tuple(row))
    clock = _Clock()
    verifier = KeyVerifier(migrated_engine, ttl_s=5.0, clock=clock)
    assert verifier.cached(text) is False  # not read yet
    assert verifier.load(text) == key
    assert verifier.cached(text) == key
    wrong = text[:-1] + ("0" if text[-1] != "0" else "1")
    assert verifier.cached(wrong) is None  # same id, another secret: refused from the cache
    assert verifier.cached("Bearer nonsense") is None

    revoke_key(migrated_engine, "checkout")
    assert verifier.cached(text) == key  # within the cache period the server still trusts it
    clock.now += 5.0
    assert verifier.cached(text) is False
    assert verifier.load(text) is None
    assert verifier.cached(text) is False  # not among the live keys: memory cannot tell
    assert [(k.name, k.revoked_at is not None) for k in list_keys(migrated_engine)] == [
        ("checkout", True)
    ]


def test_made_up_keys_share_database_reads_and_a_key_made_after_a_miss_works_at_once(
    migrated_engine: Engine,
) -> None:
    # Each made-up key used to cost a database read of its own (and 10,000 of them emptied
    # the cache of live keys): one client could hold every pool connection.
    key, text = create_key(migrated_engine, "live", "svc", "ingest")
    reads: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "api_keys" in statement:
            reads.append(statement)

    event.listen(migrated_engine, "before_cursor_execute", count)
    authenticator = Authenticator(KeyVerifier(migrated_engine, ttl_s=60.0), retry_after_s=5)
    made_up = [f"msk_{i:016x}_{'b' * 64}" for i in range(300)]

    async def flood() -> list[ApiKey | None]:
        return await asyncio.gather(*(authenticator.key_of(k) for k in [text, *made_up]))

    try:
        answers = asyncio.run(flood())
        assert answers == [key] + [None] * 300
        assert len(reads) <= 2, len(reads)
        reads.clear()
        assert asyncio.run(authenticator.key_of(text)) == key
        assert reads == []  # the live key is still known from memory
        # A key made after a miss is not hidden by it.
        newer, newer_text = create_key(migrated_engine, "newer", "svc", "read")
        assert asyncio.run(authenticator.key_of(newer_text)) == newer
    finally:
        event.remove(migrated_engine, "before_cursor_execute", count)


@pytest.mark.parametrize(
    ("name", "source", "scope", "words"),
    [
        ("", "s", "ingest", "name"),
        ("has space", "s", "ingest", "name"),
        ("ok", "", "ingest", "--source"),
        ("ok", "a\x00b", "ingest", "--source"),
        ("ok", "s", "admin", "--scope"),
    ],
)
def test_bad_names_sources_and_scopes_are_refused(
    migrated_engine: Engine, name: str, source: str, scope: str, words: str
) -> None:
    with pytest.raises(ApiKeyError, match=words):
        create_key(migrated_engine, name, source, scope)  # type: ignore[arg-type]


def test_a_name_is_never_reused_and_revoking_an_unknown_name_says_so(
    migrated_engine: Engine,
) -> None:
    create_key(migrated_engine, "svc", "s", "all")
    revoke_key(migrated_engine, "svc")
    with pytest.raises(ApiKeyError, match="exists already"):
        create_key(migrated_engine, "svc", "s", "all")
    with pytest.raises(ApiKeyError, match="no API key named"):
        revoke_key(migrated_engine, "nobody")


def test_a_database_that_accepts_connections_but_never_answers_is_a_503_not_a_hang() -> None:
    # A frozen database host (or a half-open connection) completes the TCP handshake and then
    # says nothing: the key read blocks for good. Requests must still be answered, 503.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel accepts into the backlog; nobody ever answers
        port = silent.getsockname()[1]
        engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/x")
        authenticator = Authenticator(
            KeyVerifier(engine, ttl_s=5.0), retry_after_s=5, read_timeout_s=0.2
        )
        presented = "msk_" + "0" * 16 + "_" + "0" * 64

        async def three_requests() -> list[BaseException | ApiKey | None]:
            checks = [authenticator.key_of(presented) for _ in range(3)]
            return await asyncio.wait_for(asyncio.gather(*checks, return_exceptions=True), 30)

        answers = asyncio.run(three_requests())
        for answer in answers:
            assert isinstance(answer, HTTPException), answer
            assert answer.status_code == 503
            assert answer.headers == {"Retry-After": "5"}
        engine.dispose()
