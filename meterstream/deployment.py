"""The deployment id: one random name per database, part of every new meter event identifier.

Stripe deduplicates meter events by ``identifier`` across a whole account. Two deployments
reporting to one account, or one database restored from a backup (it re-issues revisions
whose identifiers Stripe already holds with other values), would otherwise collide: Stripe
answers "already exists" and a different amount is taken as sent. ``meterstream migrate``
draws the id once (migration 0007) and keeps it in the one-row ``deployment`` table;
``METERSTREAM_DEPLOYMENT_ID`` overrides it (a restored copy that must not share the original's
identifiers, or a name chosen by the operator).
"""

from __future__ import annotations

import re
import secrets

from sqlalchemy import Engine, select

from meterstream.errors import ConfigError
from meterstream.schema import deployment
from meterstream.settings import Settings

# ms2_ + id + _ + 48 hex digits stays well under Stripe's 100 characters (85 at most).
MAX_DEPLOYMENT_ID_CHARS = 32
DEPLOYMENT_ID_PATTERN = re.compile(rf"[A-Za-z0-9-]{{1,{MAX_DEPLOYMENT_ID_CHARS}}}")


def new_deployment_id() -> str:
    """A fresh random id: 64 bits, 16 hex digits (collisions need ~4 billion deployments)."""
    return secrets.token_hex(8)


def stored_deployment_id(engine: Engine) -> str:
    """The id ``meterstream migrate`` stored in this database.

    Raises ConfigError if the database was never migrated to 0007.
    """
    with engine.connect() as connection:
        found = connection.execute(select(deployment.c.deployment_id)).scalar()
    if found is None:
        raise ConfigError(
            "this database has no deployment id (table deployment is empty or missing); "
            "run meterstream migrate"
        )
    return str(found)


def deployment_id_of(settings: Settings, engine: Engine) -> str:
    """METERSTREAM_DEPLOYMENT_ID when set, else the database's own id."""
    return settings.deployment_id or stored_deployment_id(engine)
