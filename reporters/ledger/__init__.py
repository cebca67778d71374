"""The ledger: what was (or will be) sent to Stripe, under which identifier, and how it ended.

- model:       the statuses (``Status``), ``LedgerRow`` and ``identifier_for``
- reads:       one row, a window's newest revision, rows by status; bulk heads for many keys
- transitions: stamp, acknowledge, reject, unknown, pending again, confirm (status-guarded)
- bulk:        the driver-level row inserts and the planner hint the updates use
"""

from reporters.ledger.bulk import driver_values, insert_row, insert_rows
from reporters.ledger.model import (
    ACKNOWLEDGED,
    FINAL,
    UNKNOWN_AFTER,
    LedgerRow,
    Status,
    identifier_for,
)
from reporters.ledger.reads import (
    CombinationKey,
    KeyHead,
    WindowHead,
    WindowKey,
    all_rows,
    combination_heads,
    count_with_status,
    counts_by_status,
    key_heads,
    last_sent_at,
    latest_row,
    latest_window_row,
    pending_rows,
    recent_rejections,
    reported_window_value,
    rows_for,
    rows_with_status,
    window_heads,
)
from reporters.ledger.transitions import (
    accept_then_stamp,
    confirm_accepted,
    mark_acknowledged,
    mark_all_acknowledged,
    mark_attempt,
    mark_pending_again,
    mark_rejected,
    mark_unknown,
    reject_reported,
    start_attempt,
    start_attempts,
    undo_attempts,
)

__all__ = [
    "ACKNOWLEDGED",
    "FINAL",
    "UNKNOWN_AFTER",
    "CombinationKey",
    "KeyHead",
    "LedgerRow",
    "Status",
    "WindowHead",
    "WindowKey",
    "accept_then_stamp",
    "all_rows",
    "combination_heads",
    "confirm_accepted",
    "count_with_status",
    "counts_by_status",
    "driver_values",
    "identifier_for",
    "insert_row",
    "insert_rows",
    "key_heads",
    "last_sent_at",
    "latest_row",
    "latest_window_row",
    "mark_acknowledged",
    "mark_all_acknowledged",
    "mark_attempt",
    "mark_pending_again",
    "mark_rejected",
    "mark_unknown",
    "pending_rows",
    "recent_rejections",
    "reject_reported",
    "reported_window_value",
    "rows_for",
    "rows_with_status",
    "start_attempt",
    "start_attempts",
    "undo_attempts",
    "window_heads",
]
