"""A meter's unit_scale may not change under its ledger: checked at reporter start.

The running totals of a (customer, meter) are exact usage and whole units issued; the next
value is ``floor(accounted * unit_scale) - units_issued``. With a new scale that formula
re-prices the whole history in the next event (1 -> 1000 sends 4,997,000 units for 5,000
GB-h already billed as 5,000; 1000 -> 1 sends a credit for all of it). Stripe meters are
immutable, so the safe ways are to keep the scale, or to bill the new scale on a new meter.
The reporter therefore refuses to start (ConfigError, exit 2) and says so.

Each ledger row records the scale it was computed with (migration 0006); rows from before
that have none and are taken to be at the catalogue's current scale, once.
"""

from __future__ import annotations

import logging
from decimal import Decimal

from sqlalchemy import Engine, select, update

from meterstream.errors import ConfigError
from meterstream.meters import Catalogue
from meterstream.schema import ledger

_log = logging.getLogger(__name__)


def check_unit_scales(engine: Engine, catalogue: Catalogue) -> None:
    """Raise ConfigError if a catalogue meter's unit_scale differs from the one its ledger
    rows were computed with; first record the current scale on rows that have none."""
    with engine.begin() as connection:
        for name, meter in catalogue.meters.items():
            adopted = connection.execute(
                update(ledger)
                .where(ledger.c.meter == name, ledger.c.unit_scale.is_(None))
                .values(unit_scale=meter.unit_scale)
            ).rowcount
            if adopted:
                _log.info(
                    "meter %s: %d ledger row(s) from before unit_scale was recorded taken to "
                    "be at unit_scale %s",
                    name,
                    adopted,
                    meter.unit_scale,
                )
        found = connection.execute(select(ledger.c.meter, ledger.c.unit_scale).distinct()).all()
    recorded: dict[str, set[Decimal]] = {}
    for name, scale in found:
        if scale is not None:
            recorded.setdefault(name, set()).add(Decimal(scale))
    changed = [
        (name, sorted(recorded[name]), meter.unit_scale)
        for name, meter in sorted(catalogue.meters.items())
        if recorded.get(name, {meter.unit_scale}) != {meter.unit_scale}
    ]
    if changed:
        raise ConfigError(
            "; ".join(
                f"meter {name!r}: unit_scale is {new} in METERSTREAM_METERS_FILE but its "
                f"ledger rows were computed at {', '.join(str(s) for s in old)}"
                for name, old, new in changed
            )
            + ". Sending on would re-price all the usage already billed (the next event "
            "would carry the whole history's difference). Put the unit_scale back; or bill "
            "the new scale on a new meter: a new meter name with a new stripe_event_name (a "
            "new Stripe meter), keeping the old one in the catalogue until its pending rows "
            "are sent"
        )
