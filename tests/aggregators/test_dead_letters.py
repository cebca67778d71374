"""Dead letters are listed and replayed by the command line, and a replay counts each event once.

Real worker processes, the real broker, real PostgreSQL, the ``meterstream`` command as a process.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import click
import orjson
import pytest
from sqlalchemy import Engine, func, select

from aggregators.dead_letters import DeadLetter, worth_replaying
from ingest import UsageClient
from meterstream.cli.dead_letters import parse_since
from meterstream.schema import rejected_events, window_totals
from meterstream.settings import Settings
from tests.aggregators.test_worker import migrated
from tests.aggregators.workers import all_applied, environment, wait_until, worker

SettingsFactory = Callable[..., Settings]


def meterstream(settings: Settings, *arguments: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "meterstream", *arguments],
        env=environment(settings),
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def token_total(engine: Engine) -> tuple[Decimal, int]:
    query = select(
        func.coalesce(func.sum(window_totals.c.value), 0),
        func.coalesce(func.sum(window_totals.c.events), 0),
    ).where(window_totals.c.meter == "tokens")
    with engine.connect() as connection:
        value, events = connection.execute(query).one()
    return Decimal(value), int(events)


def dead_lettered(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(select(func.count()).select_from(rejected_events)).scalar_one()
        )


def test_an_unknown_meter_is_replayed_once_the_meter_is_added_and_counted_once(
    settings_factory: SettingsFactory,
    topic_factory: Callable[..., str],
    postgres_url: str,
    tmp_path: Path,
) -> None:
    full = settings_factory(topic=topic_factory(2), database_url=postgres_url)
    without_tokens = tmp_path / "meters.toml"
    without_tokens.write_text('[meters.api_calls]\naggregation = "count"\nwindow = "1m"\n')
    before = full.model_copy(update={"meters_file": without_tokens})
    engine = migrated(full)
    now = datetime.now(UTC)
    with UsageClient(full) as client:  # the producers already know the new meter
        for i, value in enumerate((5, 7, 11)):
            client.record("customer-1", "tokens", value, timestamp=now - timedelta(minutes=i))
        client.record("customer-1", "api_calls", 1, timestamp=now)
    with worker(before, tmp_path / "worker.log"):
        wait_until(lambda: all_applied(before, engine), what="the first events handled")
    assert dead_lettered(engine) == 3

    listed = orjson.loads(meterstream(before, "dead-letters", "list", "--json"))
    assert sorted(r["reason"] for r in listed) == ["unknown_meter"] * 3
    assert {r["meter"] for r in listed} == {"tokens"}
    assert (
        meterstream(before, "dead-letters", "list", "--reason", "unparseable", "--json") == "[]\n"
    )
    assert "3 dead letter(s)" in meterstream(before, "dead-letters", "list", "--since", "1h")

    # The meter is added to the catalogue and the workers restarted; then the replay.
    with worker(full, tmp_path / "worker.log"):
        out = meterstream(full, "dead-letters", "replay", "--reason", "unknown_meter")
        assert "replayed 3 dead letter(s)" in out
        wait_until(lambda: token_total(engine) == (Decimal(23), 3), what="the replay counted")
        # Run twice: the same three events again, skipped by their deduplication keys.
        meterstream(full, "dead-letters", "replay", "--since", "1d")
        wait_until(lambda: all_applied(full, engine), what="the second replay handled")
    assert token_total(engine) == (Decimal(23), 3)
    assert dead_lettered(engine) == 3
    engine.dispose()


def test_since_takes_a_time_or_a_span() -> None:
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("2026-12-01T10:00:00", now) == datetime(2026, 12, 1, 10, tzinfo=UTC)
    assert parse_since("2026-12-01T10:00:00+01:00", now) == datetime(2026, 12, 1, 9, tzinfo=UTC)
    assert parse_since(None, now) is None
    with pytest.raises(click.BadParameter, match="a span such as 90m"):
        parse_since("yesterday", now)


def test_a_replay_leaves_out_reasons_that_can_never_pass_unless_named() -> None:
    at = datetime(2026, 12, 1, tzinfo=UTC)
    letters = [
        DeadLetter("usage", 0, offset, reason, "", None, None, None, at, b"{}")
        for offset, reason in enumerate(
            ["unknown_meter", "beyond_horizon", "too_large", "beyond_stripe_digits", "in_future"]
        )
    ]
    assert [x.reason for x in worth_replaying(letters, None)] == ["unknown_meter", "in_future"]
    named = worth_replaying(letters, "too_large")
    assert [x.reason for x in named] == ["unknown_meter", "too_large", "in_future"]
