"""A database restored from a real pg_dump between two report cycles: the reporter notices
(the ledger is behind its mark on the broker), sends nothing, says so, and resumes only after
a person accepts the restore."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import Engine

from meterstream.deployment import stored_deployment_id
from reporters.ledger import all_rows
from stripe_emulator import Emulator
from tests.cli.commands import meterstream
from tests.cli.conftest import command_env
from tests.reporters.test_reporter import hour_start, put_total


@pytest.fixture
def pg_env(
    emulator: Emulator, postgres_url: str, tmp_path: Path, kafka_bootstrap: str
) -> dict[str, str]:
    return command_env(emulator, postgres_url, tmp_path, kafka_bootstrap)


def _tool(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_a_restored_database_holds_all_sending_until_the_restore_is_accepted(
    emulator: Emulator,
    pg_env: dict[str, str],
    postgres_engine: Engine,
    postgres_url: str,
    tmp_path: Path,
) -> None:
    window = hour_start(2)
    put_total(postgres_engine, "cus_a", "tokens", window, "5")
    assert meterstream(pg_env, "report", "--once").returncode == 0
    dump = tmp_path / "backup.dump"
    _tool("pg_dump", "--format=custom", f"--file={dump}", postgres_url)
    put_total(postgres_engine, "cus_a", "tokens", window, "8")  # revision 2
    assert meterstream(pg_env, "report", "--once").returncode == 0
    assert [e.value for e in emulator.state.events] == [5, 3]
    deployment_before = stored_deployment_id(postgres_engine)

    postgres_engine.dispose()
    _tool("pg_restore", "--clean", "--if-exists", f"--dbname={postgres_url}", str(dump))
    assert len(all_rows(postgres_engine)) == 1  # the ledger went back in time
    # The aggregators count on: revision 2 again, with another value than the lost one.
    put_total(postgres_engine, "cus_a", "tokens", window, "9")

    held = meterstream(pg_env, "report", "--once")
    status = meterstream(pg_env, "status")
    facts = json.loads(meterstream(pg_env, "status", "--json").stdout)["reporter"]
    compared = meterstream(pg_env, "reconcile")

    assert held.returncode == 3, held.stderr
    assert "the database was restored" in held.stderr
    assert [e.value for e in emulator.state.events] == [5, 3]  # nothing sent
    assert len(all_rows(postgres_engine)) == 1  # nothing written
    assert "SENDING HELD" in status.stdout
    assert (facts["restore_hold"]["ledger_rows"], facts["restore_hold"]["mark_rows"]) == (1, 2)
    assert compared.returncode == 1  # Stripe has 8, the ledger knows of 5
    assert "DRIFT: cus_a tokens (cus_a): Stripe 8, ledger acknowledged 5" in compared.stdout

    accepted = meterstream(pg_env, "report", "--accept-restore")
    assert accepted.returncode == 0, accepted.stderr
    assert stored_deployment_id(postgres_engine) != deployment_before
    resumed = meterstream(pg_env, "report", "--once")

    assert resumed.returncode == 0, resumed.stderr
    rows = all_rows(postgres_engine)
    assert [(r.revision, r.value, r.status) for r in rows] == [(1, 5, "sent"), (2, 4, "sent")]
    # The new row went out under a new identifier: not taken for the lost one ("already
    # exists" with another amount). Stripe holds the lost 3 units too, as reconcile showed.
    assert [e.value for e in emulator.state.events] == [5, 3, 4]
    assert "SENDING HELD" not in meterstream(pg_env, "status").stdout


def test_without_the_broker_the_mark_cannot_be_checked_and_nothing_is_sent(
    emulator: Emulator, pg_env: dict[str, str], postgres_engine: Engine
) -> None:
    put_total(postgres_engine, "cus_a", "tokens", hour_start(2), "5")
    no_broker = {**pg_env, "METERSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:9"}

    failed = meterstream(no_broker, "report", "--once")

    assert failed.returncode == 1  # run again later
    assert "could not read or write the ledger mark" in failed.stderr
    assert emulator.state.events == ()
    assert meterstream(pg_env, "report", "--once").returncode == 0
    assert [e.value for e in emulator.state.events] == [5]
