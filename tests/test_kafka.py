"""The librdkafka settings every client shares (meterstream/kafka.py), with real librdkafka."""

from __future__ import annotations

import logging
import time

import pytest
from confluent_kafka import Producer

from meterstream.kafka import client_config
from tests.aggregators.serving import free_port


def test_librdkafka_log_lines_go_through_logging_not_straight_to_stderr(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # No broker listens there, so librdkafka logs a failed connection at once.
    producer = Producer(client_config(f"127.0.0.1:{free_port()}"))
    with caplog.at_level(logging.INFO, logger="librdkafka"):
        deadline = time.monotonic() + 10
        while not caplog.records and time.monotonic() < deadline:
            producer.poll(0.1)
    del producer

    assert any("Connect to" in r.getMessage() for r in caplog.records), caplog.records
    assert {r.name for r in caplog.records} == {"librdkafka"}
    assert "rdkafka#producer" not in capfd.readouterr().err
