"""The usage read API, beside the table it reads: ``GET /v1/usage`` and ``GET /v1/meters``.

The face (``meterstream serve``) mounts :func:`usage_router` and puts its key check (scope
``read``) in front of it; this module knows no server, no key, no other stage. The answers are
aggregators/usage_query.py's, with exact values as decimal strings: ``windows`` over all of a
meter's combinations of dimension values, or, with ``group_by``, ``groups`` of them.
"""

# No `from __future__ import annotations`: FastAPI reads the annotations at run time.

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field
from sqlalchemy import Engine

from aggregators.usage_query import RequestedWindow, Usage, WindowUsage, query_usage
from meterstream.errors import InvalidQueryError
from meterstream.events import format_value
from meterstream.http.answers import ErrorBody
from meterstream.meters import Catalogue, Meter

_DECIMAL = r"^-?[0-9]+(\.[0-9]+)?$"
# A meter has at most a handful of dimensions (Stripe allows few), each a short name.
_MAX_GROUP_BY_CHARS = 1000


class WindowAnswer(BaseModel):
    """One window ``[start, end)`` in UTC: its exact value, events counted, and revision."""

    start: datetime
    end: datetime
    value: str = Field(pattern=_DECIMAL, description="exact, as a decimal string")
    events: int = Field(ge=0)
    revision: int = Field(
        ge=0,
        description="rises whenever the window changes (a rolled-up window: the sum of its "
        "stored windows' revisions)",
    )


class GroupAnswer(BaseModel):
    """One group of ``group_by``: its dimension values and its windows."""

    dimensions: dict[str, str] = Field(
        description="the group's value of each dimension grouped by ('' for totals stored "
        "before the meter had that dimension)"
    )
    windows: list[WindowAnswer] = Field(
        description="in time order; windows without events left out"
    )


class UsageAnswer(BaseModel):
    customer: str
    meter: str
    aggregation: str
    window: str = Field(description="the window of each answer: 1m, 1h, 1d, 1mo or total")
    start: datetime = Field(serialization_alias="from")
    end: datetime = Field(serialization_alias="to")
    windows: list[WindowAnswer] | None = Field(
        None,
        description="without group_by: in time order, each the total over all combinations "
        "of the meter's dimensions; windows without events left out",
    )
    group_by: list[str] | None = Field(None, description="with group_by: the dimensions")
    groups: list[GroupAnswer] | None = Field(
        None,
        description="with group_by: one series per group of dimension values that has usage "
        "in the range, ordered by those values",
    )


class MeterAnswer(BaseModel):
    name: str
    aggregation: str
    window: str
    stripe_event_name: str
    unit_scale: str = Field(pattern=_DECIMAL)
    allow_negative: bool
    grace_s: int
    unique_property: str | None
    description: str


class MetersAnswer(BaseModel):
    meters: list[MeterAnswer]


@dataclass(frozen=True, slots=True)
class UsageRoutes:
    """What the usage routes need: the database, the checked catalogue, how long window
    totals are kept, and the key check the face puts in front (scope ``read``)."""

    engine: Engine
    catalogue: Catalogue
    retention_days: int
    require_read: Callable[..., Awaitable[Any]]
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)


_REFUSALS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no live API key"},
    403: {"model": ErrorBody, "description": "the key's scope does not include read"},
}


def usage_router(routes: UsageRoutes) -> APIRouter:
    """``GET /v1/usage`` and ``GET /v1/meters``, behind ``routes.require_read``."""
    router = APIRouter(tags=["usage"], dependencies=[Depends(routes.require_read)])

    @router.get(
        "/v1/usage",
        response_model=UsageAnswer,
        response_model_by_alias=True,
        response_model_exclude_none=True,
        summary="Exact usage of one customer and meter, per window or in total, optionally "
        "grouped by dimensions",
        responses={
            400: {"model": ErrorBody, "description": "no exact answer: the error says why"},
            **_REFUSALS,
        },
    )
    def usage(
        customer: Annotated[str, Query(min_length=1, max_length=200)],
        meter: Annotated[str, Query(min_length=1, max_length=100)],
        start: Annotated[datetime, Query(alias="from", description="RFC 3339, on a boundary")],
        end: Annotated[datetime, Query(alias="to", description="RFC 3339, exclusive")],
        window: Annotated[
            Literal["1m", "1h", "1d", "1mo", "total"] | None,
            Query(description="the meter's own window (the default), 1h, 1d or total"),
        ] = None,
        group_by: Annotated[
            str | None,
            Query(
                max_length=_MAX_GROUP_BY_CHARS,
                description="comma-separated dimensions of the meter (e.g. model,region): one "
                "series per group of their values, in `groups`; without it, `windows` holds "
                "the total over all combinations (a unique_count meter with dimensions must "
                "be grouped by all of them: distinct counts do not add up)",
            ),
        ] = None,
    ) -> UsageAnswer:
        try:
            found = _meter(routes.catalogue, meter)
            answer = query_usage(
                routes.engine,
                routes.catalogue,
                customer=customer,
                meter=meter,
                start=start,
                end=end,
                window=_requested(found, window),
                now=routes.clock(),
                retention_days=routes.retention_days,
                group_by=None if group_by is None else _dimensions(group_by),
            )
        except InvalidQueryError as exc:
            raise HTTPException(400, str(exc)) from None
        return _answer(answer)

    @router.get(
        "/v1/meters",
        response_model=MetersAnswer,
        summary="The meter catalogue",
        responses=_REFUSALS,
    )
    def meters() -> MetersAnswer:
        return MetersAnswer(
            meters=[_meter_answer(m) for _, m in sorted(routes.catalogue.meters.items())]
        )

    return router


def _meter(catalogue: Catalogue, name: str) -> Meter:
    found = catalogue.get(name)
    if found is None:
        known = ", ".join(sorted(catalogue.meters))
        raise InvalidQueryError("meter", f"no meter {name!r:.100} in the catalogue; known: {known}")
    return found


def _requested(meter: Meter, window: str | None) -> RequestedWindow:
    if window is None or window == meter.window:
        return "own"
    if window in ("1h", "1d", "total"):
        return window  # type: ignore[return-value]  # narrowed by the test above
    raise InvalidQueryError(
        "window", f"meter {meter.name!r} has {meter.window} windows; ask for it, 1h, 1d or total"
    )


def _dimensions(group_by: str) -> list[str]:
    names = [name.strip() for name in group_by.split(",")]
    if not all(names):
        raise InvalidQueryError(
            "group_by", f"names dimensions separated by commas, none empty; got {group_by!r:.100}"
        )
    return names


def _answer(usage: Usage) -> UsageAnswer:
    grouped = bool(usage.group_by)
    return UsageAnswer(
        customer=usage.customer,
        meter=usage.meter.name,
        aggregation=usage.meter.aggregation,
        window=usage.window,
        start=usage.start,
        end=usage.end,
        windows=None if grouped else _windows(usage.windows),
        group_by=list(usage.group_by) if grouped else None,
        groups=(
            [
                GroupAnswer(dimensions=g.dimensions, windows=_windows(g.windows))
                for g in usage.groups
            ]
            if grouped
            else None
        ),
    )


def _windows(windows: list[WindowUsage]) -> list[WindowAnswer]:
    return [
        WindowAnswer(
            start=w.start,
            end=w.end,
            value=format_value(w.value),
            events=w.events,
            revision=w.revision,
        )
        for w in windows
    ]


def _meter_answer(meter: Meter) -> MeterAnswer:
    return MeterAnswer(
        name=meter.name,
        aggregation=meter.aggregation,
        window=meter.window,
        stripe_event_name=meter.stripe_event_name,
        unit_scale=format_value(meter.unit_scale),
        allow_negative=meter.allow_negative,
        grace_s=meter.grace_s,
        unique_property=meter.unique_property,
        description=meter.description,
    )
