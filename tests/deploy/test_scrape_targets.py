"""Prometheus scrapes exactly the compose services that serve /metrics, at the ports they serve."""

from __future__ import annotations

from typing import Any

from meterstream.settings import Settings
from tests.deploy.conftest import PROMETHEUS_DIR, meterstream_services

# Long-running subcommands that serve /metrics, and the scrape job that should find them.
JOB_OF_COMMAND = {"aggregate": "aggregator", "report": "reporter", "serve": "http"}


def served_targets(compose: dict[str, Any]) -> dict[str, set[str]]:
    """job -> {"service:port"} from the compose services, as Prometheus must see them."""
    default_port = Settings.model_fields["metrics_port"].default
    targets: dict[str, set[str]] = {job: set() for job in JOB_OF_COMMAND.values()}
    for name, service in meterstream_services(compose).items():
        job = JOB_OF_COMMAND.get(service["command"][0])
        if job is None:
            continue
        port = int(service.get("environment", {}).get("METERSTREAM_METRICS_PORT", default_port))
        assert port != 0, f"{name} serves no /metrics (METERSTREAM_METRICS_PORT=0)"
        # On the compose network a service is reached by its name.
        targets[job].add(f"{name}:{port}")
    return targets


def test_every_metrics_server_listens_on_the_compose_network(compose: dict[str, Any]) -> None:
    # The default host is loopback, which Prometheus in its own container could not reach.
    assert Settings.model_fields["metrics_host"].default == "127.0.0.1"
    for name, service in meterstream_services(compose).items():
        if service["command"][0] in JOB_OF_COMMAND:
            host = service["environment"].get("METERSTREAM_METRICS_HOST")
            assert host == "0.0.0.0", name  # noqa: S104 - inside the compose network
            metrics_port = service["environment"].get("METERSTREAM_METRICS_PORT", "9464")
            # docker compose config writes ports in the long form ({"target": 8480, ...}).
            published = [
                str(p["target"]) if isinstance(p, dict) else str(p).rsplit(":", 1)[-1]
                for p in service.get("ports", [])
            ]
            assert metrics_port not in published, f"{name} publishes /metrics beyond the network"
            if service["command"][0] == "serve":  # the API itself is published, nothing else
                assert published == [service["environment"]["METERSTREAM_HTTP_PORT"]], name
            else:
                assert not published, f"{name} publishes a port beyond the network"


def scraped_targets(prometheus_config: dict[str, Any]) -> dict[str, set[str]]:
    return {
        job["job_name"]: {t for static in job["static_configs"] for t in static["targets"]}
        for job in prometheus_config["scrape_configs"]
    }


def test_prometheus_scrapes_every_metrics_port_the_stack_serves(
    compose: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    scraped = scraped_targets(prometheus_config)
    for job, targets in served_targets(compose).items():
        assert targets, f"no compose service for job {job}"
        assert scraped.get(job) == targets, job


def test_prometheus_scrapes_nothing_the_stack_does_not_serve(
    compose: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    served = set().union(*served_targets(compose).values())
    scraped = scraped_targets(prometheus_config)
    extra = set().union(*(t for job, t in scraped.items() if job != "prometheus")) - served
    assert not extra
    assert scraped["prometheus"] == {"localhost:9090"}


def test_prometheus_service_reads_this_config_and_its_rules(
    compose: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    service = compose["services"]["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in service["command"]
    assert any(
        volume.startswith(str(PROMETHEUS_DIR) + ":/etc/prometheus:")
        for volume in service["volumes"]
    )
    assert prometheus_config["rule_files"] == ["alerts.yml"]
