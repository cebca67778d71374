"""A real Prometheus scrapes a real meterstream /metrics endpoint and evaluates our alert rules."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from meterstream.metrics import AggregatorMetrics
from tests.deploy.conftest import PROMETHEUS_DIR, poll, tool


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def aggregator_metrics() -> Iterator[tuple[AggregatorMetrics, int]]:
    """An aggregator's metrics, served on /metrics as `meterstream aggregate` serves them."""
    metrics = AggregatorMetrics(CollectorRegistry())
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    try:
        yield metrics, server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class PrometheusServer:
    def __init__(self, address: str) -> None:
        self.address = address

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://{self.address}/api/v1/{path}{query}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False


@pytest.fixture
def prometheus(
    tmp_path: Path, aggregator_metrics: tuple[AggregatorMetrics, int]
) -> Iterator[PrometheusServer]:
    """/usr/bin/prometheus scraping the aggregator endpoint every second with alerts.yml loaded."""
    _, target_port = aggregator_metrics
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
        "scrape_configs": [
            {
                "job_name": "aggregator",
                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
            }
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    address = f"127.0.0.1:{free_port()}"
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={address}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = PrometheusServer(address)
    try:
        poll(
            lambda: True if server.ready() else _exited(process, tmp_path),
            timeout_s=30,
            what=f"prometheus ready on {address}",
        )
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _exited(process: subprocess.Popen[bytes], tmp_path: Path) -> None:
    if process.poll() is not None:
        log = (tmp_path / "prometheus.log").read_text(errors="replace")
        raise AssertionError(f"prometheus exited with {process.returncode}:\n{log}")


def test_a_dead_lettered_event_raises_the_alert_in_a_real_prometheus(
    prometheus: PrometheusServer, aggregator_metrics: tuple[AggregatorMetrics, int]
) -> None:
    metrics, _ = aggregator_metrics
    metrics.dead_lettered.labels("invalid_event").inc()

    def scraped() -> list[Any] | None:
        result = prometheus.api("query", query="meterstream_aggregator_events_dead_lettered_total")
        return result["result"] or None

    (series,) = poll(scraped, timeout_s=20, what="the dead-letter counter in Prometheus")
    assert series["metric"]["reason"] == "invalid_event"
    assert series["metric"]["job"] == "aggregator"
    assert float(series["value"][1]) == 1.0

    def alert(name: str) -> dict[str, Any] | None:
        for found in prometheus.api("alerts")["alerts"]:
            if found["labels"]["alertname"] == name and found["state"] in {"pending", "firing"}:
                return dict(found)
        return None

    dead_letter = poll(
        lambda: alert("MeterstreamEventsDeadLettered"), timeout_s=20, what="the alert"
    )
    assert dead_letter["labels"]["reason"] == "invalid_event"
    assert dead_letter["labels"]["severity"] == "warning"
    assert "invalid_event" in dead_letter["annotations"]["summary"]

    # No reporter is scraped here: the stage that stopped reporting is noticed too, while the
    # aggregator, scraped and up, is not.
    poll(lambda: alert("MeterstreamReporterMetricsAbsent"), timeout_s=20, what="the absent alert")
    up = prometheus.api("query", query='up{job="aggregator"}')["result"]
    assert [float(s["value"][1]) for s in up] == [1.0]
    names = {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]}
    assert "MeterstreamTargetDown" not in names
    assert "MeterstreamAggregatorMetricsAbsent" not in names
