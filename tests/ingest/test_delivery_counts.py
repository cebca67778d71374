"""What the SDK counts without a callback per message: produced by many threads, delivered as
produced - failed - in flight, and the produce latency from librdkafka's statistics."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from ingest import DeliveryError, UsageClient
from ingest.producer import ThreadTally
from meterstream.embedded import free_port
from meterstream.settings import Settings

SettingsFactory = Callable[..., Settings]


def test_tally_counts_every_add_of_many_threads_including_finished_ones() -> None:
    tally = ThreadTally()

    def work() -> None:
        for _ in range(50_000):
            tally.cell()[0] += 1

    first = [threading.Thread(target=work) for _ in range(4)]
    for thread in first:
        thread.start()
    for thread in first:
        thread.join()
    assert tally.total() == 200_000  # finished threads are folded in ...
    second = [threading.Thread(target=work) for _ in range(4)]
    for thread in second:
        thread.start()
    for thread in second:
        thread.join()
    work()
    assert tally.total() == 450_000  # ... and not counted twice afterwards


def test_latency_quantiles_come_from_librdkafka_statistics(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str]
) -> None:
    settings = settings_factory(topic=topic_factory(4), producer_statistics_interval_s=0.2)
    with UsageClient(settings) as client:
        seen: dict[str, float] = {}
        deadline = time.monotonic() + 30
        # Keep producing until a statistics window has seen acknowledgements.
        while len(seen) < 2 and time.monotonic() < deadline:
            for i in range(200):
                client.record(f"c{i % 9}", "api_calls")
            client.flush(10)
            time.sleep(0.05)
            samples = client.metrics.produce_latency.collect()[0].samples
            seen = {sample.labels["quantile"]: sample.value for sample in samples}
    assert 0 < seen["0.5"] <= seen["0.99"] < 60, seen
    assert client.metrics.delivered._value.get() == client.metrics.recorded._value.get()


def test_generated_ids_are_unique_across_clients_and_in_a_forked_child(
    settings_factory: SettingsFactory,
) -> None:
    # Nothing listens here: prepare() alone is enough, and nothing is queued.
    settings = settings_factory(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    with UsageClient(settings) as first, UsageClient(settings) as second:
        ids = [
            client.prepare("c", "api_calls")[0] for client in (first, second) for _ in range(500)
        ]
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # the child: its ids must not repeat the parent's next ones
            os.write(
                write_end, ",".join(first.prepare("c", "api_calls")[0] for _ in range(5)).encode()
            )
            os._exit(0)
        os.waitpid(child, 0)
        from_child = os.read(read_end, 4096).decode().split(",")
        ids += [first.prepare("c", "api_calls")[0] for _ in range(5)] + from_child
    assert len(set(ids)) == len(ids) == 1010
    assert all(len(event_id) == 32 for event_id in ids)


class _PollFailsThrice:
    """Stands in for the librdkafka producer: its first three poll() calls raise."""

    def __init__(self, producer: Any) -> None:
        self._producer, self.failures_left = producer, 3

    def poll(self, timeout: float) -> int:
        if self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("a report could not be served")
        return int(self._producer.poll(timeout))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    def __len__(self) -> int:
        return len(self._producer)


def test_errors_while_serving_reports_do_not_stop_failures_being_reported(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",  # nothing listens: every event fails
        producer_delivery_timeout_s=1,
        producer_statistics_interval_s=0.1,
    )
    client = UsageClient(settings)
    patched = _PollFailsThrice(client._producer._producer)
    client._producer._producer = patched  # type: ignore[assignment]
    client._producer._on_statistics("not JSON {")  # nothing escapes the statistics callback
    client._producer._on_statistics('{"brokers": {"b": {"nodeid": 1, "int_latency": 7}}}')
    accepted = [client.record("c", "api_calls") for _ in range(5)]
    with pytest.raises(DeliveryError) as caught:
        client.flush(30)
    assert patched.failures_left == 0
    assert sorted(caught.value.event_ids) == sorted(accepted)
    client.close(timeout=1)
    assert client.metrics.failed._value.get() == 5
