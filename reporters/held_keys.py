"""The (customer, meter) pairs the last cycle held, kept for ``meterstream status``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, delete, insert, select

from meterstream.schema import held_keys

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class HeldKey:
    customer_id: str
    meter: str
    reason: str
    detail: str
    held_at: datetime


def save_held_keys(engine: Engine, held: Mapping[Key, tuple[str, str]], now: datetime) -> None:
    """Replace the table with ``held`` (a cycle looks at every key with work, so what it did
    not hold is no longer held)."""
    with engine.begin() as connection:
        connection.execute(delete(held_keys))
        if held:
            connection.execute(
                insert(held_keys),
                [
                    {
                        "customer_id": customer_id,
                        "meter": meter,
                        "reason": reason,
                        "detail": detail,
                        "held_at": now,
                    }
                    for (customer_id, meter), (reason, detail) in sorted(held.items())
                ],
            )


def load_held_keys(engine: Engine) -> list[HeldKey]:
    with engine.connect() as connection:
        found = connection.execute(
            select(held_keys).order_by(held_keys.c.reason, held_keys.c.customer_id)
        ).all()
    return [HeldKey(r.customer_id, r.meter, r.reason, r.detail, r.held_at) for r in found]
