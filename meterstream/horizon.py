"""How old usage may be: one rule, with one margin, for the SDK, the aggregators and the reporter.

Stripe refuses a meter event whose timestamp is more than 35 days old (METERSTREAM_HORIZON_DAYS,
at most 35). Usage accepted at intake must still be sendable when the reporter calls Stripe, so
intake keeps a margin back and the reporter does not:

- intake (``ingest.UsageClient.record()``, and the aggregators measured from the Kafka
  timestamp, i.e. when the SDK accepted it) takes events newer than ``horizon - HORIZON_MARGIN``;
- the reporter sends any timestamp newer than ``horizon - CALL_MARGIN``, checked again before
  every call; CALL_MARGIN is the slice of HORIZON_MARGIN kept for the call itself (clock skew,
  the v2 stream validating asynchronously after it answered).

So an event the SDK accepts has HORIZON_MARGIN - CALL_MARGIN (23 h) to be aggregated and
reported; only an outage longer than that (of the workers, the reporter or Stripe) turns it into
a ``timestamp_too_old`` rejection, which ``meterstream status`` shows with its units.
"""

from __future__ import annotations

from datetime import datetime, timedelta

STRIPE_HORIZON_DAYS = 35
HORIZON_MARGIN = timedelta(days=1)
CALL_MARGIN = timedelta(hours=1)


def oldest_accepted(now: datetime, horizon_days: int) -> datetime:
    """The oldest event time intake takes at ``now`` (the time the SDK accepts the event)."""
    return now - timedelta(days=horizon_days) + HORIZON_MARGIN


def oldest_sendable(now: datetime, horizon_days: int) -> datetime:
    """The oldest meter event timestamp the reporter still sends at ``now``."""
    return now - timedelta(days=horizon_days) + CALL_MARGIN


def accepted_age_text(horizon_days: int) -> str:
    """The intake limit in words, for error messages."""
    return (
        f"{horizon_days} days (METERSTREAM_HORIZON_DAYS, Stripe's limit) less "
        f"{HORIZON_MARGIN.days} day for the pipeline to report it"
    )
