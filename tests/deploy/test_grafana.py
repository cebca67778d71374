"""deploy/grafana/: a provisioned Prometheus data source and a dashboard whose panels all query."""

from __future__ import annotations

import json
from typing import Any

from tests.deploy.conftest import GRAFANA_DIR, load_yaml
from tests.deploy.test_metric_names import dashboard_panels, metric_names

DASHBOARD = GRAFANA_DIR / "dashboards" / "meterstream.json"


def datasource() -> dict[str, Any]:
    provisioned = load_yaml(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (only,) = provisioned["datasources"]
    return dict(only)


def test_dashboard_is_valid_json_with_a_uid_and_title() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "meterstream"
    assert dashboard["title"]
    assert "id" not in dashboard or dashboard["id"] is None


def test_every_panel_has_a_query_on_the_provisioned_data_source() -> None:
    uid = datasource()["uid"]
    panels = [panel for panel in dashboard_panels() if panel["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == uid, panel["title"]


def test_dashboard_shows_flow_lag_and_errors() -> None:
    shown = set().union(
        *(metric_names(t["expr"]) for p in dashboard_panels() for t in p.get("targets", []))
    )
    for needed in (
        "meterstream_ingest_events_recorded_total",
        "meterstream_aggregator_events_applied_total",
        "meterstream_reporter_meter_events_sent_total",
        "meterstream_aggregator_consumer_lag_messages",
        "meterstream_aggregator_event_time_lag_seconds",
        "meterstream_reporter_billing_lag_seconds",
        "meterstream_reporter_meter_events_rejected_total",
        "meterstream_reporter_rate_limited_responses_total",
        "meterstream_aggregator_events_dead_lettered_total",
        "meterstream_aggregator_duplicates_skipped_total",
        "meterstream_aggregator_batch_latency_seconds_bucket",
    ):
        assert needed in shown, needed
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    assert any(e.startswith("histogram_quantile(0.99") for e in exprs)


def test_data_source_is_the_compose_prometheus(compose: dict[str, Any]) -> None:
    source = datasource()
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]


def test_grafana_service_mounts_the_provisioning_and_the_dashboards(
    compose: dict[str, Any],
) -> None:
    provider = load_yaml(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "meterstream.yml").read_text()
    )
    (only,) = provider["providers"]
    mounts = {
        volume.split(":")[1]: volume.split(":")[0]
        for volume in compose["services"]["grafana"]["volumes"]
        if volume.startswith("/")
    }
    assert mounts["/etc/grafana/provisioning"] == str(GRAFANA_DIR / "provisioning")
    assert mounts[only["options"]["path"]] == str(DASHBOARD.parent)
