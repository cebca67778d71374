"""The aggregators' commands for the ``meterstream`` command line."""

from __future__ import annotations

import click

AGGREGATOR_COMMANDS: list[click.Command] = []
