"""The database schema that the stages share (SQLAlchemy Core), readable by people too.

One module past 400 lines on purpose: every table, index and the reason for each in one place,
the way a person reads a schema (and the migrations are checked against one metadata).

- ``window_totals``: one row per customer, meter and event-time window; the exact total.
- ``seen_events``: 16-byte deduplication keys by event day (partitioned by day in PostgreSQL, so
  pruning past the horizon drops a partition).
- ``unique_values``: a 16-byte digest of each distinct property value behind a unique_count total.
- ``rejected_events``: what the aggregators refused, and why (also on the dead-letter topic).
- ``applied_offsets``: per partition of the usage topic, the next offset to apply, written in the
  same transaction as each batch (a database restored from a backup replays from there).
- ``meter_definitions``: how each meter aggregated its stored totals, checked at worker start.
- ``report_queue``: the windows whose revision changed since the reporter last looked at them
  (the aggregators write it, the reporter empties it: see reporters/due.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ColumnElement,
    Date,
    DateTime,
    Dialect,
    FetchedValue,
    FromClause,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
    func,
    literal_column,
    text,
)


class ExactDecimal(TypeDecorator[Decimal]):
    """NUMERIC in PostgreSQL; text in SQLite, which has no exact decimal type (its NUMERIC is a
    float). Either way Python sees an exact Decimal."""

    impl = Numeric
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String())
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None or dialect.name != "sqlite":
            return value
        return format(value, "f")

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return value if isinstance(value, Decimal) else Decimal(value)


class UTCDateTime(TypeDecorator[datetime]):
    """TIMESTAMPTZ in PostgreSQL; SQLite stores it naive, so it is read back as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: meterstream stores UTC times only")
        utc = value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

window_totals = Table(
    "window_totals",
    metadata,
    Column("customer_id", String(200), primary_key=True),
    Column("meter", String(100), primary_key=True),
    Column("window_start", UTCDateTime(), primary_key=True),
    # The canonical JSON of the dimension values (meterstream.dimensions), '' without any;
    # its 16-byte digest is in the key (empty without dimensions).
    Column("combination", Text, nullable=False, server_default=""),
    # The database fills it ('' without dimensions: migration 0012 gives the default).
    Column("combination_digest", LargeBinary(16), primary_key=True, server_default=FetchedValue()),
    Column("window_end", UTCDateTime(), nullable=False),
    Column("value", ExactDecimal(), nullable=False),
    Column("events", BigInteger, nullable=False),
    # Grows by one each time the value changes; the reporter sends each revision's difference.
    Column("revision", BigInteger, nullable=False),
    # For "last": the newest event wins, ties broken by event id, whatever the arrival order.
    Column("last_event_time", UTCDateTime(), nullable=True),
    Column("last_event_id", String(200), nullable=True),
    Column("first_applied_at", UTCDateTime(), nullable=False),
    # When the value last changed (the time of the batch that made the current revision).
    Column("updated_at", UTCDateTime(), nullable=False),
    # Inserts need not read back the key the database completed (nor can they in a
    # database from before migration 0012, which tests of older migrations write).
    implicit_returning=False,
)
Index("window_totals_by_update", window_totals.c.updated_at)
# Retention prunes windows by their end, oldest first, a bounded batch at a time.
Index("window_totals_by_end", window_totals.c.window_end)

seen_events = Table(
    "seen_events",
    metadata,
    Column("event_day", Date, primary_key=True),
    Column("key", LargeBinary(16), primary_key=True),
)

# One row (or none): the last event day that may hold keys written before migration 0003, which
# were (source, id) only; the aggregators look for those too until the horizon has passed.
seen_events_legacy = Table(
    "seen_events_legacy",
    metadata,
    Column("until_day", Date, primary_key=True),
)

unique_values = Table(
    "unique_values",
    metadata,
    Column("customer_id", String(200), primary_key=True),
    Column("meter", String(100), primary_key=True),
    Column("window_start", UTCDateTime(), primary_key=True),
    Column("combination", Text, nullable=False, server_default=""),
    # The database fills it ('' without dimensions: migration 0012 gives the default).
    Column("combination_digest", LargeBinary(16), primary_key=True, server_default=FetchedValue()),
    # blake2b (16 bytes) of the value: a key of fixed size, whatever the value's length.
    Column("value_digest", LargeBinary(16), primary_key=True),
    # Inserts need not read back the key the database completed (nor can they in a
    # database from before migration 0012, which tests of older migrations write).
    implicit_returning=False,
)

rejected_events = Table(
    "rejected_events",
    metadata,
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("offset", BigInteger, primary_key=True),
    # With the offset, tells apart two messages at one offset of a re-created topic.
    Column("raw_digest", LargeBinary(16), primary_key=True),
    Column("reason", String(50), nullable=False),
    Column("detail", Text, nullable=False),
    Column("event_id", String(200), nullable=True),
    Column("customer_id", String(200), nullable=True),
    Column("meter", String(100), nullable=True),
    Column("raw", LargeBinary, nullable=False),
    Column("rejected_at", UTCDateTime(), nullable=False),
    # Its Kafka headers (meterstream.content_modes.encode_headers), NULL when it had none: a
    # binary-mode event's attributes are headers, and a replay must send them back.
    Column("headers", LargeBinary, nullable=True),
)
Index("rejected_events_by_time", rejected_events.c.rejected_at)

applied_offsets = Table(
    "applied_offsets",
    metadata,
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True),
    # One past the highest offset whose batch committed: where a worker assigned the partition
    # starts, whatever the consumer group committed in Kafka.
    Column("next_offset", BigInteger, nullable=False),
)

meter_definitions = Table(
    "meter_definitions",
    metadata,
    Column("meter", String(100), primary_key=True),
    # The fields that shape what is stored: the same totals read with another one are wrong.
    Column("aggregation", String(20), nullable=False),
    Column("window", String(10), nullable=False),
    Column("unique_property", String(200), nullable=True),
    # The dimension names joined by commas ('' for none), and where the value is read from.
    Column("dimensions", Text, nullable=False, server_default=""),
    Column("value_property", String(64), nullable=True),
    Column("recorded_at", UTCDateTime(), nullable=False),
)

# --- reporter (stage 3) ----------------------------------------------------------------------

customer_links = Table(
    "customer_links",
    metadata,
    # The application's customer id -> the Stripe customer its usage is billed to. An id that
    # already starts with "cus_" is a Stripe customer id and needs no link.
    Column("customer_id", String(200), primary_key=True),
    Column("stripe_customer_id", String(255), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)
# Stripe's events name the Stripe customer: payment failures find the application's id here.
Index("customer_links_by_stripe_customer", customer_links.c.stripe_customer_id)

ledger = Table(
    "ledger",
    metadata,
    # One row per reported revision of a window, written and committed BEFORE the call to
    # Stripe, so a crash between the call and its answer is resent with the same identifier.
    Column("customer_id", String(200), nullable=False),
    Column("meter", String(100), nullable=False),
    Column("window_start", UTCDateTime(), nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("window_end", UTCDateTime(), nullable=False),
    # Order of the rows of one (customer, meter): calls go out in this order, and the newest
    # row of a (customer, meter, combination) carries the running totals its next difference
    # is computed from.
    Column("sequence", BigInteger, nullable=False),
    Column("total", ExactDecimal(), nullable=False),  # the window's exact total at `revision`
    Column("accounted_total", ExactDecimal(), nullable=False),  # running, after this row
    Column("units_total", BigInteger, nullable=False),  # whole Stripe units issued, after this row
    Column("value", BigInteger, nullable=False),  # whole Stripe units of this meter event
    Column("event_name", String(100), nullable=False),
    Column("stripe_customer_id", String(255), nullable=False),
    Column("timestamp", UTCDateTime(), nullable=False),  # the meter event's timestamp
    Column("identifier", String(100), nullable=False, unique=True),
    # pending | sent | accepted (v2 stream: 200, validated later) | rejected | carried (0 units)
    # | unknown (first call too long ago to resend safely; reconcile decides)
    Column("status", String(20), nullable=False),
    # Calls started, each committed BEFORE its call, so "never called" and "called, then
    # crashed" can be told apart after a restart.
    Column("attempts", Integer, nullable=False),
    Column("first_attempt_at", UTCDateTime(), nullable=True),
    Column("error_code", String(100), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("stripe_request_id", String(255), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("sent_at", UTCDateTime(), nullable=True),
    # The meter's unit_scale this row's running totals were computed with: a changed scale
    # would re-price the history, so the reporter refuses to start on one (migration 0006).
    Column("unit_scale", ExactDecimal(), nullable=True),
    # The canonical JSON of the window's dimension values (meterstream.dimensions), '' without
    # any; its digest is in the key: each combination of a window has its own revisions, and
    # its own running totals (the carry is per combination; migration 0018).
    Column("combination", Text, nullable=False, server_default=""),
    Column("combination_digest", LargeBinary(16), nullable=False, server_default=FetchedValue()),
    PrimaryKeyConstraint(
        "customer_id", "meter", "window_start", "combination_digest", "revision", name="ledger_pkey"
    ),
    implicit_returning=False,
)
Index("ledger_sequence", ledger.c.customer_id, ledger.c.meter, ledger.c.sequence, unique=True)
# The newest row of one (customer, meter, combination): its running totals. Rows of meters
# with dimensions only: a meter without dimensions has one combination, whose newest row is
# its pair's (ledger_sequence), so its inserts pay for no second index. A query uses it only
# with this very predicate (has_combination).
HAS_COMBINATION = "length(combination_digest) > 0"


def has_combination(table: FromClause) -> ColumnElement[bool]:
    """HAS_COMBINATION of ``table`` (the ledger or an alias of it), rendered as the index has
    it (a literal 0, not a parameter), so both databases see the index applies."""
    return func.length(table.c.combination_digest) > literal_column("0")


Index(
    "ledger_by_combination",
    ledger.c.customer_id,
    ledger.c.meter,
    ledger.c.combination_digest,
    ledger.c.sequence,
    unique=True,
    postgresql_where=text(HAS_COMBINATION),
    sqlite_where=text(HAS_COMBINATION),
)
Index("ledger_by_status", ledger.c.status, ledger.c.updated_at)
# reconcile reads the rows of a time range and of one minute by their meter event timestamp
# (reporters/reconcile.py, reporters/settle.py), never the whole ledger (migration 0011).
Index("ledger_by_time", ledger.c.timestamp)

deployment = Table(
    "deployment",
    metadata,
    # One row: the random id `meterstream migrate` drew for this database, part of every new
    # meter event identifier (meterstream/deployment.py), so deployments never collide.
    Column("singleton", Integer, primary_key=True),
    Column("deployment_id", String(32), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    # Set when the reporter found the ledger behind its mark in Kafka (a restore): sending is
    # held until `meterstream report --accept-restore`. For `meterstream status`.
    Column("restore_held_at", UTCDateTime(), nullable=True),
    Column("restore_mark_rows", BigInteger, nullable=True),
    CheckConstraint("singleton = 1", name="deployment_one_row"),
)

# Ledger rows ever written, counted in each insert's transaction: the restore mark compares
# with their sum. It only grows (retention prunes rows, never this) and a restore takes it
# back; reading it costs at most LEDGER_COUNT_SLOTS rows, however long the ledger. A row per
# slot, each writing connection adding to its own (PostgreSQL: its backend's pid modulo the
# slots), so writers running side by side do not wait for each other's commit (migration
# 0019: one row made the reporter's writers take turns).
LEDGER_COUNT_SLOTS = 16
ledger_rows_written = Table(
    "ledger_rows_written",
    metadata,
    Column("slot", Integer, primary_key=True, autoincrement=False),
    Column("rows", BigInteger, nullable=False),
)

# Rows that reached Stripe more than an hour (Stripe's invoice grace, reporters/invoiced.py)
# after their timestamp, whose period may be invoiced already: few, and status and the gauges
# find them without reading the whole ledger. A query uses the index only with this very
# predicate (SENT_LATE[dialect name]).
SENT_LATE = {
    # timestamptz + interval depends on the session's time zone (not IMMUTABLE); a difference
    # of two timestamptz does not
    "postgresql": "sent_at - \"timestamp\" > interval '1 hour'",
    "sqlite": 'julianday(sent_at) > julianday("timestamp") + 1.0 / 24',
}
Index(
    "ledger_sent_late",
    # By sent_at: status and the gauges read the late rows of the last horizon days only.
    ledger.c.sent_at,
    postgresql_where=text(SENT_LATE["postgresql"]),
    sqlite_where=text(SENT_LATE["sqlite"]),
)

report_queue = Table(
    "report_queue",
    metadata,
    # The windows the reporter has yet to look at: the aggregators upsert a row (with the
    # window's new revision) in the transaction that changes a window's revision; the reporter
    # deletes it, only while its revision is still the one it read, once the ledger has that
    # revision. So a cycle reads what changed, never the whole history (reporters/due.py).
    Column("customer_id", String(200), primary_key=True),
    Column("meter", String(100), primary_key=True),
    Column("window_start", UTCDateTime(), primary_key=True),
    Column("combination", Text, nullable=False, server_default=""),
    # The database fills it ('' without dimensions: migration 0012 gives the default).
    Column("combination_digest", LargeBinary(16), primary_key=True, server_default=FetchedValue()),
    Column("revision", BigInteger, nullable=False),
    # Set aside by the reporter (reporters/held_windows.py): held at ``held_revision`` for
    # ``held_reason`` (customer not linked, negative correction, ...). A cycle skips the row
    # while ``revision`` is still ``held_revision``; a new revision, a link for the customer or
    # the slow re-check (``checked_at``) brings it back. The aggregators write ``revision`` only.
    Column("held_reason", String(50), nullable=True),
    Column("held_revision", BigInteger, nullable=True),
    Column("held_since", UTCDateTime(), nullable=True),
    Column("checked_at", UTCDateTime(), nullable=True),
    # Inserts need not read back the key the database completed (nor can they in a
    # database from before migration 0012, which tests of older migrations write).
    implicit_returning=False,
)

held_keys = Table(
    "held_keys",
    metadata,
    # The (customer, meter) pairs the last report cycle held for a failure of their own (meter
    # no longer in the catalogue, value out of range or not exact, a call that failed), so
    # that ``meterstream status`` can show them; replaced at the end of every cycle.
    Column("customer_id", String(200), primary_key=True),
    Column("meter", String(100), primary_key=True),
    Column("reason", String(50), nullable=False),
    Column("detail", Text, nullable=False),
    Column("held_at", UTCDateTime(), nullable=False),
)

ledger_prune_marks = Table(
    "ledger_prune_marks",
    metadata,
    # One row: where the reporter's last ledger prune pass ended (reporters/retention.py), so
    # the next one reads only rows that turned old since, not the 45-60-day rows it kept.
    Column("singleton", Integer, primary_key=True),
    Column("updated_mark", UTCDateTime(), nullable=True),  # rows updated before: examined
    Column("timestamp_mark", UTCDateTime(), nullable=True),  # rows timestamped before: examined
    Column("full_pass_at", UTCDateTime(), nullable=True),  # the last pass that read everything
    Column("last_pass_at", UTCDateTime(), nullable=True),  # the last pass (report --once: due?)
    CheckConstraint("singleton = 1", name="ledger_prune_marks_one_row"),
)

meter_scales = Table(
    "meter_scales",
    metadata,
    # The unit_scale each meter's ledger was computed with (reporters/scales.py): the reporter
    # refuses to start on another, since it would re-price the history already billed.
    Column("meter", String(100), primary_key=True),
    # NULL: a meter migration 0006 found in the ledger, its scale checked at the next start.
    Column("unit_scale", ExactDecimal(), nullable=True),
    Column("recorded_at", UTCDateTime(), nullable=False),
)

# --- Stripe webhooks (reporters/webhooks/) ----------------------------------------------------

stripe_webhook_events = Table(
    "stripe_webhook_events",
    metadata,
    # Every verified event Stripe sent, committed BEFORE the 2xx answer, then acted on from
    # here: a crash after the answer loses nothing, a failed action is retried (never dropped),
    # and a duplicate delivery finds its id and changes nothing.
    Column("event_id", String(255), primary_key=True),
    Column("type", String(100), nullable=False),
    Column("payload_kind", String(10), nullable=False),  # snapshot | thin
    Column("created", UTCDateTime(), nullable=False),  # Stripe's time of the event
    Column("body", Text, nullable=False),  # the verified body, as received
    Column("received_at", UTCDateTime(), nullable=False),
    Column("deliveries", Integer, nullable=False),  # Stripe's deliveries of it, duplicates too
    # pending (to act on, or retried after a failure) | processed
    Column("status", String(20), nullable=False),
    Column("attempts", Integer, nullable=False),  # actions tried and failed
    Column("next_attempt_at", UTCDateTime(), nullable=False),
    Column("last_error", Text, nullable=True),
    # applied | stale (older than what was applied) | ignored (a type nothing acts on)
    Column("outcome", String(20), nullable=True),
    Column("processed_at", UTCDateTime(), nullable=True),
)
Index(
    "stripe_webhook_events_due",
    stripe_webhook_events.c.status,
    stripe_webhook_events.c.next_attempt_at,
)

payment_failures = Table(
    "payment_failures",
    metadata,
    # One row per invoice whose payment failed: open until Stripe says it is paid. Amounts are
    # the invoice's integers in the currency's minor unit (cents), never floats.
    Column("invoice_id", String(255), primary_key=True),
    Column("stripe_customer_id", String(255), nullable=False),
    # The application's customer id (customer_links), when one is linked to that customer.
    Column("customer_id", String(200), nullable=True),
    Column("subscription_id", String(255), nullable=True),
    Column("state", String(10), nullable=False),  # open | closed
    # what the newest event said: payment_failed | payment_action_required | uncollectible
    # | past_due | unpaid | paid | voided
    Column("reason", String(30), nullable=False),
    Column("failure_code", String(100), nullable=True),
    Column("amount_remaining", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("attempts", Integer, nullable=False),  # Stripe's attempt_count
    Column("next_payment_attempt", UTCDateTime(), nullable=True),
    Column("opened_at", UTCDateTime(), nullable=False),
    Column("closed_at", UTCDateTime(), nullable=True),
    # The newest invoice event applied (its time and id): an older one changes nothing.
    # 1970-01-01: none yet (a subscription event opened the row). See webhooks/payments.py.
    Column("event_created", UTCDateTime(), nullable=False),
    Column("event_id", String(255), nullable=False),
)
Index("payment_failures_by_state", payment_failures.c.state, payment_failures.c.opened_at)

meter_error_counts = Table(
    "meter_error_counts",
    metadata,
    # Stripe's asynchronous refusals of meter events, summed over its error reports, per meter
    # event name and error code. Stripe names only samples: ``rows_rejected`` counts the ledger
    # rows found by their identifier (now ``rejected``), ``unidentified`` the rest, which
    # reconcile must find by comparing totals.
    Column("event_name", String(100), primary_key=True),
    Column("code", String(100), primary_key=True),
    Column("stripe_meter_id", String(255), nullable=True),  # None: no meter (no_meter_found)
    Column("errors_total", BigInteger, nullable=False),
    Column("rows_rejected", BigInteger, nullable=False),
    Column("unidentified", BigInteger, nullable=False),
    Column("last_message", Text, nullable=True),
    Column("last_report_at", UTCDateTime(), nullable=False),
)

billing_alert_counts = Table(
    "billing_alert_counts",
    metadata,
    # Stripe's usage-threshold alerts (billing.alert.triggered), counted per alert and customer.
    Column("alert_id", String(255), primary_key=True),
    Column("stripe_customer_id", String(255), primary_key=True),
    Column("customer_id", String(200), nullable=True),
    Column("triggered", BigInteger, nullable=False),
    Column("last_value", ExactDecimal(), nullable=True),
    Column("last_triggered_at", UTCDateTime(), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    # The HTTP API's keys (meterstream/api_keys.py). A key is ``msk_<key_id>_<secret>``: only the
    # SHA-256 of its 256-bit secret is kept, so a copy of this table lets no one in.
    Column("name", String(100), primary_key=True),
    Column("key_id", String(16), nullable=False, unique=True),
    Column("secret_sha256", LargeBinary(32), nullable=False),
    # The CloudEvents source every event sent with the key must carry (its dedup namespace).
    Column("source", String(200), nullable=False),
    Column("scope", String(10), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    CheckConstraint("scope IN ('ingest', 'read', 'all')", name="api_keys_scope"),
)
