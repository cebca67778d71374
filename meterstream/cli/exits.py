"""The command line's exit codes, one meaning each, the same in every command.

- 0 done
- 1 work is pending or drifting: run again later (cron retries it)
- 2 configuration or start-up error: retrying will not help until the setting is fixed
- 3 a person must act (usage held, unknown, rejected; a ledger mismatch)

Click's own usage errors (a wrong option) exit 2 as well: also something to fix, not retry.
"""

from __future__ import annotations

import click

from meterstream.errors import LedgerError, MeterstreamError
from meterstream.settings import Settings, load_settings

EXIT_OK = 0
EXIT_PENDING = 1
EXIT_CONFIG = 2
EXIT_NEEDS_A_PERSON = 3

EXIT_CODES_HELP = """\b
Exit codes (every command):
  0  done
  1  work still pending or drifting (Stripe down, 429): run again later
  2  configuration or start-up error (bad key, settings, catalogue, meters,
     database): fix it first, retrying will not help
  3  a person must act (usage held, unknown or rejected: see meterstream status)
"""


class ConfigExit(click.ClickException):
    """A configuration or start-up error: exit 2, never the "run again later" 1."""

    exit_code = EXIT_CONFIG


class NeedsAPersonExit(click.ClickException):
    """The ledger disagrees with itself or with Stripe: exit 3."""

    exit_code = EXIT_NEEDS_A_PERSON


def failed(exc: MeterstreamError) -> click.ClickException:
    """The ClickException (message and exit code) for an error that ends a command."""
    if isinstance(exc, LedgerError):
        return NeedsAPersonExit(str(exc))
    return ConfigExit(str(exc))


def settings_or_exit() -> Settings:
    """The settings from METERSTREAM_*, read once per command; a bad value exits 2 naming it."""
    try:
        return load_settings()
    except MeterstreamError as exc:
        raise failed(exc) from exc
