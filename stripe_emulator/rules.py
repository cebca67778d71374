"""Stripe's billing-meter rules as pure functions of plain values.

Each check raises the `StripeApiError` Stripe would answer with; the messages follow
Stripe's wording where it is known and otherwise name the value and the way out.
Limits come from /work/shared/reference/stripe-meters.md (35 days back, 5 minutes ahead,
15 significant digits, 24 h to cancel, 15-minute session tokens, 100 stream events).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from stripe_emulator.records import JsonObject, Meter, MeterEvent, StripeApiError

MAX_PAST_S = 35 * 86_400
MAX_FUTURE_S = 5 * 60
CANCEL_WINDOW_S = 24 * 3_600
SESSION_TTL_S = 15 * 60
MAX_VALUE_DIGITS = 15
MAX_NAME_CHARS = 100  # event_name, identifier and payload keys (maxLength in the document)
MAX_DISPLAY_NAME_CHARS = 250
MAX_STREAM_EVENTS = 100
FORMULAS = ("sum", "count", "last")
_WHOLE_NUMBER = re.compile(r"-?[0-9]+", re.ASCII)
_WINDOW_S = {None: 60, "hour": 3_600, "day": 86_400}


def check_names(event_name: str | None, identifier: str | None) -> str:
    """The event name, present and short enough; the identifier short enough if given."""
    if not event_name:
        raise param_missing("event_name")
    check_length("event_name", event_name, MAX_NAME_CHARS)
    check_length("identifier", identifier, MAX_NAME_CHARS)
    return event_name


def check_length(param: str, text: str | None, max_chars: int) -> None:
    """Refuse a string longer than the document's maxLength for ``param``.

    The document has no error code for this (api_errors.code lists none), so none is sent;
    ``param`` names the field, as Stripe does."""
    if text is not None and len(text) > max_chars:
        raise StripeApiError(
            400,
            f"Invalid {param}: must be at most {max_chars} characters, got {len(text)}.",
            param=param,
        )


def check_meter_active(meter: Meter | None, event_name: str) -> Meter:
    if meter is None:
        raise StripeApiError(
            400,
            f"No active meter was found for event_name '{event_name}'. Create a meter "
            "with this event_name before sending events.",
            code="no_meter",
            param="event_name",
        )
    if meter.status != "active":
        raise StripeApiError(
            400,
            f"The meter {meter.id} for event_name '{event_name}' is inactive; "
            "reactivate it to accept events.",
            code="archived_meter",
            param="event_name",
        )
    return meter


def check_customer(customer_id: str | None, meter: Meter, known: bool) -> str:
    param = f"payload[{meter.customer_key}]"
    if not customer_id:
        raise StripeApiError(
            400,
            f"Meter event payload is missing the customer key '{meter.customer_key}' "
            f"that meter {meter.id} maps customers by.",
            code="meter_event_no_customer_defined",
            param=param,
        )
    if not known:
        raise StripeApiError(
            400,
            f"No customer found with id '{customer_id}' ({param}).",
            code="meter_event_customer_not_found",
            param=param,
        )
    return customer_id


def check_dimensions(payload: Mapping[str, str], meter: Meter) -> None:
    """Every dimension payload key of the meter must be in the payload, as Stripe requires."""
    missing = [key for key in meter.dimension_payload_keys if not payload.get(key)]
    if missing:
        raise StripeApiError(
            400,
            f"Meter event payload is missing the dimension payload keys "
            f"{', '.join(repr(k) for k in missing)} of meter {meter.id}.",
            code="missing_dimension_payload_keys",
            param=f"payload[{missing[0]}]",
        )


def parse_value(raw: str | None, meter: Meter) -> int:
    """The event's whole-number value; a count meter may omit it (each event counts 1)."""
    param = f"payload[{meter.value_key}]"
    if raw is None:
        if meter.formula == "count":
            return 1
        raise StripeApiError(
            400,
            f"Meter event payload is missing the value key '{meter.value_key}'.",
            code="meter_event_invalid_value",
            param=param,
        )
    if not _WHOLE_NUMBER.fullmatch(raw):
        raise StripeApiError(
            400,
            f"Meter event value must be a whole number, got '{raw}'.",
            code="meter_event_invalid_value",
            param=param,
        )
    # Leading zeros are not significant; every other digit of an integer is.
    if len(raw.lstrip("-").lstrip("0")) > MAX_VALUE_DIGITS:
        raise StripeApiError(
            400,
            f"Meter event value '{raw}' has more than {MAX_VALUE_DIGITS} significant digits.",
            code="meter_event_value_too_many_digits",
            param=param,
        )
    return int(raw)


def check_timestamp(timestamp: int, now: int) -> int:
    if timestamp < now - MAX_PAST_S:
        raise StripeApiError(
            400,
            f"Timestamp {timestamp} is too far in the past: meter events must have a "
            "timestamp within the past 35 calendar days.",
            code="timestamp_too_far_in_past",
            param="timestamp",
        )
    if timestamp > now + MAX_FUTURE_S:
        raise StripeApiError(
            400,
            f"Timestamp {timestamp} is in the future: meter events may be at most 5 minutes "
            "ahead of Stripe's clock.",
            code="timestamp_in_future",
            param="timestamp",
        )
    return timestamp


DUPLICATE_MESSAGE = "An event already exists with identifier {identifier}."
# Stripe promises to deduplicate an identifier for "at least 24 h"; the emulator forgets it
# after exactly that (the worst case), so a blind resend after it is recorded twice, as it
# may be in Stripe, not hidden by an "already exists".
IDENTIFIER_KEPT_S = 24 * 3600


def duplicate_identifier(identifier: str, message: str = DUPLICATE_MESSAGE) -> StripeApiError:
    """The answer to an identifier Stripe already has. ``message`` is a template with
    ``{identifier}``: the document fixes no wording, so tests can change it."""
    # Retrying cannot help, so say so: the SDK honours Stripe-Should-Retry: false.
    return StripeApiError(
        400,
        message.format(identifier=identifier),
        code="resource_already_exists",
        param="identifier",
        should_retry=False,
    )


def check_cancellable(event: MeterEvent, now: int) -> None:
    if event.cancelled:
        raise StripeApiError(
            400,
            f"The meter event with identifier {event.identifier} is already cancelled.",
            param="cancel[identifier]",
        )
    if now - event.created > CANCEL_WINDOW_S:
        raise StripeApiError(
            400,
            f"The meter event with identifier {event.identifier} was received more than "
            "24 hours ago and can no longer be cancelled; send a compensating event.",
            param="cancel[identifier]",
        )


def session_expired() -> StripeApiError:
    # stripe-python maps the v2 type temporary_session_expired to TemporarySessionExpiredError.
    return StripeApiError(
        401,
        "The meter event session token is expired or unknown; create a new session with "
        "POST /v2/billing/meter_event_session.",
        type="temporary_session_expired",
        code="billing_meter_event_session_expired",
    )


def summarize(
    meter: Meter,
    events: Sequence[MeterEvent],
    *,
    customer_id: str,
    start_time: int,
    end_time: int,
    window: str | None,
    group_by: Sequence[str] = (),
) -> list[JsonObject]:
    """Aggregate a customer's live events into [start, end) buckets, newest first.

    One bucket for the whole range, or one per hour / UTC day with `window`; times must sit
    on minute (or window) boundaries. Cancelled events do not count. With ``group_by``
    (dimension payload keys of the meter), one summary per bucket and combination of their
    values, each naming its ``dimensions``.
    """
    for key in group_by:
        if key not in meter.dimension_payload_keys:
            raise StripeApiError(
                400,
                f"Invalid dimension_group_by_keys: '{key}' is not a dimension payload key of "
                f"meter {meter.id}.",
                code="parameter_invalid",
                param="dimension_group_by_keys",
            )
    step = _check_summary_range(start_time, end_time, window)
    live = [
        e
        for e in events
        if e.meter_id == meter.id and e.customer_id == customer_id and not e.cancelled
    ]
    bucket_s = end_time - start_time if window is None else step
    summaries = []
    for bucket_start in range(start_time, end_time, bucket_s):
        bucket_end = bucket_start + bucket_s
        inside = [e for e in live if bucket_start <= e.timestamp < bucket_end]
        base = (
            f"mtrusg_test_{meter.id.removeprefix('mtr_test_')}_{customer_id}_"
            f"{bucket_start}_{bucket_end}"
        )
        groups: dict[tuple[str, ...], list[MeterEvent]] = {}
        for event in inside:
            groups.setdefault(tuple(event.payload.get(k, "") for k in group_by), []).append(event)
        if not group_by:
            groups = {(): inside}
        for values, members in sorted(groups.items()):
            summary: JsonObject = {
                "id": base + "".join(f"_{v}" for v in values),
                "object": "billing.meter_event_summary",
                "aggregated_value": aggregate(meter.formula, members),
                "end_time": bucket_end,
                "livemode": False,
                "meter": meter.id,
                "start_time": bucket_start,
            }
            if group_by:
                summary["dimensions"] = dict(zip(group_by, values, strict=True))
            summaries.append(summary)
    return summaries[::-1]


def _check_summary_range(start_time: int, end_time: int, window: str | None) -> int:
    step = _WINDOW_S.get(window)
    if step is None:
        raise StripeApiError(
            400,
            f"Invalid value_grouping_window: must be hour or day, got '{window}'.",
            param="value_grouping_window",
        )
    for param, moment in (("start_time", start_time), ("end_time", end_time)):
        if moment % step:
            raise StripeApiError(
                400,
                f"{param} {moment} must be aligned with {window or 'minute'} boundaries.",
                param=param,
            )
    if end_time <= start_time:
        raise StripeApiError(
            400,
            f"end_time {end_time} must be after start_time {start_time}.",
            param="end_time",
        )
    return step


def aggregate(formula: str, events: Sequence[MeterEvent]) -> int:
    """sum of values, count of events, or the value of the latest event by timestamp."""
    if formula == "count":
        return len(events)
    if formula == "last":
        # On equal timestamps the later arrival wins: events are in arrival order.
        latest = max(enumerate(events), key=lambda pair: (pair[1].timestamp, pair[0]), default=None)
        return 0 if latest is None else latest[1].value
    return sum(e.value for e in events)


def param_missing(param: str) -> StripeApiError:
    return StripeApiError(
        400, f"Missing required param: {param}.", code="parameter_missing", param=param
    )


def resource_missing(kind: str, object_id: str, param: str) -> StripeApiError:
    return StripeApiError(
        404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param
    )
