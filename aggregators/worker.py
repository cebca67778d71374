"""Run one aggregator worker until it is told to stop (Ctrl-C or SIGTERM)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import faust
from sqlalchemy import Engine, inspect

from aggregators.app import WorkerState, build_app
from aggregators.dead_letter_topic import dead_letter_topic
from aggregators.definitions import check_definitions
from aggregators.pipeline import ApplyPipeline
from meterstream.db import build_engine
from meterstream.errors import ConfigError
from meterstream.kafka import ensure_topic, wait_for_broker
from meterstream.meters import load_catalogue
from meterstream.metrics import AggregatorMetrics
from meterstream.metrics_endpoint import serve_metrics
from meterstream.settings import Settings

_log = logging.getLogger(__name__)


def check_schema(engine: Engine) -> None:
    """Refuse to start on a database that was never migrated."""
    if not inspect(engine).has_table("window_totals"):
        raise ConfigError(
            f"METERSTREAM_DATABASE_URL={engine.url.render_as_string(hide_password=True)}: "
            "no meterstream schema there; run `meterstream migrate` first"
        )


def run_worker(
    settings: Settings, *, loglevel: str = "info", logging_config: dict[str, Any] | None = None
) -> None:
    """Consume the usage topic into the database until stopped; blocks.

    faust configures logging when its worker starts: ``logging_config`` (a
    ``logging.config.dictConfig`` document, the command line's) replaces faust's own.

    On Ctrl-C or SIGTERM faust stops the agent after the batch in hand, commits the offsets of
    what was applied, and leaves the consumer group.
    """
    import mode.loop

    # uvloop lifts faust's ceiling; it must be chosen before the app creates its loop.
    mode.loop.use("uvloop")
    # Fail here, not in the child, on a bad catalogue or one that no longer fits the totals.
    catalogue = load_catalogue(settings.meters_file)
    engine = build_engine(settings)
    check_schema(engine)
    check_definitions(engine, catalogue, datetime.now(UTC), str(settings.meters_file))
    wait_for_broker(settings.kafka_bootstrap)
    ensure_topic(settings.kafka_bootstrap, settings.topic, settings.topic_partitions)
    ensure_topic(settings.kafka_bootstrap, dead_letter_topic(settings), settings.topic_partitions)
    metrics = AggregatorMetrics()
    serve_metrics(settings, metrics.registry)
    pipeline = ApplyPipeline(settings, catalogue, logging_config=logging_config)
    app = build_app(settings, WorkerState(pipeline, engine, metrics))
    where = engine.url.render_as_string(hide_password=True)
    _log.info("aggregating %s into %s", settings.topic, where)
    try:
        faust.Worker(
            app, loglevel=loglevel, logging_config=logging_config
        ).execute_from_commandline()
    finally:
        pipeline.close()
        engine.dispose()
