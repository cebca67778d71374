"""The database that holds the API keys stops answering under a running ``meterstream serve``:
a key check that needs it is answered 503 with Retry-After (the client sends it again), never
500; once the database is back, the same request is taken."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg

from tests.conftest import POSTGRES_ADMIN_URL
from tests.ingest.http.server import Answer, Server, event


@contextmanager
def _refusing_connections(database_url: str) -> Iterator[None]:
    """The database refuses new connections and its open ones are ended, as when it is down."""
    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (name,),
        )
        try:
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def _post(server: Server, key: str, path: str = "/v1/events") -> Answer:
    if path != "/v1/events":
        return server.curl("-H", f"Authorization: Bearer {key}", path=path)
    return server.post(key, event("while-the-database-is-down"), "application/cloudevents+json")


def test_a_key_check_without_the_database_is_a_503_with_retry_after_not_a_500(
    serve: Callable[..., Server], postgres_url: str
) -> None:
    server = serve(database_url=postgres_url)
    # Made after the server read its keys, so checking it needs the database.
    key = server.create_key("producer")
    reader = server.create_key("reader", scope="read")
    with _refusing_connections(postgres_url):
        for answer in (_post(server, key), _post(server, reader, path="/v1/usage?meter=tokens")):
            assert answer.status == 503, answer
            assert answer.headers["retry-after"] == str(server.settings.http_retry_after_s)
            assert "database" in answer.json()["error"]
        assert server.curl(path="/readyz").status == 503
    assert _post(server, key).status == 202
