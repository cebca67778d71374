"""Prometheus metrics of every stage, each set built on a registry the caller owns.

No default REGISTRY: tests and the demo build as many stages side by side as they need. Names are
``meterstream_<stage>_<thing>_<unit>``; counters end in ``_total``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class IngestMetrics:
    """What the SDK counts: recorded, rejected (by field), delivered, failed, queue, latency."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.recorded = Counter(
            "meterstream_ingest_events_recorded",
            "Events accepted by UsageClient.record() and queued for Kafka.",
            registry=self.registry,
        )
        self.rejected = Counter(
            "meterstream_ingest_events_rejected",
            "Events refused by validation, by the field at fault.",
            ["field"],
            registry=self.registry,
        )
        self.delivered = Counter(
            "meterstream_ingest_events_delivered",
            "Events Kafka acknowledged (acks=all).",
            registry=self.registry,
        )
        self.failed = Counter(
            "meterstream_ingest_events_failed",
            "Accepted events Kafka refused for good; reported to the caller by flush().",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "meterstream_ingest_queue_events",
            "Events queued in the producer and not yet acknowledged.",
            registry=self.registry,
        )
        self.produce_latency = Histogram(
            "meterstream_ingest_produce_latency_seconds",
            "Time from record() to Kafka's acknowledgement.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
