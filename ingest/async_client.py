"""AsyncUsageClient: UsageClient for asyncio code, never blocking the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Self

from ingest.client import UsageClient
from meterstream.meters import Catalogue
from meterstream.metrics import IngestMetrics
from meterstream.settings import Settings


class AsyncUsageClient:
    """The asyncio face of :class:`UsageClient`: the same rules, errors and guarantees.

    ``record()`` validates and queues inline while the producer has room (microseconds); only
    when its queue is full does the wait for room move to a worker thread, so other tasks run on.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        catalogue: Catalogue | None = None,
        metrics: IngestMetrics | None = None,
    ) -> None:
        self.sync = UsageClient(settings, catalogue=catalogue, metrics=metrics)

    async def record(
        self,
        customer: str,
        meter: str,
        value: Decimal | int | str = 1,
        *,
        timestamp: datetime | None = None,
        event_id: str | None = None,
        properties: Mapping[str, str] | None = None,
    ) -> str:
        """See :meth:`UsageClient.record`.

        If the task is cancelled while it waits for room, the event may still be queued: pass
        your own ``event_id`` when you may cancel and retry, so the retry stays a duplicate.
        """
        event_id, key, payload = self.sync.prepare(
            customer, meter, value, timestamp=timestamp, event_id=event_id, properties=properties
        )
        if not self.sync.try_queue(key, payload):
            await asyncio.to_thread(self.sync.queue, key, payload)
        return event_id

    async def flush(self, timeout: float = 30.0) -> int:
        """See :meth:`UsageClient.flush`."""
        return await asyncio.to_thread(self.sync.flush, timeout)

    async def close(self, timeout: float = 30.0) -> None:
        """See :meth:`UsageClient.close`."""
        await asyncio.to_thread(self.sync.close, timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
