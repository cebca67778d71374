"""The v2 stream's writer threads: one a sending lane, each writing its share of the cycle's
chunks (chunks l, l + lanes, ...: a (customer, meter)'s rows are all in one chunk, so each
key's calls keep their order in one lane) into a queue its lane reads, STREAM_CHUNKS_AHEAD
ahead of the sending.

The new rows are written stamped (reporters/stream_stamps.py) while their lane sends; once it
has ended (or another lane raised) the rest are written unstamped, as they will not be called
this cycle. Whatever ended the sending, ``drain`` lets the writers finish (their rows are
pending for the next cycle) and takes back the stamps of the chunks no lane took.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

from reporters.bookkeeping import Bookkeeper, CycleResult, CycleWork
from reporters.due import Key
from reporters.ledger import LedgerRow
from reporters.stream_stamps import LaneStamps

# Chunks each writer writes ahead of the sending (each at most STREAM_KEYS_PER_CHUNK keys' rows).
STREAM_CHUNKS_AHEAD = 2
# The first chunk of each lane is cut in this many: the first calls wait for a quarter of a
# chunk's write (the first call went out 0.07 s sooner in a 3 s cycle of 30,000 windows).
RAMP_PIECES = 4


class WrittenChunk(NamedTuple):
    """A chunk's rows to call, in order, and those of them written stamped (its new rows)."""

    rows: list[LedgerRow]
    stamped: list[LedgerRow]


class ChunkWriters:
    """The writer threads of one cycle's sending, started at once; ``errors`` holds the
    error of each chunk that failed to be written (its keys wait for the next cycle)."""

    def __init__(
        self,
        book: Bookkeeper,
        chunks: Sequence[Sequence[Key]],
        work: CycleWork,
        result: CycleResult,
        lanes: int,
        ended: threading.Event,
    ) -> None:
        self._book = book
        self._work = work
        self._result = result
        self._ended = ended
        self._ramped = _ramp(chunks, lanes)
        self._lanes = lanes
        self._queues: list[queue.Queue[WrittenChunk | None]] = [
            queue.Queue(STREAM_CHUNKS_AHEAD) for _ in range(lanes)
        ]
        # Each lane's end: its writer then writes the rest of its chunks unstamped (they are
        # not called this cycle), so a crash meanwhile leaves no more rows stamped.
        self.lanes_done = [threading.Event() for _ in range(lanes)]
        self.errors: list[BaseException | None] = []
        self._threads = [
            threading.Thread(
                target=self._write_share, args=(n,), name=f"reporter-writer-{n}", daemon=True
            )
            for n in range(lanes)
        ]
        for thread in self._threads:
            thread.start()

    def chunks_of(self, lane: int) -> Iterator[WrittenChunk]:
        """``lane``'s chunks in order, as its writer writes them."""
        while (item := self._queues[lane].get()) is not None:
            yield item

    def drain(self) -> None:
        """Whatever ended the sending, let the writers finish their chunks (they are pending
        rows for the next cycle, as they would have been before any call), and take back the
        stamps the chunks no lane took were written with."""
        left: list[LedgerRow] = []
        while any(thread.is_alive() for thread in self._threads):
            for share in self._queues:
                with contextlib.suppress(queue.Empty):
                    if (item := share.get(timeout=0.02)) is not None:
                        left += item.stamped
        for thread in self._threads:
            thread.join()
        for share in self._queues:
            while not share.empty():
                if (item := share.get_nowait()) is not None:
                    left += item.stamped
        LaneStamps(self._book).take_back_rest(left)

    def _write_share(self, share: int) -> None:
        """Chunks share, share + lanes, ... in order, each into this writer's queue (an empty
        one for a chunk that failed, so that its lane goes on with the next)."""
        try:
            for chunk in self._ramped[share :: self._lanes]:
                stamped = not (self.lanes_done[share].is_set() or self._ended.is_set())
                try:
                    queues = self._book.rows_to_send(
                        chunk, self._work, self._result, stamped=stamped
                    )
                    item = _written_chunk(chunk, queues, self._work)
                except Exception as exc:  # reported by run_cycle
                    self.errors.append(exc)
                    item = WrittenChunk([], [])
                self._queues[share].put(item)
        finally:
            self._queues[share].put(None)


def _written_chunk(
    chunk: Sequence[Key], queues: Mapping[Key, Sequence[LedgerRow]], work: CycleWork
) -> WrittenChunk:
    """The chunk's rows in order; its new ones, not read pending, were written stamped."""
    rows = [row for key in chunk for row in queues[key]]
    earlier = {row.identifier for key in chunk for row in work.pending.get(key, ())}
    return WrittenChunk(
        rows, [row for row in rows if row.attempts and row.identifier not in earlier]
    )


def _ramp(chunks: Sequence[Sequence[Key]], lanes: int) -> list[Sequence[Key]]:
    """``chunks`` with the first of each lane cut into RAMP_PIECES (a key in one piece), so
    that each lane's first calls wait for a small chunk's write, not a whole one's."""
    first: list[Sequence[Key]] = []
    for chunk in chunks[:lanes]:
        size = -(-len(chunk) // RAMP_PIECES)
        first += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    return first + list(chunks[lanes:])
