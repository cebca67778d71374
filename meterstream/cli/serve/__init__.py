"""``meterstream serve`` (the HTTP API) and ``meterstream api-keys`` for the command line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click
import orjson

from meterstream.cli.exits import failed, settings_or_exit
from meterstream.cli.logs import LogOptions
from meterstream.errors import MeterstreamError

if TYPE_CHECKING:
    from sqlalchemy import Engine


@click.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the HTTP API on METERSTREAM_HTTP_HOST:METERSTREAM_HTTP_PORT (127.0.0.1:8480).

    POST /v1/events takes usage events (CloudEvents, one, a batch, or binary mode) with an API
    key (meterstream api-keys create); /healthz, /readyz, /metrics and /openapi.json as well.
    Ctrl-C or SIGTERM stops it after the requests in hand.
    """
    import uvicorn

    from meterstream.cli.serve.app import ServerParts, build_app
    from meterstream.cli.serve.bounded_http import bounded_protocol
    from meterstream.db import build_engine
    from meterstream.meters import load_catalogue
    from meterstream.metrics import HttpMetrics
    from meterstream.metrics_endpoint import serve_metrics
    from meterstream.settings import check_http_batch

    settings = settings_or_exit()
    options = ctx.find_object(LogOptions) or LogOptions()
    try:
        check_http_batch(settings)
        catalogue = load_catalogue(settings.meters_file)
    except MeterstreamError as exc:
        raise failed(exc) from exc
    engine = build_engine(settings)
    try:
        _check_schema(engine)
        metrics = HttpMetrics()
        app = build_app(ServerParts(settings, catalogue, engine, metrics))
        # /metrics on the API port, and on the metrics port as the other stages serve it (what
        # Prometheus scrapes inside a deployment's network).
        serve_metrics(settings, metrics.registry)
        click.echo(
            f"meterstream serve on http://{settings.http_host}:{settings.http_port} "
            f"(topic {settings.topic!r})",
            err=True,
        )
        uvicorn.Server(
            uvicorn.Config(
                app,
                host=settings.http_host,
                port=settings.http_port,
                loop="uvloop",
                # httptools, with bounds on each request's head (bounded_http.py).
                http=bounded_protocol(settings.http_head_timeout_s),
                lifespan="on",
                access_log=False,
                log_level=options.level,
                # Our logging configuration stays (the group's --log-format).
                log_config=None,
                server_header=False,
            )
        ).run()
    finally:
        engine.dispose()


def _check_schema(engine: Engine) -> None:
    from sqlalchemy import func, select
    from sqlalchemy.exc import SQLAlchemyError

    from meterstream.schema import api_keys

    try:
        with engine.connect() as connection:
            connection.execute(select(func.count()).select_from(api_keys)).scalar_one()
    except SQLAlchemyError as exc:
        raise failed(
            MeterstreamError(
                "the database has no api_keys table (or does not answer: "
                f"{type(exc).__name__}): run meterstream migrate"
            )
        ) from None


@click.group("api-keys")
def api_keys_group() -> None:
    """Make, list and revoke the HTTP API's keys (stored as SHA-256 digests only)."""


@api_keys_group.command("create")
@click.argument("name")
@click.option(
    "--source",
    required=True,
    help="the CloudEvents source every event sent with this key must carry",
)
@click.option(
    "--scope",
    type=click.Choice(["ingest", "read", "all"]),
    default="ingest",
    show_default=True,
    help="ingest: POST /v1/events; read: the usage reads; all: both",
)
def create(name: str, source: str, scope: str) -> None:
    """Make a key and print it once: it is stored only as a digest and cannot be shown again."""
    from meterstream.api_keys import create_key

    with _engine() as engine:
        try:
            key, text = create_key(engine, name, source, scope)  # type: ignore[arg-type]  # click.Choice checked it
        except MeterstreamError as exc:
            raise failed(exc) from exc
    click.echo(text)
    click.echo(
        f"API key {key.name!r} (scope {key.scope}, source {key.source!r}): shown once, keep it "
        "in your secret store; send it as Authorization: Bearer <key>",
        err=True,
    )


@api_keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="one JSON array of objects")
def list_command(as_json: bool) -> None:
    """Every key with its source, scope and dates (never the key itself)."""
    from meterstream.api_keys import list_keys

    with _engine() as engine:
        keys = list_keys(engine)
    records = [
        {
            "name": key.name,
            "key_id": key.key_id,
            "source": key.source,
            "scope": key.scope,
            "created_at": _iso(key.created_at),
            "revoked_at": _iso(key.revoked_at) if key.revoked_at else None,
        }
        for key in keys
    ]
    if as_json:
        click.echo(orjson.dumps(records).decode())
        return
    click.echo(f"{'name':<24} {'scope':<7} {'source':<32} {'created_at':<21} revoked_at")
    for record in records:
        click.echo(
            f"{record['name']:<24} {record['scope']:<7} {record['source']:<32} "
            f"{record['created_at']:<21} {record['revoked_at'] or '-'}"
        )


@api_keys_group.command("revoke")
@click.argument("name")
def revoke(name: str) -> None:
    """Revoke a key: every running server refuses it within METERSTREAM_HTTP_API_KEY_CACHE_S."""
    from meterstream.api_keys import revoke_key

    settings = settings_or_exit()
    with _engine() as engine:
        try:
            key = revoke_key(engine, name)
        except MeterstreamError as exc:
            raise failed(exc) from exc
    click.echo(
        f"API key {key.name!r} revoked at {_iso(key.revoked_at) if key.revoked_at else '?'}; "
        f"running servers refuse it within {settings.http_api_key_cache_s:g} s"
    )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@contextmanager
def _engine() -> Iterator[Engine]:
    """An engine on METERSTREAM_DATABASE_URL, disposed at the end."""
    from meterstream.db import build_engine

    engine = build_engine(settings_or_exit())
    try:
        _check_schema(engine)
        yield engine
    finally:
        engine.dispose()


SERVE_COMMANDS: list[click.Command] = [serve, api_keys_group]
