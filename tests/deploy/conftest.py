"""Fixtures for the deploy checks: the files under deploy/, docker-compose.yml, and the real tools.

promtool, prometheus and docker-compose come from Debian (scripts/system-deps.sh installs them;
`make test` runs it first). YAML is read with PyYAML, a dev dependency.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"

# What docker-compose needs to interpolate the file; the key only has a Stripe key's shape.
COMPOSE_VARIABLES = {
    "STRIPE_API_KEY": "sk_test_composeconfigcheck",
    "POSTGRES_PASSWORD": "composecheck",
    "GRAFANA_ADMIN_PASSWORD": "composecheck",
}

T = TypeVar("T")


def tool(name: str) -> str:
    """The path of a system tool; fail, saying how to install it, when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: run scripts/system-deps.sh (make test does)")
    return path


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False
    )


def load_yaml(text: str) -> Any:
    """Parse YAML safely (no arbitrary Python objects)."""
    return yaml.safe_load(text)


def compose_environment(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES}
    env.update(COMPOSE_VARIABLES)
    env.update(overrides)
    return env


def poll(find: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Call ``find`` until it returns something; fail after ``timeout_s`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = find()
        if found is not None:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    """docker-compose.yml as docker-compose resolves it: variables interpolated, anchors merged."""
    done = run(tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", env=compose_environment())
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = load_yaml(done.stdout)
    return config


@pytest.fixture(scope="session")
def prometheus_config() -> dict[str, Any]:
    config: dict[str, Any] = load_yaml((PROMETHEUS_DIR / "prometheus.yml").read_text())
    return config


@pytest.fixture(scope="session")
def alert_rules() -> list[dict[str, Any]]:
    rules = load_yaml((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def meterstream_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The compose services that run the meterstream image (built from the Dockerfile)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if "build" in service or str(service.get("image", "")).startswith("meterstream")
    }
