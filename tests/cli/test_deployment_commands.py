"""The deployment id on the command line: drawn by migrate, shown by status, overridable."""

from __future__ import annotations

from sqlalchemy import Engine

from meterstream.deployment import stored_deployment_id
from tests.cli.commands import meterstream


def test_status_shows_the_deployment_id_migrate_drew_or_the_setting(
    env: dict[str, str], migrated_engine: Engine
) -> None:
    stored = stored_deployment_id(migrated_engine)

    migrated = meterstream(env, "migrate")
    shown = meterstream(env, "status")
    named = meterstream({**env, "METERSTREAM_DEPLOYMENT_ID": "eu-prod-2"}, "status")
    bad = meterstream({**env, "METERSTREAM_DEPLOYMENT_ID": "has space"}, "status")

    assert f"deployment id: {stored}" in migrated.stdout, migrated.stderr
    assert f"deployment id: {stored}" in shown.stdout, shown.stderr
    assert "deployment id: eu-prod-2" in named.stdout, named.stderr
    assert bad.returncode != 0
    assert "METERSTREAM_DEPLOYMENT_ID" in bad.stderr
