"""The command group's own options: --version, --log-level, --log-format; and the demo's
example catalogue, which ships inside the package."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from fnmatch import fnmatch
from importlib.metadata import version
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from meterstream.cli.logs import JsonFormatter
from meterstream.db import build_engine, migrate
from meterstream.meters import EXAMPLE_CATALOGUE
from meterstream.processes import start_meterstream, stop_process
from meterstream.settings import Settings
from tests.cli.commands import meterstream
from tests.conftest import EXAMPLE_METERS, ROOT
from tests.reporters.test_reporter import hour_start, put_total


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a JSON object; fails on a line that is not one."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_version_is_the_installed_package_version(tmp_path: Path) -> None:
    done = meterstream({}, "--version", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"meterstream, version {version('meterstream')}\n"


def test_log_format_json_writes_each_log_line_as_one_object(
    env: dict[str, str], migrated_engine: Engine
) -> None:
    put_total(migrated_engine, "cus_a", "tokens", hour_start(2), "5")

    done = meterstream(env, "--log-format", "json", "report", "--once")

    assert done.returncode == 0, done.stderr
    records = json_lines(done.stderr)
    [cycle] = [r for r in records if r["message"].startswith("report cycle:")]
    assert cycle["level"] == "INFO"
    assert cycle["logger"] == "reporters.service"
    assert cycle["time"].endswith("Z")
    assert "acknowledged 1" in cycle["message"]
    # The stripe SDK's two lines per API call are debug detail, not info.
    assert not [r for r in records if r["logger"] == "stripe"]


def test_log_level_warning_leaves_out_the_info_lines(
    env: dict[str, str], migrated_engine: Engine
) -> None:
    put_total(migrated_engine, "cus_a", "tokens", hour_start(2), "5")

    done = meterstream(env, "--log-level", "warning", "report", "--once")

    assert done.returncode == 0, done.stderr
    assert "report cycle:" not in done.stderr
    assert "report cycle:" in meterstream(env, "report", "--once").stderr  # info by default


def test_json_lines_carry_customer_meter_and_identifier_passed_with_extra() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.cli.structured")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise ValueError("Stripe said no")
        except ValueError:
            log.exception(
                "meter event %s not sent",
                "ms_1",
                extra={"customer_id": "acme", "meter": "tokens", "identifier": "ms_1"},
            )
        log.warning("no fields")
    finally:
        log.removeHandler(handler)

    structured, plain = json_lines(out.getvalue())

    assert structured["message"] == "meter event ms_1 not sent"
    assert structured["level"] == "ERROR"
    assert (structured["customer_id"], structured["meter"], structured["identifier"]) == (
        "acme",
        "tokens",
        "ms_1",
    )
    assert "ValueError: Stripe said no" in structured["exception"]
    assert set(plain) == {"time", "level", "logger", "message"}


def test_a_warning_is_one_json_log_line_not_plain_text_on_stderr() -> None:
    # Python prints a warning past logging unless logging takes it.
    script = (
        "import warnings; from meterstream.cli.logs import configure_logging; "
        "configure_logging('info', 'json'); warnings.warn('old option', UserWarning)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 0, done.stderr
    [record] = json_lines(done.stderr)
    assert record["logger"] == "py.warnings"
    assert "UserWarning: old option" in record["message"]


def test_aggregate_worker_logs_faust_lines_as_json_too(
    settings_factory: Callable[..., Settings], topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    # faust's worker replaces the logging configuration when it starts; the face hands it its
    # own, so a log collector never gets a mix of formats.
    topic = topic_factory()
    settings = settings_factory(topic=topic, metrics_port=0)
    engine = build_engine(settings)
    migrate(engine)
    engine.dispose()
    log = tmp_path / "aggregate.log"
    with log.open("ab") as out:
        worker = start_meterstream(settings, "--log-format", "json", "aggregate", output=out)
    try:
        deadline = time.monotonic() + 60
        while "[^Worker]: Ready" not in log.read_text():
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        stop_process(worker)

    records = json_lines(log.read_text())
    loggers = {r["logger"] for r in records}
    assert "aggregators.worker" in loggers
    assert any(name.startswith("faust.") for name in loggers)
    assert {r["level"] for r in records} <= {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def test_the_example_catalogue_ships_in_the_package_and_examples_links_to_it() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["meterstream"]
    shipped = EXAMPLE_CATALOGUE.relative_to(ROOT / "meterstream").as_posix()

    assert any(fnmatch(shipped, pattern) for pattern in package_data), package_data
    assert EXAMPLE_METERS.resolve() == EXAMPLE_CATALOGUE


def test_the_demo_finds_its_catalogue_outside_a_checkout(tmp_path: Path) -> None:
    helped = meterstream({}, "demo", "--help", cwd=tmp_path)
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "from meterstream.cli.demo import DemoOptions\n"
            "from meterstream.meters import load_catalogue\n"
            "print(' '.join(sorted(load_catalogue(DemoOptions().meters_file).meters)))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )

    assert helped.returncode == 0, helped.stderr
    assert "--meters-file" in helped.stdout
    assert loaded.returncode == 0, loaded.stderr
    assert {"api_calls", "tokens", "storage_gb_hours"} <= set(loaded.stdout.split())
