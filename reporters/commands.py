"""The reporter's commands for the ``meterstream`` command line."""

from __future__ import annotations

import click

REPORTER_COMMANDS: list[click.Command] = []
