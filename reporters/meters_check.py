"""The start-up check: every catalogue meter needs an active Stripe meter it can report to.

Matched by ``event_name == stripe_event_name``. The formulas must fit what we send:

- sum, count, unique_count are sent as differences, to be summed: Stripe formula ``sum``.
  Stripe's ``count`` counts events and ignores their values, so every difference (and every
  correction or carried unit) would count as 1: incompatible.
- max, min, last are sent as the current value: Stripe formula ``last``. Stripe bills the
  newest value of the billing period, so a max/min meter must use ``window = "1mo"``: with
  shorter windows Stripe would bill the newest window's max, not the month's.

And the meter must count every event (``event_time_window`` null: a ``hour``/``day`` meter
keeps only the newest event per window, so our differences would overwrite each other), map
customers ``by_id`` (the only mapping the reporter writes), and name as its
``dimension_payload_keys`` the catalogue meter's dimensions (Stripe refuses an event that lacks
one: ``missing_dimension_payload_keys``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meterstream.errors import MeterCheckError
from meterstream.meters import Catalogue
from reporters.pages import ListPage, all_items


@dataclass(frozen=True, slots=True)
class StripeMeter:
    """The parts of a Stripe meter the reporter uses."""

    id: str
    event_name: str
    formula: str
    status: str
    customer_key: str = "stripe_customer_id"
    value_key: str = "value"
    event_time_window: str | None = None
    customer_mapping_type: str = "by_id"
    dimension_payload_keys: tuple[str, ...] = ()


def parse_meter(obj: Any) -> StripeMeter:
    """A StripeMeter from a ``billing.meter`` object (SDK object or dict)."""
    raw: dict[str, Any] = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    mapping = raw.get("customer_mapping") or {}
    settings = raw.get("value_settings") or {}
    return StripeMeter(
        id=str(raw["id"]),
        event_name=str(raw["event_name"]),
        formula=str((raw.get("default_aggregation") or {}).get("formula")),
        status=str(raw.get("status")),
        customer_key=str(mapping.get("event_payload_key") or "stripe_customer_id"),
        value_key=str(settings.get("event_payload_key") or "value"),
        event_time_window=raw.get("event_time_window") or None,
        customer_mapping_type=str(mapping.get("type") or "by_id"),
        dimension_payload_keys=tuple(str(k) for k in raw.get("dimension_payload_keys") or ()),
    )


def check_meters(catalogue: Catalogue, stripe_meters: list[StripeMeter]) -> dict[str, StripeMeter]:
    """The Stripe meter for every catalogue meter, by catalogue name.

    Raises MeterCheckError listing each catalogue meter whose Stripe meter is missing,
    inactive or has an incompatible formula, and what to do about it.
    """
    by_event = {m.event_name: m for m in stripe_meters}
    found: dict[str, StripeMeter] = {}
    problems: list[str] = []
    for meter in catalogue:
        stripe_meter = by_event.get(meter.stripe_event_name)
        wanted = meter.stripe_formula
        if meter.aggregation in ("max", "min") and meter.window != "1mo":
            problems.append(
                f"meter {meter.name!r}: window {meter.window!r}: max/min meters are reported "
                'to a Stripe `last` meter; use window = "1mo" so the value Stripe bills is '
                "the month's max"
            )
            continue
        if stripe_meter is None:
            problems.append(
                f"meter {meter.name!r}: no Stripe meter has event_name "
                f"{meter.stripe_event_name!r}; create one with formula {wanted!r}"
            )
        elif stripe_meter.status != "active":
            problems.append(
                f"meter {meter.name!r}: Stripe meter {stripe_meter.id} "
                f"({meter.stripe_event_name!r}) is {stripe_meter.status}; reactivate it"
            )
        elif stripe_meter.formula != wanted:
            problems.append(
                f"meter {meter.name!r}: Stripe meter {stripe_meter.id} "
                f"({meter.stripe_event_name!r}) has formula {stripe_meter.formula!r}, "
                f"needs {wanted!r}; {_why(meter.aggregation, stripe_meter.formula)}"
            )
        elif stripe_meter.event_time_window is not None:
            problems.append(
                f"meter {meter.name!r}: Stripe meter {stripe_meter.id} "
                f"({meter.stripe_event_name!r}) has event_time_window "
                f"{stripe_meter.event_time_window!r}: it keeps only the newest event per "
                "window, so the reporter's differences would overwrite each other; create a "
                "meter without event_time_window"
            )
        elif stripe_meter.customer_mapping_type != "by_id":
            problems.append(
                f"meter {meter.name!r}: Stripe meter {stripe_meter.id} "
                f"({meter.stripe_event_name!r}) maps customers by "
                f"{stripe_meter.customer_mapping_type!r}; the reporter sends Stripe customer "
                "ids: create a meter with customer_mapping type by_id"
            )
        elif set(stripe_meter.dimension_payload_keys) != set(meter.dimensions):
            problems.append(
                f"meter {meter.name!r}: Stripe meter {stripe_meter.id} "
                f"({meter.stripe_event_name!r}) has dimension_payload_keys "
                f"{list(stripe_meter.dimension_payload_keys)!r}, the catalogue's dimensions are "
                f"{list(meter.dimensions)!r}: Stripe would refuse events lacking a key "
                "(missing_dimension_payload_keys) or not group by ours; create a meter whose "
                "dimension_payload_keys are the catalogue's dimensions"
            )
        elif clash := {stripe_meter.customer_key, stripe_meter.value_key} & set(meter.dimensions):
            problems.append(
                f"meter {meter.name!r}: Stripe meter {stripe_meter.id} "
                f"({meter.stripe_event_name!r}) reads its customer and value from payload keys "
                f"{stripe_meter.customer_key!r} and {stripe_meter.value_key!r}, and "
                f"{sorted(clash)!r} is a dimension too: one payload key cannot hold both; "
                "rename the dimension in the catalogue or create a meter with other keys"
            )
        else:
            found[meter.name] = stripe_meter
    if problems:
        raise MeterCheckError(
            "the Stripe meters do not fit the catalogue (METERSTREAM_METERS_FILE): "
            + "; ".join(problems)
            + ". Stripe meters cannot change formula, window or mapping: create a new meter "
            "with the right ones and point stripe_event_name at its event_name"
        )
    return found


def _why(aggregation: str, formula: str) -> str:
    if formula == "count":
        return (
            "Stripe's count formula counts events and ignores their values, but the reporter "
            f"sends each {aggregation} window's difference as one event's value"
        )
    if formula == "sum":
        return f"a {aggregation} meter reports its current value, which Stripe must not add up"
    return f"a {aggregation} meter reports differences, which Stripe must add up"


def list_stripe_meters(call: ListPage) -> list[StripeMeter]:
    """Every Stripe meter, following Stripe's cursor pagination; ``call(params)`` is one
    GET /v1/billing/meters (through the gateway, so it is paced like every call)."""
    return [parse_meter(item) for item in all_items(call, {"limit": 100})]
