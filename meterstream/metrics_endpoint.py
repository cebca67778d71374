"""The /metrics endpoint: a stage's registry served over HTTP, and read back (the demo and the
tests read what a running stage exports)."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from meterstream.settings import Settings

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def serve_metrics(settings: Settings, registry: CollectorRegistry) -> None:
    """Serve ``registry`` on http://METERSTREAM_METRICS_HOST:METERSTREAM_METRICS_PORT/metrics from
    a daemon thread; nothing when the port is 0. The host is loopback unless set otherwise:
    /metrics has no authentication, so only a deployment that means it (a container on its own
    network) opens it wider."""
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)


def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    """Every sample a /metrics endpoint serves, as (name, sorted labels) -> value; empty when
    nothing answers."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
