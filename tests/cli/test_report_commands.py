"""The reporter's command line, run as a real process: kill -9 mid-call, exit codes, links."""

from __future__ import annotations

import signal
import subprocess
import time
from decimal import Decimal

import pytest
from sqlalchemy import Engine

from meterstream.embedded import free_port
from meterstream.metrics_endpoint import scrape
from meterstream.schema import window_totals
from reporters.ledger import all_rows
from stripe_emulator import Emulator
from tests.cli.commands import METERSTREAM, meterstream
from tests.reporters.test_reporter import SECRET, hour_start, put_total
from tests.sockets import listening_hosts


def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_killed_between_call_and_ledger_update_counts_once_after_restart(
    emulator: Emulator, env: dict[str, str], migrated_engine: Engine
) -> None:
    put_total(migrated_engine, "cus_a", "tokens", hour_start(2), "5")
    emulator.faults.inject("hold", path_prefix="/v1/billing/meter_events")
    process = subprocess.Popen(
        [METERSTREAM, "report", "--once"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert emulator.faults.wait_held(1, timeout_s=30)
        [row] = all_rows(migrated_engine)
        assert row.status == "pending"  # committed before the call
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    emulator.faults.release()
    wait_for(lambda: len(emulator.state.events) == 1)  # Stripe got it; its answer was lost

    again = meterstream(env, "report", "--once")

    assert again.returncode == 0, again.stderr
    [row] = all_rows(migrated_engine)
    assert row.status == "sent"
    assert [(e.identifier, e.value) for e in emulator.state.events] == [(row.identifier, 5)]
    assert SECRET not in again.stderr + again.stdout


def test_once_exits_non_zero_while_something_due_is_unacknowledged(
    emulator: Emulator, env: dict[str, str], migrated_engine: Engine
) -> None:
    put_total(migrated_engine, "cus_a", "tokens", hour_start(2), "5")
    emulator.faults.inject("http_500", count=None, path_prefix="/v1/billing/meter_events")

    failed = meterstream(env, "report", "--once")

    assert failed.returncode == 1
    assert "1 due report(s) not acknowledged by Stripe yet" in failed.stderr
    emulator.faults.clear()
    assert meterstream(env, "report", "--once").returncode == 0
    assert emulator.state.totals() == {("tokens", "cus_a"): 5}


def test_customers_link_then_held_usage_goes_out_and_status_shows_it(
    emulator: Emulator, env: dict[str, str], migrated_engine: Engine
) -> None:
    put_total(migrated_engine, "acme", "tokens", hour_start(2), "3")
    held_once = meterstream(env, "report", "--once")
    assert held_once.returncode == 3  # held usage needs a person
    assert "1 report(s) held: no_customer_link" in held_once.stderr
    held = meterstream(env, "status")
    assert "no_customer_link: acme tokens" in held.stdout

    bad = meterstream(env, "customers", "link", "acme", "acme-stripe")
    assert bad.returncode != 0 and "must look like cus_" in bad.stderr
    assert meterstream(env, "customers", "link", "acme", "cus_a").returncode == 0
    assert "acme -> cus_a" in meterstream(env, "customers", "list").stdout
    assert meterstream(env, "report", "--once").returncode == 0

    assert emulator.state.totals() == {("tokens", "cus_a"): 3}
    status = meterstream(env, "status")
    assert "ledger: sent=1" in status.stdout
    assert "held windows (not sent until a person acts; not in the billing lag): 0" in status.stdout
    reconciled = meterstream(env, "reconcile")
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    assert "ok: cus_a tokens (acme): Stripe 3, ledger acknowledged 3, database 3" in (
        reconciled.stdout
    )


def test_report_refuses_to_start_without_a_key(env: dict[str, str]) -> None:
    del env["METERSTREAM_STRIPE_API_KEY"]
    failed = meterstream(env, "report", "--once")
    assert failed.returncode != 0
    assert "METERSTREAM_STRIPE_API_KEY is not set" in failed.stderr


def test_reconcile_refuses_a_since_before_the_ledger_retention(env: dict[str, str]) -> None:
    env["METERSTREAM_LEDGER_RETENTION_DAYS"] = "40"
    failed = meterstream(env, "reconcile", "--since", "2020-01-01")
    assert failed.returncode == 2
    assert "METERSTREAM_LEDGER_RETENTION_DAYS=40 days" in failed.stderr


def test_report_stops_cleanly_on_sigterm(env: dict[str, str]) -> None:
    with subprocess.Popen(
        [METERSTREAM, "report"], env=env, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stderr is not None
            for line in process.stderr:
                if "report cycle:" in line:
                    break
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
        finally:
            if process.poll() is None:
                process.kill()


def test_report_serves_metrics_on_loopback_by_default(env: dict[str, str]) -> None:
    port = free_port()
    env["METERSTREAM_METRICS_PORT"] = str(port)
    with subprocess.Popen([METERSTREAM, "report"], env=env, stderr=subprocess.DEVNULL) as process:
        try:
            wait_for(lambda: bool(scrape(port)), timeout_s=60)
            assert listening_hosts(port) == {"127.0.0.1"}
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


def test_once_exits_3_when_usage_is_rejected_in_the_cycle_and_says_why(
    emulator: Emulator, env: dict[str, str], migrated_engine: Engine
) -> None:
    put_total(migrated_engine, "cus_nobody", "tokens", hour_start(2), "5")

    rejected = meterstream(env, "report", "--once")

    assert rejected.returncode == 3
    assert "1 report(s) rejected in this cycle" in rejected.stderr
    # Rejected for good, so not again: a rerun has nothing left to do.
    assert meterstream(env, "report", "--once").returncode == 0
    assert "3  usage needs a person" in meterstream(env, "report", "--help").stdout


@pytest.mark.parametrize("tail", ["\n", "\r", " "])
def test_key_with_trailing_whitespace_fails_at_start_without_the_key(
    env: dict[str, str], tail: str
) -> None:
    env["METERSTREAM_STRIPE_API_KEY"] = SECRET + tail

    failed = meterstream(env, "report", "--once")

    assert failed.returncode != 0
    assert "METERSTREAM_STRIPE_API_KEY" in failed.stderr
    assert SECRET not in failed.stderr + failed.stdout
    assert SECRET[8:] not in failed.stderr + failed.stdout


def test_once_with_backstop_reports_a_change_the_report_queue_missed(
    emulator: Emulator, env: dict[str, str], migrated_engine: Engine
) -> None:
    put_total(migrated_engine, "cus_a", "tokens", hour_start(2), "5")
    assert meterstream(env, "report", "--once").returncode == 0
    with migrated_engine.begin() as connection:  # a writer that forgets the report queue
        connection.execute(window_totals.update().values(value=Decimal(7), revision=2))
    assert meterstream(env, "report", "--once").returncode == 0
    assert emulator.state.totals() == {("tokens", "cus_a"): 5}  # the queue does not know

    found = meterstream(env, "report", "--once", "--backstop")

    assert found.returncode == 0, found.stderr
    assert "due windows were missing from the report queue; queued now" in found.stderr
    assert emulator.state.totals() == {("tokens", "cus_a"): 7}
