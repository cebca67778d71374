"""The ``meterstream`` command line. Settings are read here, once, and passed down."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

import click

from meterstream.errors import MeterstreamError
from meterstream.settings import Settings, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except MeterstreamError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """meterstream: usage events from your application to Stripe meter events, exactly once.

    Every command reads its settings from METERSTREAM_* environment variables.
    """


@cli.command()
@click.option("--port", type=int, default=9092, show_default=True, help="port on 127.0.0.1")
@click.option("--partitions", type=int, default=None, help="partitions of the usage topic")
def broker(port: int, partitions: int | None) -> None:
    """Run the embedded Kafka-protocol broker (memory only) until Ctrl-C."""
    from meterstream.embedded import embedded_broker

    settings = _settings()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    topics = {settings.topic: partitions or settings.topic_partitions}
    with embedded_broker(port=port, topics=topics, log_dir=Path.cwd()) as running:
        click.echo(
            f"embedded broker on {running.bootstrap} (pid {running.pid}), topic "
            f"{settings.topic!r}; export METERSTREAM_KAFKA_BOOTSTRAP={running.bootstrap}"
        )
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    click.echo("broker stopped; everything it held is gone (memory only)")


def main() -> None:
    try:
        cli(standalone_mode=True)
    except MeterstreamError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
