"""``meterstream dead-letters``: list what the aggregators refused, and replay it once fixed."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import click
import orjson

from meterstream.cli.exits import settings_or_exit
from meterstream.settings import Settings

if TYPE_CHECKING:
    from aggregators.dead_letters import DeadLetter

_RELATIVE = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(value: str | None, now: datetime) -> datetime | None:
    """``2026-12-01T10:00:00Z`` (UTC when no offset is given) or a span back from ``now``:
    ``90m``, ``6h``, ``2d``."""
    if value is None:
        return None
    relative = _RELATIVE.fullmatch(value.strip())
    if relative:
        return now - timedelta(**{_UNITS[relative.group(2)]: int(relative.group(1))})
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: expected an ISO 8601 time (2026-12-01T10:00:00Z) or a span such as "
            "90m, 6h or 2d",
            param_hint="--since",
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _selected(settings: Settings, reason: str | None, since: str | None) -> list[DeadLetter]:
    # The aggregators' extra is needed only when the command runs (the base install is the SDK).
    from aggregators.dead_letters import dead_letters
    from meterstream.db import build_engine

    engine = build_engine(settings)
    try:
        return dead_letters(
            engine, settings.topic, reason=reason, since=parse_since(since, datetime.now(UTC))
        )
    finally:
        engine.dispose()


_reason = click.option("--reason", default=None, help="only this reason, e.g. unknown_meter")
_since = click.option("--since", default=None, help="refused at or after: ISO time or 90m/6h/2d")


@click.group("dead-letters")
def dead_letters_group() -> None:
    """Events the aggregators refused (unknown meter, clock, unparseable...), kept whole."""


@dead_letters_group.command("list")
@_reason
@_since
@click.option("--json", "as_json", is_flag=True, help="one JSON array of objects")
def list_command(reason: str | None, since: str | None, as_json: bool) -> None:
    """Print the dead letters, oldest first."""
    letters = _selected(settings_or_exit(), reason, since)
    records = [
        {
            "partition": letter.partition,
            "offset": letter.offset,
            "reason": letter.reason,
            "detail": letter.detail,
            "event_id": letter.event_id,
            "customer": letter.customer_id,
            "meter": letter.meter,
            "rejected_at": letter.rejected_at.isoformat().replace("+00:00", "Z"),
        }
        for letter in letters
    ]
    if as_json:
        click.echo(orjson.dumps(records).decode())
        return
    for record in records:
        click.echo(
            f"{record['rejected_at']}  {record['reason']:<15} p{record['partition']}"
            f"@{record['offset']}  {record['event_id'] or '-'}  {record['detail']}"
        )
    click.echo(f"{len(records)} dead letter(s)")


@dead_letters_group.command("replay")
@_reason
@_since
def replay_command(reason: str | None, since: str | None) -> None:
    """Send the dead letters back to the usage topic, once their cause is fixed (a meter
    added to the catalogue and the workers restarted, a producer's clock corrected).

    Safe to run twice: an event already counted is skipped by its deduplication key; one still
    at fault is dead-lettered again.
    """
    settings = settings_or_exit()
    from aggregators.dead_letters import replay, worth_replaying

    # Reasons that can never pass (too old, too large, past Stripe's digits) only when named.
    letters = worth_replaying(_selected(settings, reason, since), reason)
    sent = replay(settings, letters)
    click.echo(f"replayed {sent} dead letter(s) to {settings.topic}")


DEAD_LETTER_COMMANDS: list[click.Command] = [dead_letters_group]
