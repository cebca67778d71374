"""Stage 1, the application SDK: validate usage events and produce them to Kafka.

with UsageClient() as client:
    client.record("customer-42", "api_calls")
    client.record("customer-42", "tokens", Decimal("1520"), properties={"model": "m1"})
"""

from ingest.async_client import AsyncUsageClient
from ingest.client import UsageClient
from meterstream.errors import (
    BackpressureError,
    ClientClosedError,
    DeliveryError,
    InvalidEventError,
)

InvalidUsageEvent = InvalidEventError
"""The error ``record()`` raises for an invalid event (``exc.field``, ``exc.reason``)."""

__all__ = [
    "AsyncUsageClient",
    "BackpressureError",
    "ClientClosedError",
    "DeliveryError",
    "InvalidEventError",
    "InvalidUsageEvent",
    "UsageClient",
]
