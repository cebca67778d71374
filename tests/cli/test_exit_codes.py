"""One meaning per exit code, in every command (see ``meterstream --help``): 0 done, 1 pending
or drifting (run again later), 2 configuration or start-up error (fix it), 3 a person acts."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from stripe_emulator import Emulator
from tests.cli.commands import meterstream
from tests.reporters.test_reporter import SECRET, hour_start, put_total


def test_0_when_everything_due_is_acknowledged(
    env: dict[str, str], migrated_engine: Engine
) -> None:
    put_total(migrated_engine, "cus_a", "tokens", hour_start(2), "5")
    assert meterstream(env, "report", "--once").returncode == 0


def test_1_while_due_usage_is_pending(
    emulator: Emulator, env: dict[str, str], migrated_engine: Engine
) -> None:
    put_total(migrated_engine, "cus_a", "tokens", hour_start(2), "5")
    emulator.faults.inject("http_500", count=None, path_prefix="/v1/billing/meter_events")
    assert meterstream(env, "report", "--once").returncode == 1


def test_2_for_a_key_stripe_refuses_so_cron_does_not_retry_forever(
    env: dict[str, str], migrated_engine: Engine
) -> None:
    put_total(migrated_engine, "cus_a", "tokens", hour_start(2), "5")
    # Well formed, but the (test-mode) emulator refuses live keys, as Stripe refuses a
    # revoked one: 401.
    refused = meterstream(
        {**env, "METERSTREAM_STRIPE_API_KEY": "sk_live_51H8revokedKeyXyzzy"}, "report", "--once"
    )
    assert refused.returncode == 2, refused.stderr
    assert "sk_live_51H8revokedKeyXyzzy" not in refused.stderr + refused.stdout


def test_2_for_a_missing_key_a_missing_catalogue_or_an_unreachable_database(
    env: dict[str, str], tmp_path: Path
) -> None:
    no_key = {k: v for k, v in env.items() if k != "METERSTREAM_STRIPE_API_KEY"}
    assert meterstream(no_key, "report", "--once").returncode == 2
    no_file = {**env, "METERSTREAM_METERS_FILE": str(tmp_path / "missing.toml")}
    assert meterstream(no_file, "report", "--once").returncode == 2
    assert meterstream(no_file, "reconcile").returncode == 2
    assert meterstream(no_file, "status").returncode == 2
    no_database = {
        **env,
        "METERSTREAM_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/nowhere",
    }
    assert meterstream(no_database, "report", "--once").returncode == 2
    assert meterstream(no_database, "customers", "link", "acme", "cus_a").returncode == 2


def test_3_when_usage_needs_a_person(env: dict[str, str], migrated_engine: Engine) -> None:
    put_total(migrated_engine, "acme", "tokens", hour_start(2), "3")  # acme is not linked
    assert meterstream(env, "report", "--once").returncode == 3


def test_the_command_group_help_lists_the_codes(env: dict[str, str]) -> None:
    helped = meterstream(env, "--help")
    assert helped.returncode == 0
    for line in ("0  done", "1  work still pending", "2  configuration", "3  a person must act"):
        assert line in helped.stdout


def test_no_secret_in_any_of_it(env: dict[str, str]) -> None:
    no_file = {**env, "METERSTREAM_METERS_FILE": "/nonexistent/meters.toml"}
    done = meterstream(no_file, "report", "--once")
    assert SECRET not in done.stdout + done.stderr


def test_2_for_a_changed_unit_scale_and_3_for_a_held_key(
    env: dict[str, str], migrated_engine: Engine, tmp_path: Path
) -> None:
    put_total(migrated_engine, "cus_a", "tokens", hour_start(2), "5")
    assert meterstream(env, "report", "--once").returncode == 0
    catalogue = Path(env["METERSTREAM_METERS_FILE"]).read_text(encoding="utf-8")
    rescaled = tmp_path / "rescaled.toml"
    rescaled.write_text(
        catalogue.replace(
            'stripe_event_name = "tokens"\n', 'stripe_event_name = "tokens"\nunit_scale = "1000"\n'
        ),
        encoding="utf-8",
    )
    refused = meterstream({**env, "METERSTREAM_METERS_FILE": str(rescaled)}, "report", "--once")
    assert refused.returncode == 2
    assert "meter 'tokens': unit_scale is 1000" in refused.stderr

    put_total(migrated_engine, "cus_a", "storage", hour_start(2), "10000000000000000000")
    held = meterstream(env, "report", "--once")
    assert held.returncode == 3
    assert "held cus_a storage: value_out_of_range" in held.stderr
    assert "value_out_of_range: cus_a storage" in meterstream(env, "status").stdout
