"""Every query in the dashboard and the alerts names a metric that meterstream really exports."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from meterstream.metrics import (
    AggregatorMetrics,
    HttpMetrics,
    IngestMetrics,
    ReporterMetrics,
    WebhookMetrics,
)
from tests.deploy.conftest import GRAFANA_DIR, PROMETHEUS_DIR, load_yaml

# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up"}
# Words of PromQL that are not followed by "(" and are not metric names.
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan"}
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors, $__rate_interval included
    expr = _CLAUSE.sub("", expr)
    names = set()
    for match in _IDENTIFIER.finditer(expr):
        word = match.group()
        if word.lower() in _KEYWORDS or expr[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def exported_series() -> set[str]:
    """Sample names the three metric sets produce, each on its own fresh registry."""
    names: set[str] = set()
    for metrics_class in (
        IngestMetrics,
        AggregatorMetrics,
        ReporterMetrics,
        HttpMetrics,
        WebhookMetrics,
    ):
        metrics = metrics_class(CollectorRegistry())
        for metric in vars(metrics).values():
            # A labelled metric has no sample until it has a child: make one.
            if isinstance(metric, MetricWrapperBase) and metric._labelnames:
                metric.labels(*("x" for _ in metric._labelnames))
        for family in metrics.registry.collect():
            names.update(sample.name for sample in family.samples)
    return names


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "meterstream.json").read_text())
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])]


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{job="x"}[$__rate_interval])))'
        " or sum by (code) (b_total unless b_total offset 15m) > 1e3 and time() - c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def test_the_exported_names_carry_the_client_library_suffixes() -> None:
    exported = exported_series()
    assert "meterstream_aggregator_events_dead_lettered_total" in exported
    assert "meterstream_aggregator_batch_latency_seconds_bucket" in exported
    assert "meterstream_reporter_billing_lag_seconds" in exported


@pytest.mark.parametrize(
    "source", ["dashboard", "alerts", "alert unit tests"], ids=["dashboard", "alerts", "tests"]
)
def test_every_query_names_an_exported_metric(source: str) -> None:
    if source == "dashboard":
        queries = dashboard_queries()
    elif source == "alerts":
        rules = load_yaml((PROMETHEUS_DIR / "alerts.yml").read_text())
        queries = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    else:
        cases = load_yaml((PROMETHEUS_DIR / "alerts_test.yml").read_text())
        queries = [series["series"] for test in cases["tests"] for series in test["input_series"]]
    known = exported_series() | PROMETHEUS_SERIES
    used = set().union(*(metric_names(query) for query in queries))
    assert used, f"no metric found in the {source}"
    assert used <= known, f"not exported by meterstream: {sorted(used - known)}"
    assert all(metric_names(query) for query in queries), "a query without a metric"
