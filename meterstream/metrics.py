"""Prometheus metrics of every stage, each set built on a registry the caller owns.

No default REGISTRY: tests and the demo build as many stages side by side as they need. Names are
``meterstream_<stage>_<thing>_<unit>``; counters end in ``_total``. Serving a registry on
/metrics, and reading one back, is meterstream/metrics_endpoint.py's job.
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
        # A gauge by quantile, not a histogram: librdkafka measures the latency itself (see
        # ingest/producer.py), which spares the callers a Python callback per message.
        self.produce_latency = Gauge(
            "meterstream_ingest_produce_latency_seconds",
            "Time from record() to Kafka's acknowledgement over the last statistics interval, "
            "by quantile: librdkafka's queue + output buffer + round trip quantiles added "
            "(an upper estimate), slowest broker; one client per IngestMetrics.",
            ["quantile"],
            registry=self.registry,
        )


class AggregatorMetrics:
    """What the aggregator workers count and measure."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.applied = Counter(
            "meterstream_aggregator_events_applied",
            "Events added to window totals (each event once).",
            ["meter"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "meterstream_aggregator_duplicates_skipped",
            "Events skipped because their (source, id) was already applied.",
            registry=self.registry,
        )
        self.late = Counter(
            "meterstream_aggregator_late_events",
            "Events applied to a window that had already closed (end + grace passed).",
            ["meter"],
            registry=self.registry,
        )
        self.dead_lettered = Counter(
            "meterstream_aggregator_events_dead_lettered",
            "Events refused and sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "meterstream_aggregator_batch_events",
            "Messages per applied batch.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000),
            registry=self.registry,
        )
        self.batch_latency = Histogram(
            "meterstream_aggregator_batch_latency_seconds",
            "Time to apply one batch: decode, deduplicate, update totals, commit.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.consumer_lag = Gauge(
            "meterstream_aggregator_consumer_lag_messages",
            "High watermark minus the group's committed offset, per partition.",
            ["topic", "partition"],
            registry=self.registry,
        )
        self.partition_stalled = Gauge(
            "meterstream_aggregator_partition_stalled",
            "1 while a partition has messages waiting and the group's committed offset has not "
            "moved for METERSTREAM_STALL_AFTER_S; else 0.",
            ["topic", "partition"],
            registry=self.registry,
        )
        self.event_time_lag = Gauge(
            "meterstream_aggregator_event_time_lag_seconds",
            "Now minus the newest event time applied.",
            registry=self.registry,
        )
        self.pruned_rows = Counter(
            "meterstream_aggregator_pruned_rows",
            "Rows deleted past their retention, by table (window_totals, rejected_events).",
            ["table"],
            registry=self.registry,
        )


class ReporterMetrics:
    """What the reporter counts and measures on its way to Stripe."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.sent = Counter(
            "meterstream_reporter_meter_events_sent",
            "Meter events Stripe acknowledged.",
            ["meter"],
            registry=self.registry,
        )
        self.retried = Counter(
            "meterstream_reporter_meter_events_retried",
            "Calls to Stripe retried after a 5xx, a 429 or a lost connection.",
            registry=self.registry,
        )
        self.rejected = Counter(
            "meterstream_reporter_meter_events_rejected",
            "Meter events Stripe refused for good, by Stripe error code.",
            ["code"],
            registry=self.registry,
        )
        self.held = Counter(
            "meterstream_reporter_meter_events_held",
            "Reports held back, by reason (no customer link, negative correction).",
            ["reason"],
            registry=self.registry,
        )
        self.key_failures = Counter(
            "meterstream_reporter_key_failures",
            "(customer, meter) pairs held for a failure of their own (meter not in the "
            "catalogue, value out of range or not exact, a call that failed), by reason; "
            "counted once per pair and reason while it stays held. The other pairs are sent "
            "as usual.",
            ["reason"],
            registry=self.registry,
        )
        self.held_keys = Gauge(
            "meterstream_reporter_held_keys",
            "(customer, meter) pairs held as the last report cycle ended, by reason; a person "
            "must act (meterstream status lists them).",
            ["reason"],
            registry=self.registry,
        )
        self.held_windows = Gauge(
            "meterstream_reporter_held_windows",
            "Windows held back and set aside (customer not linked, negative correction, "
            "revision went back, no later timestamp), by reason, as the last report cycle "
            "ended; not in the billing lag. meterstream status lists them.",
            ["reason"],
            registry=self.registry,
        )
        self.unknown_rows = Gauge(
            "meterstream_reporter_ledger_unknown_rows",
            "Ledger rows first sent too long ago to resend safely, or called and then too old "
            "for Stripe, with no answer, as the last report cycle ended: not resent and not in "
            "the billing lag; meterstream reconcile settles them or a person decides.",
            registry=self.registry,
        )
        self.held_oldest_age = Gauge(
            "meterstream_reporter_held_oldest_age_seconds",
            "How long the oldest held window has been held (0 when none).",
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "meterstream_reporter_rate_limited_responses",
            "429 answers from Stripe.",
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "meterstream_reporter_stripe_request_latency_seconds",
            "Time of one call to Stripe.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.pending = Gauge(
            "meterstream_reporter_ledger_pending_rows",
            "Ledger rows written but not yet acknowledged by Stripe.",
            registry=self.registry,
        )
        self.due_windows = Gauge(
            "meterstream_reporter_due_windows",
            "Windows whose newest revision has no ledger row yet (changed since the reporter "
            "last wrote them), as the last report cycle ended, held ones apart "
            "(meterstream_reporter_held_windows); what it wrote but Stripe has not "
            "acknowledged is meterstream_reporter_ledger_pending_rows.",
            registry=self.registry,
        )
        self.backstop_found = Counter(
            "meterstream_reporter_backstop_found",
            "Due windows the periodic full comparison found missing from the report queue "
            "(then queued). Must stay 0: anything else means a change was not queued.",
            registry=self.registry,
        )
        self.billing_lag = Gauge(
            "meterstream_reporter_billing_lag_seconds",
            "Age of the oldest closed window whose usage Stripe has not acknowledged and that "
            "could be sent: held windows, held (customer, meter) pairs and unknown rows apart "
            "(see meterstream_reporter_held_windows, meterstream_reporter_held_keys and "
            "meterstream_reporter_ledger_unknown_rows).",
            registry=self.registry,
        )
        self.last_cycle = Gauge(
            "meterstream_reporter_last_cycle_timestamp_seconds",
            "When the last report cycle finished (Unix time).",
            registry=self.registry,
        )
        self.possibly_invoiced = Gauge(
            "meterstream_reporter_possibly_invoiced_rows",
            "Meter events acknowledged in the last 35 days more than an hour (Stripe's invoice "
            "grace) after their timestamp: a billing period may have been invoiced without "
            "them; meterstream status lists them with their units.",
            ["meter"],
            registry=self.registry,
        )
        self.possibly_invoiced_units = Gauge(
            "meterstream_reporter_possibly_invoiced_units",
            "The Stripe units of meterstream_reporter_possibly_invoiced_rows.",
            ["meter"],
            registry=self.registry,
        )
        self.rows_behind_mark = Gauge(
            "meterstream_reporter_ledger_rows_behind_mark",
            "Ledger rows missing against the mark kept in Kafka: above 0 the database was "
            "restored and all sending is held until meterstream report --accept-restore.",
            registry=self.registry,
        )
        self.pruned_rows = Counter(
            "meterstream_reporter_pruned_rows",
            "Final ledger rows deleted past METERSTREAM_LEDGER_RETENTION_DAYS (rejected ones past "
            "METERSTREAM_LEDGER_REJECTED_RETENTION_DAYS), by table.",
            ["table"],
            registry=self.registry,
        )


class WebhookMetrics:
    """What the Stripe webhook route and its processing count (reporters/webhooks/)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.events = Counter(
            "meterstream_stripe_webhook_events",
            "Stripe webhook events by type and outcome: stored (new, committed before the 2xx), "
            "duplicate (a delivery of an event already stored), refused (bad or missing "
            "signature, stale, unreadable: 400, nothing stored; type unknown), applied, stale "
            "(older than what was applied), ignored (a type nothing acts on), failed (an "
            "action failed; retried).",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.pending = Gauge(
            "meterstream_stripe_webhook_events_pending",
            "Stored Stripe events not yet acted on (waiting, or retried after a failure).",
            registry=self.registry,
        )
        self.failing = Gauge(
            "meterstream_stripe_webhook_events_failing",
            "Stored Stripe events whose action failed at least once and is being retried "
            "(meterstream status shows the error).",
            registry=self.registry,
        )
        self.oldest_pending = Gauge(
            "meterstream_stripe_webhook_oldest_pending_seconds",
            "Age of the oldest stored Stripe event not yet acted on; 0 when none.",
            registry=self.registry,
        )
        self.meter_errors = Counter(
            "meterstream_stripe_meter_errors",
            "Meter events Stripe refused after accepting them (its error reports), by meter "
            "event name and Stripe error code; no_meter: Stripe has no meter for the name.",
            ["event_name", "code"],
            registry=self.registry,
        )
        self.rows_rejected = Counter(
            "meterstream_stripe_meter_error_rows_rejected",
            "Ledger rows made rejected by Stripe's error reports (found by identifier), by code.",
            ["code"],
            registry=self.registry,
        )
        self.payment_failures = Counter(
            "meterstream_stripe_payment_failures",
            "Invoice payment failures Stripe reported, by failure code.",
            ["code"],
            registry=self.registry,
        )
        self.open_failures = Gauge(
            "meterstream_stripe_payment_failures_open",
            "Invoices whose payment failed and that are not paid yet.",
            registry=self.registry,
        )
        self.amount_at_risk = Gauge(
            "meterstream_stripe_payment_failures_amount_at_risk",
            "What the open failed invoices still owe, per currency, in the currency's minor "
            "unit (cents).",
            ["currency"],
            registry=self.registry,
        )
        self.billing_alerts = Counter(
            "meterstream_stripe_billing_alerts",
            "Stripe usage-threshold alerts triggered (billing.alert.triggered); per alert and "
            "customer in the billing_alert_counts table (an alert is often one customer's: a "
            "label per alert would be a series per customer).",
            registry=self.registry,
        )
        self.pruned_rows = Counter(
            "meterstream_stripe_webhook_pruned_rows",
            "Processed Stripe events, closed payment failures and usage alert counts deleted past "
            "retention, by table.",
            ["table"],
            registry=self.registry,
        )


class HttpMetrics:
    """What ``meterstream serve`` counts and measures. Labels never hold a key or a customer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "meterstream_http_requests",
            "HTTP requests answered, by route template and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "meterstream_http_request_duration_seconds",
            "Time from a request's arrival to its answer, by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.events_accepted = Counter(
            "meterstream_http_events_accepted",
            "Events of POST /v1/events that Kafka acknowledged (answered 202).",
            registry=self.registry,
        )
        self.events_refused = Counter(
            "meterstream_http_events_refused",
            "Events of POST /v1/events not accepted, by reason: the field at fault (400), "
            "event (413: too large), body (unreadable), kafka (503).",
            ["reason"],
            registry=self.registry,
        )
        self.produce_latency = Histogram(
            "meterstream_http_produce_duration_seconds",
            "Time from producing a request's events to Kafka's acknowledgement of the last one.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.kafka_queue = Gauge(
            "meterstream_http_kafka_queue_events",
            "Events produced by the HTTP server and not yet acknowledged by Kafka.",
            registry=self.registry,
        )
