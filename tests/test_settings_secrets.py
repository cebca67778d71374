"""Settings that can carry a secret: accepted in every spelling the database layer reads, never
printed, and never sent in clear text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from meterstream.db import build_engine, migrate
from meterstream.embedded import free_port
from meterstream.errors import ConfigError
from meterstream.settings import load_settings, redact_url

PASSWORD = "hunter2pw"  # noqa: S105 - a made-up password the output must not show


@pytest.mark.parametrize("scheme", ["postgres://", "postgresql://", "postgresql+psycopg://"])
def test_every_postgres_spelling_is_read_with_the_psycopg_driver(
    postgres_url: str, scheme: str
) -> None:
    given = scheme + postgres_url.split("://", 1)[1]
    settings = load_settings(database_url=given)
    assert settings.database_url.startswith("postgresql+psycopg://")
    engine = build_engine(settings)
    try:
        migrate(engine)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM window_totals")).scalar() == 0
        assert engine.url.drivername == "postgresql+psycopg"
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "url",
    [
        f"postgres://billing:{PASSWORD}@db.internal:notaport/meterstream",  # the driver refuses
        f"mysql://root:{PASSWORD}@db/meterstream",
        f"postgresql+asyncpg://billing:{PASSWORD}@db/meterstream",  # a driver we do not ship
        f"host=db user=billing password={PASSWORD}",  # libpq's key=value form, not a URL
        f"postgresql://db/meterstream?password={PASSWORD}@x&port=notaport",
    ],
)
def test_a_bad_database_url_is_named_but_its_password_never_shown(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("METERSTREAM_DATABASE_URL", url)
    with pytest.raises(ConfigError, match="METERSTREAM_DATABASE_URL") as caught:
        build_engine(load_settings())
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgresql://billing:{PASSWORD}@db:5432/meterstream", "postgresql://***@db:5432/***"),
        (f"postgresql://billing:pa/ss@{PASSWORD}@db/meterstream", "postgresql://***@db/***"),
        (f"postgresql://db/meterstream?password={PASSWORD}", "postgresql://db/***"),
        (f"postgresql://db/meterstream?password=x@{PASSWORD}", "postgresql://***"),
        (f"password={PASSWORD}", "<not shown>"),
        ("https://api.stripe.com", "https://api.stripe.com"),
    ],
)
def test_a_url_is_shown_with_its_scheme_and_host_only(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_the_settings_repr_leaves_the_database_url_out() -> None:
    settings = load_settings(database_url=f"postgresql://billing:{PASSWORD}@db/meterstream")
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://root:{PASSWORD}@db/meterstream",
        # Accepted, but nothing answers: the connection error must not quote the URL either.
        f"postgres://postgres:{PASSWORD}@127.0.0.1:{free_port()}/meterstream",
    ],
    ids=["mysql", "postgres-nothing-answers"],  # the same in every test process (xdist)
)
def test_the_command_line_never_prints_the_database_password(tmp_path: Path, url: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    done = subprocess.run(
        [sys.executable, "-m", "meterstream", "migrate"],
        env={**clean, "METERSTREAM_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert PASSWORD not in done.stdout + done.stderr
    assert done.stderr.strip()


@pytest.mark.parametrize(
    "base",
    [
        "http://api.stripe.com",
        "http://10.0.0.7:12111",
        "http://127.0.0.1.example.com",
        "http://localhost.example.com",
        "http://[::2]:80",
    ],
)
@pytest.mark.parametrize("variable", ["STRIPE_API_BASE", "STRIPE_METER_EVENTS_BASE"])
def test_http_to_a_host_that_is_not_loopback_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, base: str
) -> None:
    monkeypatch.setenv(f"METERSTREAM_{variable}", base)
    with pytest.raises(ConfigError, match=f"METERSTREAM_{variable}") as caught:
        load_settings()
    assert "clear text" in str(caught.value)
    assert "https://" in str(caught.value)


@pytest.mark.parametrize(
    "base",
    [
        "http://127.0.0.1:12111",
        "http://127.3.4.5:80",
        "http://localhost:12111",
        "http://LOCALHOST",
        "http://[::1]:12111",
        "https://api.stripe.com",
        "https://stripe-proxy.internal:8443",
    ],
)
def test_https_anywhere_and_http_on_loopback_are_accepted(base: str) -> None:
    settings = load_settings(stripe_api_base=base, stripe_meter_events_base=base)
    assert settings.stripe_api_base == base
    assert settings.meter_events_base == base


@pytest.mark.parametrize(
    "base",
    [
        f"https://user:{PASSWORD}@api.stripe.com",
        f"https://user:pa/{PASSWORD}@api.stripe.com",
        f"http://user:{PASSWORD}@127.0.0.1:12111",
    ],
)
def test_a_stripe_base_with_user_info_is_refused_without_echoing_it(base: str) -> None:
    with pytest.raises(ConfigError, match="METERSTREAM_STRIPE_API_BASE") as caught:
        load_settings(stripe_api_base=base)
    assert PASSWORD not in str(caught.value)
    assert "METERSTREAM_STRIPE_API_KEY" in str(caught.value)


def test_a_misspelt_setting_is_named_without_its_value() -> None:
    with pytest.raises(ConfigError, match="METERSTREAM_DATABSE_URL") as caught:
        load_settings(databse_url=f"postgres://billing:{PASSWORD}@db/meterstream")
    assert PASSWORD not in str(caught.value)


WEBHOOK_SECRET = "whsec_neverprintedAbc123"  # noqa: S105 - a made-up secret the output must not show


def test_webhook_secrets_are_read_comma_separated_and_never_shown() -> None:
    settings = load_settings(stripe_webhook_secret=f"{WEBHOOK_SECRET}, whsec_second2")
    assert settings.stripe_webhook_secrets == (WEBHOOK_SECRET, "whsec_second2")
    assert WEBHOOK_SECRET not in repr(settings)
    assert WEBHOOK_SECRET not in str(settings.model_dump())


@pytest.mark.parametrize(
    "given", [f"{WEBHOOK_SECRET}!", f"{WEBHOOK_SECRET},", f"sk_test_{WEBHOOK_SECRET}", ""]
)
def test_a_bad_webhook_secret_is_named_but_never_shown(given: str) -> None:
    with pytest.raises(ConfigError, match="METERSTREAM_STRIPE_WEBHOOK_SECRET") as caught:
        load_settings(stripe_webhook_secret=given)
    assert WEBHOOK_SECRET not in str(caught.value)
