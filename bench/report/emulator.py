"""The Stripe emulator in a process of its own, so the reporter and the emulator do not share
one GIL; it obeys (command, argument) pairs sent over a pipe."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection

from meterstream.meters import Catalogue
from stripe_emulator import run_stripe_emulator


def _serve_emulator(conn: Connection, latency_s: float) -> None:
    """Child process: run the emulator and obey (command, argument) pairs from ``conn``."""
    with run_stripe_emulator(rate_limit_per_s=None, latency_s=latency_s) as emulator:
        conn.send(emulator.url)
        while True:
            command, argument = conn.recv()
            if command == "seed":
                meters, customers = argument
                emulator.reset()
                for display_name, event_name, formula in meters:
                    emulator.state.create_meter(
                        display_name=display_name, event_name=event_name, formula=formula
                    )
                for customer in customers:
                    emulator.state.create_customer(customer_id=customer)
                conn.send(None)
            elif command == "count":
                conn.send((len(emulator.state.events), len(emulator.state.async_errors)))
            else:
                conn.send(None)
                return


@dataclass
class EmulatorProcess:
    url: str
    conn: Connection
    catalogue: Catalogue

    def seed(self, customers: Sequence[str]) -> None:
        """Empty the account, then create every catalogue meter and ``customers``."""
        meters = [(m.name, m.stripe_event_name, m.stripe_formula) for m in self.catalogue]
        self.conn.send(("seed", (meters, list(customers))))
        self.conn.recv()

    def counts(self) -> tuple[int, int]:
        """(meter events recorded, stream events refused asynchronously)."""
        self.conn.send(("count", None))
        recorded, refused = self.conn.recv()
        return int(recorded), int(refused)


@contextmanager
def emulator_process(catalogue: Catalogue, latency_s: float = 0.0) -> Iterator[EmulatorProcess]:
    """The emulator in a process of its own; ``latency_s`` is added to every API call."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve_emulator, args=(child, latency_s), daemon=True)
    process.start()
    try:
        yield EmulatorProcess(str(parent.recv()), parent, catalogue)
    finally:
        if process.is_alive():
            parent.send(("stop", None))
            process.join(10)
        if process.is_alive():
            process.kill()
            process.join(5)
