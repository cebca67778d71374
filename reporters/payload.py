"""The payload of a ledger row's meter event: the Stripe customer, the value, and for a meter
with dimensions the row's dimension values, each under its dimension name (the Stripe meter's
``dimension_payload_keys`` are the catalogue's dimensions: reporters/meters_check.py).

v1 (reporters/stripe_push.py) and the v2 stream (reporters/stream.py) send the same payload;
every part comes from the row, so a resend is identical.
"""

from __future__ import annotations

from meterstream.dimensions import combination_values
from reporters.ledger import LedgerRow
from reporters.meters_check import StripeMeter


def meter_event_payload(row: LedgerRow, meter: StripeMeter) -> dict[str, str]:
    """The payload of ``row``'s meter event. The start-up check refuses a Stripe meter whose
    customer or value key is also a dimension key, so no part can hide another."""
    payload = combination_values(row.combination)
    payload[meter.customer_key] = row.stripe_customer_id
    payload[meter.value_key] = str(row.value)
    return payload
