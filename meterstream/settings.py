"""The one settings object, read from ``METERSTREAM_*`` environment variables.

Past 400 lines on purpose: one object, each field with its bounds and the reason for its
default, and the rules across fields beside them; split, the rules would lose their fields.

Read it once at the edge (the CLI, a test fixture) with :func:`load_settings` and pass it down;
nothing else in meterstream reads ``os.environ``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from meterstream.errors import ConfigError

ENV_PREFIX = "METERSTREAM_"
# Stripe secret and restricted keys: sk_ or rk_, the mode, then letters and digits only (e.g.
# sk_test_51H...). Anything else, a trailing newline or \r included, would be sent in an HTTP
# header, where requests refuses it with an error that quotes the whole key.
STRIPE_API_KEY_PATTERN = re.compile(r"(?:sk|rk)_(?:test|live)_[A-Za-z0-9]+")
# Settings whose value may hold a secret: never shown as given, only as redact_url() shows them
# (the key: not at all). The Stripe bases refuse user info, but an error names them before that.
WEBHOOK_SECRET_PATTERN = re.compile(r"whsec_[A-Za-z0-9_]+")
_SECRET_SETTINGS = frozenset({"stripe_api_key", "stripe_webhook_secret"})
_URL_SETTINGS = frozenset({"database_url", "stripe_api_base", "stripe_meter_events_base"})
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
# The driver the code uses for PostgreSQL (psycopg 3), and the spellings that mean it.
POSTGRES_SCHEME = "postgresql+psycopg://"
_POSTGRES_ALIASES = ("postgres://", "postgresql://")

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
    # May hold a password: left out of repr(), and errors show it only through redact_url().
    database_url: str = Field(
        "sqlite:///meterstream.db",
        min_length=1,
        repr=False,
        description="sqlite:///PATH, or postgresql+psycopg:// (postgres:// and postgresql:// "
        "are read as that)",
    )
    meters_file: Path = Path("examples/meters.toml")
    # Stripe refuses meter events older than 35 days, so more would be refused there; intake
    # keeps 1 day of it for the pipeline (meterstream/horizon.py). Dedup keys are kept as long.
    horizon_days: int = Field(35, ge=2, le=35)
    # How far an event time may run ahead of the clock that checks it (the SDK's host when
    # recording, the worker's when aggregating): producer clocks drift. Further ahead is refused.
    future_tolerance_s: float = Field(600.0, ge=0.0, le=86_400.0)
    # Distinct dimension combinations a meter may hold per customer and window, unless its
    # catalogue entry sets max_combinations: events of a further one are dead-lettered
    # (too_many_combinations), so an unbounded label (a request id by mistake) cannot explode
    # the database or the calls to Stripe.
    max_combinations: int = Field(100, ge=1, le=10_000)

    # --- Retention (README "Retention"): rows go only once nothing can change or need them.
    # A window whose end is older than this is pruned by the aggregators; it must outlive the
    # horizon (events older than it are refused, so the window is final) and leave the reporter
    # time to record its last revision, even as "too old, bill by hand".
    window_retention_days: int = Field(60, ge=2, le=36_500)
    # Final ledger rows (sent, carried) of windows that ended longer ago than this are pruned
    # by the reporter; never the newest row of a (customer, meter), which carries the running
    # totals, nor one of a window still in window_totals. `reconcile --since` works this far back.
    ledger_retention_days: int = Field(45, ge=2, le=36_500)
    # Rejected ledger rows (usage Stripe refused: a person bills it by hand) are pruned this long
    # after they were rejected and their window ended, under the same rules: a year and a month,
    # so last year's invoices can still be put right from them.
    ledger_rejected_retention_days: int = Field(400, ge=2, le=36_500)
    # Refused events (their raw bytes stay on the dead-letter topic) are kept this long.
    rejected_retention_days: int = Field(30, ge=1, le=36_500)
    # A (Stripe usage alert, customer) count not triggered for this long is dropped: a year and a
    # month keeps last year's alerts to compare with, and customers gone long ago go with them.
    billing_alert_retention_days: int = Field(400, ge=1, le=36_500)
    # Processed Stripe webhook events: Stripe retries a delivery for up to 3 days, so a
    # duplicate cannot come later than that; the rest leaves room for a resend by hand.
    webhook_event_retention_days: int = Field(30, ge=4, le=36_500)
    # Closed payment failures: a closed row only guards against an older event arriving late.
    payment_failure_retention_days: int = Field(35, ge=1, le=36_500)
    # Rows deleted per pruning transaction: small enough never to hold a batch or a cycle up.
    prune_batch_rows: int = Field(1_000, ge=1, le=100_000)

    # --- Aggregator
    aggregate_batch_max_events: int = Field(5_000, ge=1, le=1_000_000)
    aggregate_batch_max_wait_s: float = Field(0.5, gt=0.0, le=60.0)
    # Bytes of message values per batch handed to the applying process: bounds its memory
    # whatever the messages' sizes (a batch taken larger is split before it is applied).
    aggregate_batch_max_bytes: int = Field(32 * 1024 * 1024, ge=64 * 1024, le=1024**3)
    # A partition with messages waiting whose committed offset stands still this long is
    # reported stalled (meterstream_aggregator_partition_stalled).
    stall_after_s: float = Field(300.0, gt=0.0, le=86_400.0)

    # --- Stripe
    stripe_api_key: SecretStr | None = None
    # https only, but for a loopback address (the emulator): http would send the key in clear.
    stripe_api_base: str = "https://api.stripe.com"
    stripe_meter_events_base: str | None = None
    # Default: LIVE_RATE_PER_S for a live key, TEST_MODE_RATE_PER_S for a test key (see
    # _rate_for_the_key_mode).
    stripe_rate: float = Field(LIVE_RATE_PER_S, gt=0.0, le=10_000.0, description="calls per second")
    stripe_stream: bool = False
    report_interval_s: float = Field(60.0, gt=0.0, le=86_400.0)
    # Part of every new meter event identifier (meterstream/deployment.py); by default the
    # random id `meterstream migrate` stored in the database.
    deployment_id: str | None = Field(None, pattern=r"^[A-Za-z0-9-]{1,32}$")
    # Compacted topic holding each deployment's ledger high-water mark (reporters/marks.py).
    marks_topic: str = Field("meterstream.reporter.marks", min_length=1, max_length=200)
    # How often a running reporter compares every window total with the ledger (the backstop
    # of the report queue, reporters/backstop.py); its cost grows with history.
    report_backstop_s: float = Field(3600.0, gt=0.0, le=30 * 86_400.0)

    # --- Stripe webhooks (reporters/webhooks/): the endpoint's signing secrets, comma-separated
    # so a secret can be rolled (Stripe signs with both while it is). None: the route is off.
    stripe_webhook_secret: SecretStr | None = None
    # Act on stored events in this process. False: only store them (and answer 2xx); another
    # process with True acts on them, or this one after a restart.
    stripe_webhook_processing: bool = True

    # --- Observability
    metrics_port: int = Field(9464, ge=0, le=65535, description="0: no metrics server")
    # Loopback by default: /metrics is unauthenticated. A container sets 0.0.0.0 inside its
    # network (docker-compose.yml) so Prometheus can scrape it.
    metrics_host: str = Field(
        "127.0.0.1",
        min_length=1,
        max_length=255,
        description="address the /metrics servers listen on; 0.0.0.0 inside a container",
    )

    # --- HTTP ingest API (meterstream serve)
    # Loopback by default: a deployment opens it on purpose (0.0.0.0 in a container).
    http_host: str = Field("127.0.0.1", min_length=1, max_length=255)
    http_port: int = Field(8480, ge=1, le=65535)
    # A body larger than this is refused with 413 before it is parsed. A full batch of 1,000
    # typical events is about 300 KB; 64 KiB events are refused one by one (413 too).
    http_max_body_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024, le=256 * 1024 * 1024)
    http_max_batch_events: int = Field(1_000, ge=1, le=10_000)
    # How long a request's body may take to arrive once its headers have: a client that sends
    # it a byte at a time (slowloris) is answered 408 rather than holding its request for ever.
    http_body_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    # How long a request's line and headers may take from their first byte (or a connection
    # from being opened to its first request's headers): past it the connection is closed.
    http_head_timeout_s: float = Field(10.0, gt=0.0, le=3600.0)
    # How long a request waits for Kafka to acknowledge all of its events before answering 503
    # (with Retry-After); librdkafka gives those events up at the same time.
    http_produce_timeout_s: float = Field(10.0, gt=0.0, le=300.0)
    http_retry_after_s: int = Field(5, ge=1, le=3600)
    # librdkafka's linger.ms for the HTTP server's producer. Shorter than the SDK's: a request's
    # events are produced together and concurrent requests share a turn (ingest/http/acks.py),
    # so a longer wait batches little more and each request waits for it (measured: 5 ms held
    # 8 connections of 100-event requests to ~90,000 events/s, 1 ms let them reach ~190,000).
    http_linger_ms: int = Field(1, ge=0, le=10_000)
    # How long a server trusts what it read of an API key: a revoked key is refused by every
    # running server within this many seconds.
    http_api_key_cache_s: float = Field(5.0, ge=0.0, le=300.0)

    # --- SDK at exit
    # How long a UsageClient never closed may wait, when the interpreter exits, for Kafka to
    # acknowledge what it queued; what is left then is logged (ERROR, by id) and counted failed.
    exit_flush_timeout_s: float = Field(
        5.0, ge=0.0, le=3600.0, description="seconds an unclosed UsageClient waits at exit"
    )

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

    @field_validator("http_linger_ms")
    @classmethod
    def _http_linger_within_the_produce_timeout(cls, value: int, info: ValidationInfo) -> int:
        # librdkafka refuses to start a producer that would give its events up before sending.
        timeout_s = info.data.get("http_produce_timeout_s")
        if timeout_s is not None and value >= timeout_s * 1000:
            raise ValueError(
                f"must be below METERSTREAM_HTTP_PRODUCE_TIMEOUT_S={timeout_s:g} s "
                f"({timeout_s * 1000:g} ms): lower it"
            )
        return value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_ports(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return value

    @field_validator(
        "window_retention_days", "ledger_retention_days", "ledger_rejected_retention_days"
    )
    @classmethod
    def _past_the_horizon(cls, value: int, info: ValidationInfo) -> int:
        horizon = info.data.get("horizon_days")
        # A window within the horizon (plus a day of future tolerance and send margin) can still
        # change or be sent: pruning it, or its ledger rows, would bill it again or lose it.
        if horizon is not None and value < horizon + 2:
            raise ValueError(
                f"must be at least METERSTREAM_HORIZON_DAYS + 2 = {horizon + 2} days: rows "
                "of a window that may still change must stay"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        # Never echo the value here: it may hold a password (load_settings shows it redacted).
        if value.startswith(_POSTGRES_ALIASES):
            return POSTGRES_SCHEME + value.split("://", 1)[1]
        if not value.startswith(("sqlite:", POSTGRES_SCHEME)):
            raise ValueError(
                f"expected a sqlite:/// or {POSTGRES_SCHEME} URL (postgres:// and postgresql:// "
                f"are read as the latter), e.g. {POSTGRES_SCHEME}user:password@host:5432/db"
            )
        return value

    @field_validator("stripe_api_base", "stripe_meter_events_base")
    @classmethod
    def _stripe_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme, _, rest = value.partition("://")
        if scheme not in ("http", "https"):
            raise ValueError("expected an http:// or https:// URL (http:// for loopback only)")
        if "@" in rest:  # user info, even with a / in the password; Stripe's URLs have no @
            raise ValueError(
                "expected no user:password in the URL; Stripe is authenticated with "
                "METERSTREAM_STRIPE_API_KEY"
            )
        if scheme == "http" and not _is_loopback(_host_of(rest)):
            raise ValueError(
                "http:// would send the Stripe secret key in clear text: use https://, or "
                "http:// only for a loopback address (127.0.0.0/8, ::1, localhost), such as "
                "the local Stripe emulator"
            )
        return value.rstrip("/")

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

    @field_validator("stripe_webhook_secret")
    @classmethod
    def _webhook_secrets_shape(cls, value: SecretStr | None) -> SecretStr | None:
        # Never echo a secret. Stripe's endpoint secrets are whsec_ then letters and digits.
        if value is None:
            return None
        secrets = value.get_secret_value().split(",")
        if not all(WEBHOOK_SECRET_PATTERN.fullmatch(secret.strip()) for secret in secrets):
            raise ValueError(
                "expected one or more Stripe webhook signing secrets, comma-separated: whsec_ "
                "then letters and digits (copy them from the endpoint in the Stripe Dashboard)"
            )
        return value

    @property
    def stripe_webhook_secrets(self) -> tuple[str, ...]:
        """The webhook signing secrets, in the order given (empty: webhooks are off)."""
        if self.stripe_webhook_secret is None:
            return ()
        return tuple(s.strip() for s in self.stripe_webhook_secret.get_secret_value().split(","))

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

    Raises ConfigError naming each bad variable and what would be valid. A value that may hold a
    secret is never in the message: the Stripe key not at all, URLs only as redact_url() shows
    them (pydantic's own message would quote the input whole).
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = [_problem(error) for error in exc.errors()]
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None


def _problem(error: Any) -> str:
    field = str(error["loc"][0]) if error["loc"] else ""
    given = error.get("input")
    if field in _SECRET_SETTINGS or field not in Settings.model_fields or isinstance(given, dict):
        shown = ""  # a misspelt name may hold anything, a password included
    elif field in _URL_SETTINGS:
        shown = f"={redact_url(str(given))}"
    else:
        shown = f"={given!s}"
    # Our validators' messages show values only through redact_url(); pydantic's own messages
    # for the fields above name the rule, not the input.
    return f"{ENV_PREFIX}{field.upper()}{shown}: {error['msg']}"


def redact_url(value: str) -> str:
    """What of a URL may be printed: its scheme, host and port. User info (a password), path
    and query (``?password=``) are replaced by ``***``; a value that is not a URL (libpq's
    ``host=... password=...``) by ``<not shown>``."""
    scheme, separator, rest = value.partition("://")
    if not separator or not _URL_SCHEME.fullmatch(scheme):
        return "<not shown>"
    hidden_user = "@" in rest
    if hidden_user:
        # The last @ ends the user info, whatever a password holds; a ? or # before it means
        # the @ may sit in a query instead, so nothing after the scheme is shown.
        before, _, rest = rest.rpartition("@")
        if re.search(r"[?#]", before):
            return f"{scheme}://***"
    host = _host_of(rest)
    tail = "/***" if len(rest) > len(host) else ""
    return f"{scheme}://{'***@' if hidden_user else ''}{host}{tail}"


def _host_of(authority_and_path: str) -> str:
    """host[:port] of a URL's part after ``scheme://`` (user info already removed)."""
    return re.split(r"[/?#]", authority_and_path, maxsplit=1)[0]


def _is_loopback(host_and_port: str) -> bool:
    if host_and_port.startswith("["):  # [::1]:port
        host = host_and_port[1:].partition("]")[0]
    else:
        host = host_and_port.rpartition(":")[0] if ":" in host_and_port else host_and_port
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def environment_of(settings: Settings, inherit: Mapping[str, str]) -> dict[str, str]:
    """The variables that make a child process read ``settings``: ``inherit`` (say, os.environ)
    without its METERSTREAM_* entries, plus one METERSTREAM_* variable per setting."""
    environment = {k: v for k, v in inherit.items() if not k.startswith(ENV_PREFIX)}
    for name, value in settings.model_dump(exclude_none=True).items():
        if name == "stripe_api_key" and settings.stripe_api_key is not None:
            value = settings.stripe_api_key.get_secret_value()
        if name == "stripe_webhook_secret" and settings.stripe_webhook_secret is not None:
            value = settings.stripe_webhook_secret.get_secret_value()
        environment[ENV_PREFIX + name.upper()] = str(value)
    return environment


def check_http_batch(settings: Settings) -> None:
    """``meterstream serve``'s start-up rule (the SDK alone may use a smaller queue): a request
    is produced whole or not at all, so a batch the producer queue cannot hold would be answered
    503 on every retry, for ever. Raises ConfigError naming both settings."""
    queue, batch = settings.producer_queue_max_events, settings.http_max_batch_events
    if batch > queue:
        raise ConfigError(
            f"invalid settings: METERSTREAM_HTTP_MAX_BATCH_EVENTS={batch}: must be at most "
            f"METERSTREAM_PRODUCER_QUEUE_MAX_EVENTS = {queue}: a larger batch could never be "
            "produced (503 on every retry)"
        )
