"""The one settings object, read from ``METERSTREAM_*`` environment variables.

Read it once at the edge (the CLI, a test fixture) with :func:`load_settings` and pass it down;
nothing else in meterstream reads ``os.environ``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from meterstream.errors import ConfigError

ENV_PREFIX = "METERSTREAM_"
# Stripe secret and restricted keys: sk_ or rk_, the mode, then letters and digits only (e.g.
# sk_test_51H...). Anything else, a trailing newline or \r included, would be sent in an HTTP
# header, where requests refuses it with an error that quotes the whole key.
STRIPE_API_KEY_PATTERN = re.compile(r"(?:sk|rk)_(?:test|live)_[A-Za-z0-9]+")
# v1 calls a second when METERSTREAM_STRIPE_RATE is not set. Live: the README's sizing (10,000
# customers with 1-minute windows) closes 167 windows a second; 400 is 2.4 times that, so a
# backlog drains (an hour of outage in about 43 minutes), and 40 % of Stripe's 1,000 calls/s
# live limit on meter events leaves room for retries and other callers. Test mode: Stripe's
# sandboxes allow about 25 operations a second in all.
LIVE_RATE_PER_S = 400.0
TEST_MODE_RATE_PER_S = 25.0


class Settings(BaseSettings):
    """Everything a meterstream process can be told. Defaults run the embedded demo."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # --- Kafka
    kafka_bootstrap: str = Field(
        "127.0.0.1:9092", description="host:port[,host:port...] of the Kafka brokers"
    )
    topic: str = Field("meterstream.usage", min_length=1, max_length=200)
    topic_partitions: int = Field(8, ge=1, le=10_000)
    # The producing service's name: the CloudEvents `source`. It must stay the same across
    # restarts and hosts of one service, so a re-sent event keeps its deduplication key.
    source: str = Field("meterstream://default", min_length=1, max_length=200)
    consumer_group: str = Field("meterstream-aggregators", min_length=1)
    # Short sessions make group joins take seconds; Apache Kafka accepts 6 s and up.
    kafka_session_timeout_s: float = Field(10.0, ge=1.0, le=300.0)
    kafka_heartbeat_interval_s: float = Field(1.0, gt=0.0, le=60.0)

    # --- SDK producer
    producer_queue_max_events: int = Field(100_000, ge=1, le=10_000_000)
    producer_block_timeout_s: float = Field(5.0, ge=0.0, le=3600.0)
    producer_delivery_timeout_s: float = Field(120.0, gt=0.0, le=86_400.0)
    producer_linger_ms: int = Field(5, ge=0, le=10_000)
    # How often librdkafka reports the produce latency (the latency metric's window).
    producer_statistics_interval_s: float = Field(5.0, ge=0.1, le=3600.0)

    # --- Storage and catalogue
    database_url: str = Field("sqlite:///meterstream.db", min_length=1)
    meters_file: Path = Path("examples/meters.toml")
    # Stripe refuses meter events older than 35 days; so do we, and keep dedup keys that long.
    horizon_days: int = Field(35, ge=1, le=3650)

    # --- Aggregator
    aggregate_batch_max_events: int = Field(5_000, ge=1, le=1_000_000)
    aggregate_batch_max_wait_s: float = Field(0.5, gt=0.0, le=60.0)

    # --- Stripe
    stripe_api_key: SecretStr | None = None
    stripe_api_base: str = "https://api.stripe.com"
    stripe_meter_events_base: str | None = None
    # Default: LIVE_RATE_PER_S for a live key, TEST_MODE_RATE_PER_S for a test key (see
    # _rate_for_the_key_mode).
    stripe_rate: float = Field(LIVE_RATE_PER_S, gt=0.0, le=10_000.0, description="calls per second")
    stripe_stream: bool = False
    report_interval_s: float = Field(60.0, gt=0.0, le=86_400.0)

    # --- Observability
    metrics_port: int = Field(9464, ge=0, le=65535)

    @model_validator(mode="before")
    @classmethod
    def _rate_for_the_key_mode(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("stripe_rate") is not None:
            return data
        key = data.get("stripe_api_key")
        text = key.get_secret_value() if isinstance(key, SecretStr) else str(key or "")
        if text.startswith(("sk_test_", "rk_test_")):
            return {**data, "stripe_rate": TEST_MODE_RATE_PER_S}
        return data

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_ports(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql")):
            raise ValueError(
                f"expected a sqlite:/// or postgresql+psycopg:// URL, got {value.split('://')[0]!r}"
            )
        return value

    @field_validator("stripe_api_base", "stripe_meter_events_base")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value.rstrip("/") if value else value

    @field_validator("stripe_api_key")
    @classmethod
    def _stripe_key_shape(cls, value: SecretStr | None) -> SecretStr | None:
        # Never echo the key itself: it is a secret. fullmatch, not match: "$" would let a
        # trailing newline through.
        if value is not None and not STRIPE_API_KEY_PATTERN.fullmatch(value.get_secret_value()):
            raise ValueError(
                "expected a Stripe secret key: sk_test_, sk_live_, rk_test_ or rk_live_ then "
                "letters and digits only (no spaces, newline or carriage return; check how the "
                "variable was written, e.g. a file read with its trailing newline)"
            )
        return value

    @property
    def meter_events_base(self) -> str:
        """The base address of Stripe's v2 meter event stream (a separate host at Stripe)."""
        if self.stripe_meter_events_base:
            return self.stripe_meter_events_base
        if self.stripe_api_base == "https://api.stripe.com":
            return "https://meter-events.stripe.com"
        return self.stripe_api_base


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment, with ``overrides`` taking precedence.

    Raises ConfigError naming each bad variable and what would be valid.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ENV_PREFIX + str(error["loc"][0]).upper() if error["loc"] else ENV_PREFIX
            given = error.get("input")
            shown = "" if "api_key" in name.lower() or isinstance(given, dict) else f"={given!s}"
            problems.append(f"{name}{shown}: {error['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None


def environment_of(settings: Settings, inherit: Mapping[str, str]) -> dict[str, str]:
    """The variables that make a child process read ``settings``: ``inherit`` (say, os.environ)
    without its METERSTREAM_* entries, plus one METERSTREAM_* variable per setting."""
    environment = {k: v for k, v in inherit.items() if not k.startswith(ENV_PREFIX)}
    for name, value in settings.model_dump(exclude_none=True).items():
        if name == "stripe_api_key" and settings.stripe_api_key is not None:
            value = settings.stripe_api_key.get_secret_value()
        environment[ENV_PREFIX + name.upper()] = str(value)
    return environment
