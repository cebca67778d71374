"""``meterstream status`` says whether the configured rate keeps up, in text and JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from sqlalchemy import Engine

from tests.cli.commands import meterstream
from tests.reporters.test_capacity import changed_windows


def test_status_warns_when_the_rate_cannot_keep_up(
    env: dict[str, str], migrated_engine: Engine
) -> None:
    changed_windows(migrated_engine, 720, datetime.now(UTC))
    slow = {**env, "METERSTREAM_STRIPE_RATE": "0.1"}

    shown = meterstream(slow, "status")
    as_json = meterstream(slow, "status", "--json")

    assert shown.returncode == 0, shown.stderr
    assert "sending (v1 at METERSTREAM_STRIPE_RATE=0.1 calls/s): CANNOT KEEP UP" in shown.stdout
    assert json.loads(as_json.stdout)["reporter"]["sending"]["keeps_up"] is False
    assert "keeps up: 12 window(s)" in meterstream(env, "status").stdout
