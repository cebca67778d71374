"""deploy/prometheus/ as promtool sees it: valid config, valid rules, and rules that fire."""

from __future__ import annotations

from typing import Any

from tests.deploy.conftest import PROMETHEUS_DIR, load_yaml, run, tool


def test_scrape_config_is_valid_and_loads_the_alert_rules() -> None:
    done = run(tool("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout + done.stderr


def test_alert_rules_are_valid() -> None:
    done = run(tool("promtool"), "check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_unit_tests_pass() -> None:
    done = run(tool("promtool"), "test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_is_silent(
    alert_rules: list[dict[str, Any]],
) -> None:
    # promtool passes an expectation of silence for a misspelt alert name, so check the names.
    cases = load_yaml((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    checks = [check for test in cases["tests"] for check in test["alert_rule_test"]]
    names = {rule["alert"] for rule in alert_rules}
    assert {check["alertname"] for check in checks} <= names
    fires = {check["alertname"] for check in checks if check.get("exp_alerts")}
    silent = {check["alertname"] for check in checks if not check.get("exp_alerts")}
    assert fires == names, f"never shown to fire: {sorted(names - fires)}"
    assert silent == names, f"never shown to stay silent: {sorted(names - silent)}"


def test_every_alert_has_a_duration_a_severity_and_a_summary_saying_what_to_do(
    alert_rules: list[dict[str, Any]],
) -> None:
    for rule in alert_rules:
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        summary = rule["annotations"]["summary"]
        # What happened, then at least one instruction.
        assert len(summary.split(". ")) >= 2, rule["alert"]


def test_the_required_alerts_exist(alert_rules: list[dict[str, Any]]) -> None:
    expressions = " ".join(rule["expr"] for rule in alert_rules)
    for needed in (
        "meterstream_aggregator_consumer_lag_messages",
        "meterstream_reporter_billing_lag_seconds",
        "meterstream_reporter_backstop_found_total",
        "increase(meterstream_reporter_meter_events_rejected_total",
        "increase(meterstream_aggregator_events_dead_lettered_total",
        "up{",
        "absent(",
    ):
        assert needed in expressions, needed
