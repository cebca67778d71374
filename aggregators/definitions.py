"""The catalogue a worker starts with must still describe the totals the database holds.

A meter's stored totals were made with one aggregation, one window size and one unique property.
Read with another (``sum`` totals taken as ``max``, hourly windows next to daily ones, distinct
``user_id`` values counted as distinct ``team_id`` values), they are silently wrong; a meter
dropped from the catalogue leaves windows the reporter cannot price, and its new events become
dead letters. So each meter's definition is recorded in ``meter_definitions`` the first time a
worker starts with it, and a worker refuses to start when a meter that has stored totals was
removed (or renamed: the old name is gone) or its aggregation, window, unique property,
dimensions or value property changed (totals per model read as totals per region are wrong).
The message says how to make the change instead: a new meter under a new name.

Adding a meter is always accepted. A meter without stored totals may change or go freely.
Other keys (description, grace_s, allow_negative, unit_scale, stripe_event_name) do not shape
what is stored, so they are not checked here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import Connection, Engine, delete, exists, select

from aggregators.sql import insert_ignoring_conflicts
from meterstream.errors import CatalogueChangedError
from meterstream.meters import Catalogue, Meter
from meterstream.schema import meter_definitions, window_totals

__all__ = ["Definition", "check_definitions"]


@dataclass(frozen=True, slots=True)
class Definition:
    """What of a meter shapes its stored totals."""

    aggregation: str
    window: str
    unique_property: str | None
    # The dimension names joined by commas (names have none), '' for none.
    dimensions: str = ""
    value_property: str | None = None

    @classmethod
    def of(cls, meter: Meter) -> Definition:
        return cls(
            meter.aggregation,
            meter.window,
            meter.unique_property,
            ",".join(meter.dimensions),
            meter.value_property,
        )

    def keeps_totals_of(self, before: Definition) -> bool:
        """True if totals made with ``before`` read the same under this definition. The order of
        the dimensions is not part of it: a combination's key sorts them
        (meterstream.dimensions) and Stripe's dimension_payload_keys are compared as a set."""
        return replace(self, dimensions=_sorted(self.dimensions)) == replace(
            before, dimensions=_sorted(before.dimensions)
        )


def _sorted(dimensions: str) -> str:
    return ",".join(sorted(dimensions.split(",")))


def check_definitions(engine: Engine, catalogue: Catalogue, now: datetime, where: str) -> None:
    """Record the catalogue's definitions, or raise CatalogueChangedError (recording nothing)
    when a meter with stored totals was removed or redefined. ``where`` names the catalogue
    file in the message."""
    with engine.begin() as connection:
        recorded = _recorded(connection)
        if not recorded:
            # First start on this database (or one from before definitions were recorded):
            # the meters that have totals are taken as defined by today's catalogue, except
            # those no longer in it.
            recorded = {name: None for name in _meters_with_totals(connection)}
        problems: list[str] = []
        for name, before in sorted(recorded.items()):
            meter = catalogue.get(name)
            after = None if meter is None else Definition.of(meter)
            if after is not None and (before is None or after.keeps_totals_of(before)):
                continue
            # A meter without totals may change or go: nothing stored was made with it.
            if _has_totals(connection, name):
                problems.append(_problem(name, before, after))
        if problems:
            raise CatalogueChangedError(
                f"METERSTREAM_METERS_FILE={where}: the catalogue no longer describes totals "
                "stored in the database, so the worker does not start (nothing was changed):\n  "
                + "\n  ".join(problems)
            )
        _record(connection, catalogue, recorded, now)


def _problem(name: str, before: Definition | None, after: Definition | None) -> str:
    if after is None:
        return (
            f"meter {name!r} has stored totals but is not in the catalogue (removed, or "
            "renamed). Put it back unchanged: its windows are still reported under it. To "
            "rename a meter, keep the old one and add the new name beside it; move the "
            "producers to the new name."
        )
    assert before is not None  # noqa: S101 - an unrecorded meter in the catalogue is accepted
    changed = [
        f"{field} {getattr(before, field)!r} -> {getattr(after, field)!r}"
        for field in ("aggregation", "window", "unique_property", "dimensions", "value_property")
        if getattr(before, field) != getattr(after, field)
    ]
    return (
        f"meter {name!r}: {', '.join(changed)}, while totals made with the old definition are "
        "stored. Restore its old definition, and add the new one as a new meter (a new name "
        "and its own stripe_event_name); move the producers to it. Both are reported."
    )


def _recorded(connection: Connection) -> dict[str, Definition | None]:
    c = meter_definitions.c
    rows = connection.execute(
        select(c.meter, c.aggregation, c.window, c.unique_property, c.dimensions, c.value_property)
    )
    return {
        str(row.meter): Definition(
            row.aggregation, row.window, row.unique_property, row.dimensions, row.value_property
        )
        for row in rows
    }


def _meters_with_totals(connection: Connection) -> list[str]:
    query = select(window_totals.c.meter).distinct()
    return [str(name) for name in connection.execute(query).scalars()]


def _has_totals(connection: Connection, name: str) -> bool:
    query = select(exists().where(window_totals.c.meter == name))
    return bool(connection.execute(query).scalar_one())


def _record(
    connection: Connection,
    catalogue: Catalogue,
    recorded: dict[str, Definition | None],
    now: datetime,
) -> None:
    c = meter_definitions.c
    gone = [name for name in recorded if name not in catalogue]
    changed = [
        name
        for name, before in recorded.items()
        if name in catalogue
        and before is not None
        and not Definition.of(catalogue.meters[name]).keeps_totals_of(before)
    ]
    if gone or changed:
        connection.execute(delete(meter_definitions).where(c.meter.in_(gone + changed)))
    rows = [
        {
            "meter": meter.name,
            "aggregation": meter.aggregation,
            "window": meter.window,
            "unique_property": meter.unique_property,
            "dimensions": ",".join(meter.dimensions),
            "value_property": meter.value_property,
            "recorded_at": now,
        }
        for meter in catalogue.meters.values()
    ]
    # Two workers starting at once record the same rows: the second's are no-ops.
    connection.execute(insert_ignoring_conflicts(connection, meter_definitions), rows)
