"""schemathesis against the OpenAPI document a running ``meterstream serve`` serves: for every
route, generated requests (with a valid key of scope ``all``) never get a 5xx, and every answer
matches the document (status, content type, body schema)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from aggregators.batch import BatchApplier, Message
from meterstream.api_keys import create_key
from meterstream.db import build_engine, migrate
from meterstream.events import UsageEvent, encode_event
from meterstream.meters import load_catalogue
from meterstream.metrics import AggregatorMetrics
from meterstream.settings import Settings
from tests.aggregators.serving import served
from tests.conftest import EXAMPLE_METERS

SettingsFactory = Callable[..., Settings]
# Enough to reach every route's edges; about 40 s on the shared machine.
MAX_EXAMPLES = 100  # per operation: about 15 s, bounded for CI (the seed is fixed)


def test_generated_requests_get_no_5xx_and_answers_match_the_document(
    settings_factory: SettingsFactory, postgres_url: str, tmp_path: Path
) -> None:
    settings = settings_factory(database_url=postgres_url)
    engine = build_engine(settings)
    migrate(engine)
    # Some usage to read, so the answers with windows are checked too.
    now = datetime.now(UTC)
    events = [
        UsageEvent(f"e{i}", settings.source, "c1", "tokens", Decimal(i), now - timedelta(hours=i))
        for i in range(5)
    ]
    applier = BatchApplier(
        engine, load_catalogue(EXAMPLE_METERS), AggregatorMetrics(), horizon_days=35
    )
    applier.apply([Message("usage", 0, i, encode_event(e)) for i, e in enumerate(events)])
    _key, secret = create_key(engine, "schemathesis", settings.source, "all")
    engine.dispose()
    config = tmp_path / "schemathesis.toml"
    # A body too large or a batch too long is refused with 413 (the rule), which
    # schemathesis does not expect of schema-violating data by default.
    config.write_text(
        "[checks.negative_data_rejection]\n"
        'expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", '
        '"422", "428", "429"]\n'
    )
    with served(settings, tmp_path / "serve.log") as base:
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "--config-file",
                str(config),
                "run",
                f"{base}/openapi.json",
                "--checks",
                "all",
                # A request the schema allows may still break a rule no OpenAPI schema can say
                # (windows on boundaries, a range, an event's time): a documented 400 is right.
                "--exclude-checks",
                "positive_data_acceptance",
                "--header",
                f"Authorization: Bearer {secret}",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--seed",
                "1",
                "--request-timeout",
                "30",
                "--generation-database",
                "none",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    # Lines cut short: a failing case's body may be a whole generated batch.
    report = "\n".join(line[:300] for line in (run.stdout + run.stderr).splitlines())
    assert run.returncode == 0, report[-20_000:]
