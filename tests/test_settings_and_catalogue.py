"""Settings and the meter catalogue: bad input fails with the variable or meter, key and reason."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterstream.errors import CatalogueError, ConfigError
from meterstream.meters import load_catalogue, parse_catalogue
from meterstream.settings import check_http_batch, load_settings
from tests.conftest import EXAMPLE_METERS


def test_defaults_run_the_embedded_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("METERSTREAM_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert settings.topic == "meterstream.usage"
    assert settings.database_url.startswith("sqlite:///")
    assert settings.horizon_days == 35


def test_environment_variables_are_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERSTREAM_KAFKA_BOOTSTRAP", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("METERSTREAM_TOPIC", "usage")
    monkeypatch.setenv("METERSTREAM_DATABASE_URL", "postgresql+psycopg://db/meter")
    monkeypatch.setenv("METERSTREAM_STRIPE_API_KEY", "sk_test_abc")
    monkeypatch.setenv("METERSTREAM_STRIPE_API_BASE", "http://127.0.0.1:12111/")
    settings = load_settings()
    assert settings.kafka_bootstrap == "kafka-1:9092,kafka-2:9092"
    assert settings.topic == "usage"
    assert settings.stripe_api_base == "http://127.0.0.1:12111"
    assert settings.meter_events_base == "http://127.0.0.1:12111"
    assert "sk_test_abc" not in repr(settings)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("METERSTREAM_KAFKA_BOOTSTRAP", "localhost", "METERSTREAM_KAFKA_BOOTSTRAP=localhost: "),
        ("METERSTREAM_TOPIC_PARTITIONS", "0", "METERSTREAM_TOPIC_PARTITIONS=0: "),
        ("METERSTREAM_DATABASE_URL", "mysql://x", "expected a sqlite:/// or postgresql"),
        ("METERSTREAM_STRIPE_API_BASE", "ftp://x", "expected an http:// or https:// URL"),
        ("METERSTREAM_HORIZON_DAYS", "many", "METERSTREAM_HORIZON_DAYS=many: "),
    ],
)
def test_bad_setting_names_the_variable_and_what_is_valid(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable) as caught:
        load_settings()
    assert message in str(caught.value)


def test_a_malformed_stripe_key_is_refused_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("METERSTREAM_STRIPE_API_KEY", "pk_live_do_not_print")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "METERSTREAM_STRIPE_API_KEY" in str(caught.value)
    assert "do_not_print" not in str(caught.value)


def test_example_catalogue_loads_every_aggregation() -> None:
    catalogue = load_catalogue(EXAMPLE_METERS)
    assert {m.aggregation for m in catalogue} == {
        "sum",
        "count",
        "max",
        "min",
        "last",
        "unique_count",
    }
    storage = catalogue.get("storage_gb_hours")
    assert storage is not None and storage.unit_scale == Decimal(1000) and storage.allow_negative


def test_missing_catalogue_file_says_which_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"METERSTREAM_METERS_FILE=.*cannot read"):
        load_catalogue(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("table", "key", "reason"),
    [
        ({"window": "1m"}, "aggregation", "missing; expected one of sum, count"),
        ({"aggregation": "avg", "window": "1m"}, "aggregation", "got 'avg'"),
        ({"aggregation": "sum", "window": "5m"}, "window", "expected one of 1m, 1h, 1d, 1mo"),
        ({"aggregation": "unique_count", "window": "1mo"}, "unique_property", "non-empty string"),
        (
            {"aggregation": "unique_count", "window": "1d", "unique_property": "u"},
            "window",
            'use window = "1mo"',
        ),
        ({"aggregation": "sum", "window": "1m", "unique_property": "u"}, "unique_property", "only"),
        ({"aggregation": "sum", "window": "1m", "unit_scale": 0.001}, "unit_scale", "string"),
        ({"aggregation": "sum", "window": "1m", "unit_scale": "-1"}, "unit_scale", "positive"),
        ({"aggregation": "sum", "window": "1m", "allow_negative": "yes"}, "allow_negative", "true"),
        ({"aggregation": "sum", "window": "1m", "grace_s": -1}, "grace_s", "whole seconds"),
        ({"aggregation": "sum", "window": "1m", "colour": "red"}, "colour", "unknown key"),
    ],
)
def test_catalogue_error_names_meter_key_and_reason(
    table: dict[str, Any], key: str, reason: str
) -> None:
    with pytest.raises(CatalogueError) as caught:
        parse_catalogue({"meters": {"m1": table}})
    assert (caught.value.meter, caught.value.key) == ("m1", key)
    assert reason in caught.value.reason


def test_two_meters_cannot_share_a_stripe_event_name() -> None:
    table = {"aggregation": "sum", "window": "1m", "stripe_event_name": "calls"}
    with pytest.raises(CatalogueError, match="already used by 'a'"):
        parse_catalogue({"meters": {"a": table, "b": table}})


def test_a_batch_the_producer_queue_cannot_hold_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Else every request of a full batch is 503 for ever, however often it is retried.
    monkeypatch.setenv("METERSTREAM_PRODUCER_QUEUE_MAX_EVENTS", "500")
    monkeypatch.setenv("METERSTREAM_HTTP_MAX_BATCH_EVENTS", "1000")
    with pytest.raises(ConfigError, match="METERSTREAM_HTTP_MAX_BATCH_EVENTS") as caught:
        check_http_batch(load_settings())  # meterstream serve's start; the SDK alone may
    assert "METERSTREAM_PRODUCER_QUEUE_MAX_EVENTS = 500" in str(caught.value)
    monkeypatch.setenv("METERSTREAM_HTTP_MAX_BATCH_EVENTS", "500")
    check_http_batch(load_settings())


def test_rejected_ledger_rows_are_kept_400_days_and_never_within_the_horizon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("METERSTREAM_LEDGER_REJECTED_RETENTION_DAYS", raising=False)
    assert load_settings().ledger_rejected_retention_days == 400
    variable = "METERSTREAM_LEDGER_REJECTED_RETENTION_DAYS"
    monkeypatch.setenv(variable, "36")
    with pytest.raises(ConfigError, match=f"{variable}=36") as caught:
        load_settings()
    assert "at least METERSTREAM_HORIZON_DAYS + 2 = 37 days" in str(caught.value)


def test_an_http_linger_as_long_as_the_produce_timeout_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # librdkafka would refuse to start the HTTP server's producer (message.timeout.ms must be
    # greater than linger.ms); said at load, with both settings named.
    monkeypatch.setenv("METERSTREAM_HTTP_PRODUCE_TIMEOUT_S", "2")
    monkeypatch.setenv("METERSTREAM_HTTP_LINGER_MS", "2000")
    with pytest.raises(ConfigError, match="METERSTREAM_HTTP_LINGER_MS=2000") as caught:
        load_settings()
    assert "METERSTREAM_HTTP_PRODUCE_TIMEOUT_S=2 s" in str(caught.value)
    monkeypatch.setenv("METERSTREAM_HTTP_LINGER_MS", "1999")
    assert load_settings().http_linger_ms == 1999
