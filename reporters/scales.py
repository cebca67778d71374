"""A meter's unit_scale may not change under its ledger: checked at reporter start.

The running totals of a (customer, meter) are exact usage and whole units issued; the next
value is ``floor(accounted * unit_scale) - units_issued``. With a new scale that formula
re-prices the whole history in the next event (1 -> 1000 sends 4,997,000 units for 5,000
GB-h already billed as 5,000; 1000 -> 1 sends a credit for all of it). Stripe meters are
immutable, so the safe ways are to keep the scale, or to bill the new scale on a new meter.
The reporter therefore refuses to start (ConfigError, exit 2) and says so.

Each ledger row records the scale it was computed with (migration 0006), and ``meter_scales``
the scale of each meter, so the check at start reads one row per meter, never the ledger's
history. A meter first seen (rows from before 0006 included) is taken to be at its current
scale, once.
"""

from __future__ import annotations

import logging
from datetime import datetime
from decimal import Decimal

from sqlalchemy import Connection, Engine, delete, insert, select

from meterstream.errors import ConfigError
from meterstream.meters import Catalogue, Meter
from meterstream.schema import ledger, meter_scales
from reporters.carry import whole_units

_log = logging.getLogger(__name__)


def check_unit_scales(engine: Engine, catalogue: Catalogue, now: datetime) -> None:
    """Raise ConfigError if a catalogue meter's unit_scale differs from the one its ledger
    was computed with (``meter_scales``, one row per meter: read whole, however long the
    ledger). A meter not recorded yet has no ledger row and is recorded at its scale; a meter
    the upgrade found in the ledger is checked against its rows' running totals first; a
    changed scale of a meter that has no ledger row yet is simply recorded anew."""
    with engine.begin() as connection:
        # None: a meter the ledger held before scales were recorded (migration 0006).
        recorded: dict[str, Decimal | None] = {
            row.meter: None if row.unit_scale is None else Decimal(row.unit_scale)
            for row in connection.execute(select(meter_scales.c.meter, meter_scales.c.unit_scale))
        }
        changed: list[tuple[str, Decimal | None, Decimal]] = []
        for name, meter in sorted(catalogue.meters.items()):
            if name in recorded:
                old = recorded[name]
                if old == meter.unit_scale:
                    continue
                # Rare (the first start after the upgrade, or a scale edited): one look at
                # this meter's rows, which exist for a meter recorded before.
                if old is not None and _billed(connection, name):
                    changed.append((name, old, meter.unit_scale))
                    continue
                if old is None and not _agrees(connection, name, meter.unit_scale, meter):
                    # Upgraded with the scale edited at the same time: the rows' running
                    # totals say which scale issued their units.
                    changed.append((name, None, meter.unit_scale))
                    continue
            connection.execute(delete(meter_scales).where(meter_scales.c.meter == name))
            connection.execute(
                insert(meter_scales).values(
                    meter=name, unit_scale=meter.unit_scale, recorded_at=now
                )
            )
            _log.info("meter %s: unit_scale %s recorded", name, meter.unit_scale)
    if changed:
        raise ConfigError(
            "; ".join(
                f"meter {name!r}: unit_scale is {new} in METERSTREAM_METERS_FILE but its "
                f"ledger rows were computed at {old if old is not None else 'another scale'}"
                for name, old, new in changed
            )
            + ". Sending on would re-price all the usage already billed (the next event "
            "would carry the whole history's difference). Put the unit_scale back; or bill "
            "the new scale on a new meter: a new meter name with a new stripe_event_name (a "
            "new Stripe meter), keeping the old one in the catalogue until its pending rows "
            "are sent"
        )


def _billed(connection: Connection, meter: str) -> bool:
    """Whether the ledger has a row of ``meter``: looked up only when its scale changed."""
    found = connection.execute(select(ledger.c.meter).where(ledger.c.meter == meter).limit(1))
    return found.first() is not None


# Rows looked at when a meter's scale is first recorded over an older ledger: enough to tell a
# changed scale (a row whose units disagree), read once, at the first start after the upgrade.
_SCALE_SAMPLE_ROWS = 100


def _agrees(connection: Connection, name: str, unit_scale: Decimal, meter: Meter) -> bool:
    """Whether the ledger rows of ``name`` (a ``sum`` meter) issued their units at
    ``unit_scale``: after every row, units issued == floor(accounted total x scale)."""
    if meter.stripe_formula != "sum":
        return True  # a ``last`` meter carries nothing: each event is the current value
    rows = connection.execute(
        select(ledger.c.accounted_total, ledger.c.units_total)
        .where(ledger.c.meter == name, ledger.c.accounted_total != 0)
        .limit(_SCALE_SAMPLE_ROWS)
    ).all()
    return all(whole_units(Decimal(a), unit_scale) == int(u) for a, u in rows)
