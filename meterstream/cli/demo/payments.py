"""The demo's last act, on the local emulator only: Stripe fails an invoice of one demo
customer, signs and sends ``invoice.payment_failed`` to ``meterstream serve``, which stores it,
acts on it, and ``meterstream payments`` lists it under the application's customer id."""

from __future__ import annotations

import json
import secrets
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import click
from pydantic import SecretStr

from meterstream.cli.demo.options import Echo
from meterstream.embedded import free_port
from meterstream.processes import start_meterstream, stop_process
from meterstream.settings import Settings

_PATH = "/v1/stripe/webhooks"


def _control(api_base: str, path: str, body: object) -> object:
    request = urllib.request.Request(  # noqa: S310 - the local emulator the demo started
        f"{api_base}/_emulator/{path}", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        return json.loads(answer.read())


def _wait(condition_met: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition_met():
        if time.monotonic() > deadline:
            raise click.ClickException(f"the demo waited {timeout_s:g} s for {what}")
        time.sleep(0.1)


def show_a_payment_failure(
    settings: Settings, customers: dict[str, str], workdir: Path, echo: Echo
) -> None:
    """Run ``meterstream serve`` with a webhook secret, have the emulator fail an invoice of
    the first demo customer, and print what ``meterstream payments`` lists."""
    secret = f"whsec_demo{secrets.token_hex(12)}"
    port = free_port()
    served = settings.model_copy(
        update={"http_port": port, "stripe_webhook_secret": SecretStr(secret)}
    )
    url = f"http://127.0.0.1:{port}"
    with (workdir / "serve.log").open("ab") as log:
        server = start_meterstream(served, "serve", output=log, cwd=workdir)
    try:
        _wait(lambda: _answers(url + "/healthz"), "meterstream serve to start")
        _control(settings.stripe_api_base, "webhooks", {"url": url + _PATH, "secrets": [secret]})
        app_id, stripe_id = next(iter(customers.items()))
        _control(
            settings.stripe_api_base,
            "invoices",
            {
                "customer": stripe_id,
                "outcome": "payment_failed",
                "amount_due": 4_990,
                "currency": "usd",
                "failure_code": "card_declined",
            },
        )
        echo(f"Stripe webhook       invoice.payment_failed for {app_id} sent to {url}{_PATH}")
        listed: list[str] = []

        def listed_now() -> bool:
            with (workdir / "payments.log").open("wb") as out:
                start_meterstream(served, "payments", output=out).wait()
            listed[:] = (workdir / "payments.log").read_text().splitlines()
            return any(app_id in line for line in listed)

        _wait(listed_now, "the payment failure to be listed")
        echo("meterstream payments")
        for line in listed:
            echo(f"  {line}")
    finally:
        stop_process(server)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback
            return True
    except OSError:
        return False
