"""meterstream demo: the whole pipeline in one command, verdict and exit code included."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import stripe
from sqlalchemy import create_engine

from meterstream.cli.demo import MeterRow, Traffic, print_table
from meterstream.cli.demo.traffic import MODELS, prepare_stripe, stripe_meters_by_event_name
from meterstream.meters import load_catalogue
from stripe_emulator import run_stripe_emulator
from tests.conftest import EXAMPLE_METERS


def test_demo_runs_the_pipeline_and_finds_stripe_matches_the_database(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    # Outside the checkout: the demo's catalogue comes with the package.
    done = subprocess.run(
        [sys.executable, "-m", "meterstream", "demo", "--customers", "15", "--events", "1500"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "VERDICT: the database and Stripe agree on every meter" in done.stdout
    for line in (
        "events sent",
        "duplicates skipped",
        "windows aggregated",
        "meter events reported",
    ):
        assert line in done.stdout
    for meter in ("api_calls", "tokens", "storage_gb_hours", "peak_connections", "active_users"):
        assert f"\n{meter} " in done.stdout
    # Stripe's webhook of a failed invoice, through meterstream serve, listed by payments.
    assert "invoice.payment_failed for customer-" in done.stdout
    listed = done.stdout.split("meterstream payments", 1)[1]
    assert re.search(r"4990\s+usd", listed) and "(card_declined)" in listed, done.stdout


FACTS = {"duplicates_skipped": 0, "windows": 2, "reported": 2, "carried": 0, "cycles": 1}


def test_a_difference_is_reported_with_its_size_and_fails() -> None:
    lines: list[str] = []
    rows = [MeterRow("tokens", "sum", 100, 100, 0), MeterRow("api_calls", "sum", 10, 7, 2)]
    facts = {**FACTS, "windows_wrong": 0}
    assert print_table(lines.append, Traffic(sent=10, unique=10), facts, rows) == 1
    assert any("DIFFER by -3 (2 customers)" in line for line in lines)
    assert lines[-1] == "VERDICT: 1 meter(s) differ between the database and Stripe"


def test_differences_that_cancel_out_across_customers_still_fail() -> None:
    lines: list[str] = []
    rows = [MeterRow("tokens", "sum", 100, 100, customers_differing=2)]
    facts = {**FACTS, "windows_wrong": 0}
    assert print_table(lines.append, Traffic(sent=10, unique=10), facts, rows) == 1


def test_a_window_unlike_the_events_sent_fails_even_when_stripe_agrees() -> None:
    lines: list[str] = []
    rows = [MeterRow("tokens", "sum", 100, 100, 0)]
    facts = {**FACTS, "windows_wrong": 1}
    assert print_table(lines.append, Traffic(sent=10, unique=10), facts, rows) == 1
    assert lines[-1] == "VERDICT: 1 window(s) differ from the events sent"


def test_preparing_stripe_reads_every_page_of_meters_and_creates_none_twice() -> None:
    # The catalogue's meters first, so newest first they are on the 3rd page of 100: a
    # demo that read one page would create them again, which Stripe refuses.
    catalogue = load_catalogue(EXAMPLE_METERS)
    with run_stripe_emulator(rate_limit_per_s=None) as emulator:
        for meter in catalogue:
            emulator.state.create_meter(
                display_name=meter.name,
                event_name=meter.stripe_event_name,
                formula=meter.stripe_formula,
            )
        for n in range(205):
            emulator.state.create_meter(display_name=f"other {n}", event_name=f"other_{n}")
        client = stripe.StripeClient(
            "sk_test_demo", base_addresses={"api": emulator.url}, max_network_retries=0
        )

        prepare_stripe(client, catalogue, create_engine("sqlite://"), 0)

        assert len(emulator.state.meters()) == len(catalogue) + 205
        names = {m.stripe_event_name for m in catalogue}
        assert names <= set(stripe_meters_by_event_name(client))


def test_the_demo_bills_tokens_per_model_and_prints_both_sides_per_model(tmp_path: Path) -> None:
    # The demo's own catalogue has the tokens meter by model: the default run shows it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    done = subprocess.run(
        [*(sys.executable, "-m", "meterstream", "demo"), *("--customers", "6", "--events", "600")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "VERDICT: the database and Stripe agree on every meter" in done.stdout
    by_model = re.findall(r"^  model=(\S+)\s+sum\s+([\d,]+)\s+([\d,]+)  match$", done.stdout, re.M)
    assert {model for model, _db, _stripe in by_model} == set(MODELS), done.stdout
    assert all(database == stripe for _model, database, stripe in by_model)
    assert sum(int(d.replace(",", "")) for _m, d, _s in by_model) > 0
