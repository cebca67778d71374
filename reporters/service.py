"""Wiring: from Settings to a running Reporter (client, pace, meter check, v1 or stream).

Tests build the same pieces with their own clock, stop event and backoff, side by side.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import stripe
from sqlalchemy import Engine

from meterstream.deployment import deployment_id_of
from meterstream.errors import (
    BrokerUnavailableError,
    ConfigError,
    RestoredLedgerError,
    StripeAuthError,
)
from meterstream.meters import Catalogue
from meterstream.metrics import ReporterMetrics
from meterstream.settings import Settings
from reporters.cycle import CycleResult, Reporter, Sender
from reporters.marks import KafkaMarks
from reporters.meters_check import StripeMeter, check_meters, list_stripe_meters
from reporters.pacer import Pacer
from reporters.restore import RestoreGuard
from reporters.stream import StreamSender
from reporters.stream_sender import V2StreamSender
from reporters.stripe_push import (
    SDK_NETWORK_RETRIES,
    StripeGateway,
    build_client,
    build_http_client,
    classify,
    require_api_key,
    send_meter_event,
)
from reporters.summaries import StripeSummaries, SummarySource
from reporters.v1_sender import V1Sender, send_threads

_log = logging.getLogger(__name__)
# Each pruning reads the old end of the ledger once; every hour keeps up with any traffic.


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Connected:
    """A Stripe client, the gateway that paces it, and the checked meters. ``close()`` when
    done: it closes the connections to Stripe (those of a call in flight when it ends)."""

    settings: Settings
    client: stripe.StripeClient
    gateway: StripeGateway
    stripe_meters: dict[str, StripeMeter]
    metrics: ReporterMetrics
    http_client: stripe.HTTPClient

    def close(self) -> None:
        self.http_client.close()  # type: ignore[no-untyped-call]  # SDK: unannotated


def connect(
    settings: Settings,
    catalogue: Catalogue,
    metrics: ReporterMetrics,
    stop: threading.Event,
    *,
    backoff_base_s: float = 0.5,
) -> Connected:
    """Build the client and check Stripe's meters against the catalogue.

    Raises ConfigError (no key) or MeterCheckError (meters missing, inactive, wrong formula);
    the connections are closed then.
    """
    http_client = build_http_client(settings, metrics)
    try:
        return _connect(settings, catalogue, metrics, stop, http_client, backoff_base_s)
    except BaseException:
        http_client.close()  # type: ignore[no-untyped-call]  # SDK: unannotated
        raise


def _connect(
    settings: Settings,
    catalogue: Catalogue,
    metrics: ReporterMetrics,
    stop: threading.Event,
    http_client: stripe.HTTPClient,
    backoff_base_s: float,
) -> Connected:
    client = build_client(require_api_key(settings), settings, metrics, http_client)
    pacer = Pacer(settings.stripe_rate, wait=stop.wait)
    gateway = StripeGateway(pacer, metrics, stop, backoff_base_s=backoff_base_s)

    def list_page(params: Any) -> Any:
        return gateway.call(lambda: client.v1.billing.meters.list(params=params))

    try:
        found = list_stripe_meters(list_page)
    except stripe.StripeError as exc:
        outcome = classify(exc, None)  # raises StripeAuthError for a refused key
        raise ConfigError(
            f"METERSTREAM_STRIPE_API_BASE={settings.stripe_api_base}: could not list the Stripe "
            f"meters ({outcome.code or outcome.error}); check the address and that Stripe is up"
        ) from None  # the SDK error may quote the Authorization header
    stripe_meters = check_meters(catalogue, found)
    return Connected(settings, client, gateway, stripe_meters, metrics, http_client)


def build_reporter(
    connected: Connected,
    engine: Engine,
    catalogue: Catalogue,
    stop: threading.Event,
    *,
    clock: Callable[[], datetime] = utc_now,
    renew_margin_s: float = 60.0,
) -> Reporter:
    """A Reporter over v1 meter events, or the v2 stream when METERSTREAM_STRIPE_STREAM=1."""
    settings, client, gateway = connected.settings, connected.client, connected.gateway
    sender: Sender
    if settings.stripe_stream:
        # on the same connections, so that closing ``connected`` closes them all
        stream = StreamSender(
            client,
            gateway,
            connected.http_client,
            settings.meter_events_base,
            clock,
            max_network_retries=SDK_NETWORK_RETRIES,
            renew_margin_s=renew_margin_s,
        )
        sender = V2StreamSender(stream)
    else:

        def send_one(row: Any, meter: StripeMeter) -> Any:
            return send_meter_event(client, gateway, row, meter)

        sender = V1Sender(send_one, workers=send_threads(settings.stripe_rate))
    return Reporter(
        engine,
        catalogue,
        connected.stripe_meters,
        connected.metrics,
        sender=sender,
        clock=clock,
        stop=stop,
        horizon_days=settings.horizon_days,
        deployment_id=deployment_id_of(settings, engine),
        backstop_s=settings.report_backstop_s,
        ledger_retention_days=settings.ledger_retention_days,
        ledger_rejected_retention_days=settings.ledger_rejected_retention_days,
        window_retention_days=settings.window_retention_days,
        prune_batch_rows=settings.prune_batch_rows,
    )


def build_guard(
    settings: Settings, engine: Engine, metrics: ReporterMetrics, timeout_s: float = 10.0
) -> RestoreGuard:
    """The restore check of this database's deployment, its marks on Kafka."""
    marks = KafkaMarks(settings.kafka_bootstrap, settings.marks_topic, timeout_s)
    return RestoreGuard(
        engine,
        marks,
        deployment_id_of(settings, engine),
        metrics,
        utc_now,
        current_id=partial(deployment_id_of, settings, engine),
    )


def run_schedule(
    reporter: Reporter, interval_s: float, stop: threading.Event, guard: RestoreGuard
) -> None:
    """A cycle every ``interval_s`` until ``stop``; a failed cycle is logged and retried.
    No cycle runs while ``guard`` finds the ledger behind its mark or cannot read it. The
    ledger is pruned after a cycle when a pass is due (reporters.retention.PRUNE_EVERY)."""
    while not stop.is_set():
        try:
            guard.check()
            result = reporter.run_cycle()
            log_result(result)
            publish_mark(guard)
        except (StripeAuthError, ConfigError):
            # A wrong key will not fix itself, nor a deployment id changed under us (a
            # restore accepted): stop and say so.
            raise
        except (RestoredLedgerError, BrokerUnavailableError) as exc:
            _log.error("nothing sent: %s; checking again in %.0f s", exc, interval_s)
        except Exception:
            # The loop's edge: the ledger already holds every row, so the next cycle resends.
            _log.exception("report cycle failed; retrying in %.0f s", interval_s)
        try:
            # Between cycles: pruning reads what the cycle wrote; a cycle never waits on it.
            # A pass runs when one is due (hourly, kept in the database: reporters/retention.py).
            reporter.prune_ledger()
        except Exception:
            _log.exception("pruning the ledger failed; trying again after the next cycle")
        stop.wait(interval_s)


def publish_mark(guard: RestoreGuard) -> None:
    """Move the mark after a cycle; a failure is logged (the next cycle tries again), not
    fatal: what was sent is in the ledger either way."""
    try:
        guard.publish()
    except BrokerUnavailableError as exc:
        _log.warning("ledger mark not written (a restore from now on may go unseen): %s", exc)


def log_result(result: CycleResult) -> None:
    _log.info(
        "report cycle: acknowledged %d, rejected %d, carried %d, held %s, held keys %d, "
        "unacknowledged %d",
        result.acknowledged,
        result.rejected,
        result.carried,
        result.held or "none",
        len(result.held_keys),
        result.unacknowledged,
    )


def fetch_summary(connected: Connected) -> SummarySource:
    """Stripe's aggregated values for one meter and customer (per combination of dimension
    values too: reporters/summaries.py), through the connection's client and gateway."""
    return StripeSummaries(connected.client, connected.gateway)
