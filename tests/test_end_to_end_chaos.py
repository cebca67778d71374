"""Issue #19's bar, end to end: SIGKILLs of the worker and the reporter, Stripe answering 500
and 429 and dropping connections, re-sent duplicates and late events, and Stripe's totals are
still exact to the unit.

Everything is a real process started as a user starts it: ``meterstream stripe-emulator``,
``meterstream migrate``, ``meterstream aggregate``, ``meterstream report``; the session's
embedded broker and a fresh PostgreSQL database. The test sends usage through the SDK and
keeps its own reference (each event once, by its deduplication key); at the end every
(customer, meter) total Stripe holds must be the floor of that reference in Stripe units
(reporters/carry.py), and nothing may be left for a person.

A run is planned by one seed (the events, the kill moments, the fault rates): a failure prints
it; ``METERSTREAM_CHAOS_SEED=<seed>`` replays that plan. Process timing still varies.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import IO, Any

import pytest
import stripe
from sqlalchemy import Engine, func, select

from ingest import UsageClient
from meterstream.db import build_engine
from meterstream.embedded import free_port
from meterstream.meters import load_catalogue
from meterstream.processes import start_meterstream, stop_process
from meterstream.schema import held_keys, ledger, report_queue, window_totals
from meterstream.settings import Settings
from tests.aggregators.workers import all_applied, events_applied, wait_until
from tests.cli.commands import METERSTREAM, meterstream

KEY = "sk_test_51H8chaosRunXyzzy"
CATALOGUE = """
[meters.tokens]
aggregation = "sum"
window = "1h"
stripe_event_name = "tokens"

[meters.storage]
aggregation = "sum"
window = "1h"
stripe_event_name = "storage_mb"
unit_scale = "1000"
allow_negative = true

[meters.api_calls]
aggregation = "count"
window = "1m"
stripe_event_name = "api_calls"
"""
STRIPE_EVENT_NAMES = {"tokens": "tokens", "storage": "storage_mb", "api_calls": "api_calls"}
UNIT_SCALES = {"tokens": Decimal(1), "storage": Decimal(1000), "api_calls": Decimal(1)}
FAULT_KINDS = ("http_500", "http_429", "drop_connection")
FAULT_PATHS = {False: "/v1/billing/meter_events", True: "/v2/billing/meter_event"}
CUSTOMERS = 6
KILLS = 8  # a quarter each: worker, its applying child, reporter, reporter mid-call; seeded order
EVENTS_PER_BURST = 10
BURST_PAUSE_S = 0.2
LATE_HOURS = (1.0, 6.0)  # late events land in earlier windows, well within the horizon


@dataclass
class Reference:
    """What the test sent, each event once: the totals Stripe must end with."""

    events: dict[tuple[str, str, str], tuple[Decimal, datetime]] = field(default_factory=dict)
    sent_once: list[tuple[tuple[str, str, str], tuple[Decimal, datetime]]] = field(
        default_factory=list
    )
    sent: int = 0
    duplicates: int = 0
    late: int = 0

    def add(self, key: tuple[str, str, str], sent: tuple[Decimal, datetime]) -> None:
        self.events[key] = sent
        self.sent_once.append((key, sent))

    def stripe_units(self) -> dict[tuple[str, str], int]:
        """(Stripe event name, customer) -> floor(exact total x unit_scale)."""
        exact: dict[tuple[str, str], Decimal] = {}
        for (_event_id, customer, meter), (value, _time) in self.events.items():
            key = (STRIPE_EVENT_NAMES[meter], customer)
            exact[key] = exact.get(key, Decimal(0)) + value * UNIT_SCALES[meter]
        units = {k: int(v.to_integral_value(ROUND_FLOOR)) for k, v in exact.items()}
        return nonzero(units)

    def totals(self) -> dict[tuple[str, str], Decimal]:
        """(customer, meter) -> exact total of values (a count meter counts 1 per event)."""
        totals: dict[tuple[str, str], Decimal] = {}
        for (_event_id, customer, meter), (value, _time) in self.events.items():
            totals[(customer, meter)] = totals.get((customer, meter), Decimal(0)) + value
        return totals


def nonzero(totals: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """Totals without the zeros: Stripe shows no total for usage that is all carried."""
    return {key: total for key, total in totals.items() if total != 0}


class EmulatorProcess:
    """``meterstream stripe-emulator`` in its own process, driven through its control API."""

    def __init__(self, log: IO[bytes]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [METERSTREAM, "stripe-emulator", "--port", str(self.port), "--rate", "100000"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_until(self._answers, timeout_s=60, what="the Stripe emulator to listen")

    def _answers(self) -> bool:
        try:
            self.totals()
        except OSError:
            return False
        return True

    def _call(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
            return json.load(answer)

    def inject(self, kind: str, probability: float | None, path_prefix: str) -> None:
        """Fault each matching call with ``probability``; None: the next matching call only."""
        spec = {
            "kind": kind,
            "count": None if probability is not None else 1,
            "probability": probability,
            "path_prefix": path_prefix,
        }
        self._call("POST", "/_emulator/faults", spec)

    def hold_next_call(self, path_prefix: str) -> None:
        """Stall the next matching call, before Stripe does its work, until :meth:`release`."""
        self._call("POST", "/_emulator/faults", {"kind": "hold", "path_prefix": path_prefix})

    def release(self) -> None:
        self._call("POST", "/_emulator/faults/release", {})

    def clear_faults(self) -> None:
        self._call("DELETE", "/_emulator/faults")

    def totals(self) -> dict[tuple[str, str], int]:
        data = self._call("GET", "/_emulator/totals")["data"]
        return nonzero({(row["event_name"], row["customer"]): int(row["total"]) for row in data})

    def fired(self) -> dict[str, int]:
        """How often each fault kind fired since the faults were last cleared."""
        fired: dict[str, int] = self._call("GET", "/_emulator/faults")["fired"]
        return fired


def prepare_account(url: str) -> list[str]:
    """Create the Stripe meters of the catalogue and the customers; their Stripe ids."""
    client = stripe.StripeClient(
        KEY, base_addresses={"api": url, "meter_events": url}, max_network_retries=2
    )
    for event_name in STRIPE_EVENT_NAMES.values():
        client.v1.billing.meters.create(
            {
                "display_name": event_name,
                "event_name": event_name,
                "default_aggregation": {"formula": "sum"},
            }
        )
    return [client.v1.customers.create({"name": f"chaos-{n}"}).id for n in range(CUSTOMERS)]


class Stage:
    """One pipeline process (worker or reporter), killed and started again by the test.

    ``progress`` reads how much the stage has done (a number that grows while it works), so a
    kill lands while the stage is busy, not while it is still starting up."""

    def __init__(
        self,
        settings: Settings,
        arguments: tuple[str, ...],
        log: Path,
        progress: Callable[[], int],
    ) -> None:
        self.name = arguments[0]
        self._settings = settings
        self._arguments = arguments
        self._log = log
        self._progress = progress
        self.kills = 0
        self._start()

    def _start(self) -> None:
        self._started_at = self._progress()
        with self._log.open("ab") as out:
            self.process = start_meterstream(self._settings, *self._arguments, output=out)

    def sigkill_when_busy_and_restart(self, delay_s: float) -> None:
        """Once the stage has done work since it started, wait ``delay_s`` and SIGKILL it (its
        applying child, if any, must follow it); then start a new one."""
        wait_until(
            lambda: self.check_alive() or self._progress() > self._started_at,
            timeout_s=120,
            what=f"{self.name} to make progress",
        )
        time.sleep(delay_s)
        self.sigkill_and_restart()

    def sigkill_and_restart(self) -> None:
        self.check_alive()
        children = _children(self.process.pid)
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        wait_until(
            lambda: not any(_running(pid) for pid in children),
            timeout_s=30,
            what=f"the children {children} of the killed {self.name} to exit",
        )
        self.kills += 1
        self._start()

    def sigkill_child_when_busy(self, delay_s: float) -> int:
        """Once the stage has done work since it started, wait ``delay_s`` and SIGKILL its
        applying child process; the stage itself must replace it and go on. How many died."""
        wait_until(
            lambda: self.check_alive() or self._progress() > self._started_at,
            timeout_s=120,
            what=f"{self.name} to make progress",
        )
        time.sleep(delay_s)
        wait_until(
            lambda: self.check_alive() or bool(_applying_children(self.process.pid)),
            timeout_s=60,
            what=f"{self.name} to have an applying child",
        )
        children = _applying_children(self.process.pid)
        for child in children:
            os.kill(child, signal.SIGKILL)
            self.kills += 1
        self._started_at = self._progress()
        return len(children)

    def check_alive(self) -> bool:
        """False while running; raises with the log's tail if it stopped by itself."""
        code = self.process.poll()
        if code is not None:
            tail = self._log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"{self.name} exited by itself with {code}:\n{tail}")
        return False

    def stop(self) -> None:
        stop_process(self.process)


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (any of its threads may have started one)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue  # the thread ended meanwhile
    return children


def _applying_children(pid: int) -> list[int]:
    """The worker's applying child processes (multiprocessing's spawned pool workers)."""
    found = []
    for child in _children(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:
            found.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Sender(threading.Thread):
    """The application: sends usage through the SDK all through the chaos. Fresh events (a
    share late, in earlier windows within the horizon) and re-sends of earlier ones, exactly as
    a retrying producer sends them."""

    def __init__(self, client: UsageClient, seed: int, customers: list[str]) -> None:
        super().__init__(name="chaos-sender", daemon=True)
        self._client = client
        self._rng = random.Random(seed)
        self._customers = customers
        self.reference = Reference()
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for _ in range(EVENTS_PER_BURST):
                    self._send_one()
                self.stop.wait(BURST_PAUSE_S)
            assert self._client.flush(60) == 0
        except BaseException as exc:  # handed to the test thread, which raises it
            self.failure = exc

    def _send_one(self) -> None:
        reference, rng = self.reference, self._rng
        reference.sent += 1
        if reference.events and rng.random() < 0.1:
            (event_id, customer, meter), (value, moment) = rng.choice(reference.sent_once)
            self._client.record(customer, meter, value, timestamp=moment, event_id=event_id)
            reference.duplicates += 1
            return
        meter = rng.choice(list(STRIPE_EVENT_NAMES))
        customer = rng.choice(self._customers)
        late = rng.random() < 0.15
        moment = datetime.now(UTC) - (
            timedelta(hours=rng.uniform(*LATE_HOURS))
            if late
            else timedelta(seconds=rng.uniform(0, 90))
        )
        value = _value(rng, meter)
        event_id = self._client.record(customer, meter, value, timestamp=moment)
        reference.add((event_id, customer, meter), (value, moment))
        reference.late += late


def _value(rng: random.Random, meter: str) -> Decimal:
    if meter == "api_calls":
        return Decimal(1)
    if meter == "storage":  # GB-hours with three decimals, now and then a credit
        amount = Decimal(rng.randint(1, 5_000)) / 1000 + Decimal(rng.randint(0, 9)) / 10_000
        return -amount / 10 if rng.random() < 0.05 else amount
    return Decimal(rng.randint(1, 2_000))


def database_totals(engine: Engine) -> dict[tuple[str, str], Decimal]:
    """(customer, meter) -> the exact sum of its windows (summed here: SQLite's SUM is float)."""
    c = window_totals.c
    totals: dict[tuple[str, str], Decimal] = {}
    with engine.connect() as connection:
        for customer, meter, value in connection.execute(select(c.customer_id, c.meter, c.value)):
            totals[(customer, meter)] = totals.get((customer, meter), Decimal(0)) + value
    return totals


def drained(engine: Engine) -> bool:
    """Nothing left for the reporter: no window queued, no ledger row waiting for Stripe."""
    with engine.connect() as connection:
        queued = connection.execute(select(func.count()).select_from(report_queue)).scalar_one()
        waiting = connection.execute(
            select(func.count()).where(ledger.c.status.in_(("pending", "unknown")))
        ).scalar_one()
    return queued == 0 and waiting == 0


def differences(
    expected: dict[tuple[str, str], int], stripe_totals: dict[tuple[str, str], int]
) -> str:
    """Each (Stripe event name, customer) whose total Stripe holds is not the expected one."""
    wrong = [
        f"{name} {customer}: Stripe {stripe_totals.get((name, customer), 0)}, expected "
        f"{expected.get((name, customer), 0)}"
        for name, customer in sorted(set(expected) | set(stripe_totals))
        if stripe_totals.get((name, customer), 0) != expected.get((name, customer), 0)
    ]
    return "Stripe's totals differ from the events sent: " + "; ".join(wrong)


def ledger_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(ledger)).scalar_one())


def ledger_statuses(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(ledger.c.status, func.count()).group_by(ledger.c.status)
        ).all()
    return {str(status): int(count) for status, count in rows}


def held(engine: Engine) -> list[tuple[str, str, str]]:
    c = held_keys.c
    with engine.connect() as connection:
        return [tuple(r) for r in connection.execute(select(c.customer_id, c.meter, c.reason))]


@contextmanager
def seed_on_failure(seed: int, describe: Callable[[], str]) -> Iterator[None]:
    """Name the seed (and what the run did) in any failure, so it can be replayed."""
    try:
        yield
    except BaseException as exc:
        raise AssertionError(
            f"chaos run failed; replay with METERSTREAM_CHAOS_SEED={seed}\n{describe()}\n{exc}"
        ) from exc


@pytest.mark.timeout(600)  # generous: the waits inside name what they wait for
@pytest.mark.parametrize(
    ("stream", "database"),
    # Each mode once and each database once, to keep CI in its budget: v1 on SQLite (the
    # demo's setup), the stream on PostgreSQL (production's).
    [(True, "postgresql"), (False, "sqlite")],
    ids=["stream-postgresql", "v1-sqlite"],
)
def test_kills_and_stripe_faults_keep_stripes_totals_exact(
    stream: bool,
    database: str,
    request: pytest.FixtureRequest,
    settings_factory: Callable[..., Settings],
    topic_factory: Callable[..., str],
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("METERSTREAM_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    print(f"chaos seed {seed}", file=sys.stderr)
    catalogue_file = tmp_path / "meters.toml"
    catalogue_file.write_text(CATALOGUE)
    reference = Reference()  # the sender's, once it is made
    actions: list[str] = []
    with ExitStack() as stack:
        emulator_log = stack.enter_context((tmp_path / "emulator.log").open("ab"))
        emulator = EmulatorProcess(emulator_log)
        stack.callback(stop_process, emulator.process)
        customers = prepare_account(emulator.url)
        settings = settings_factory(
            topic=topic_factory(4),
            database_url=(
                request.getfixturevalue("postgres_url")
                if database == "postgresql"
                else f"sqlite:///{tmp_path / 'meterstream.db'}"
            ),
            meters_file=catalogue_file,
            source="chaos-test",
            stripe_api_key=KEY,
            stripe_api_base=emulator.url,
            stripe_rate=2000.0,
            stripe_stream=stream,
            report_interval_s=0.5,
            metrics_port=0,
            marks_topic=f"marks-{topic_factory(1)}",
        )
        env = _environment(settings)
        migrated = meterstream(env, "migrate")
        assert migrated.returncode == 0, migrated.stderr
        engine = build_engine(settings)
        stack.callback(engine.dispose)
        fault_path = FAULT_PATHS[stream]
        for kind in FAULT_KINDS:  # the stream makes a call per 100 events: fault more of them
            emulator.inject(
                kind, rng.uniform(0.15, 0.3) if stream else rng.uniform(0.05, 0.15), fault_path
            )

        def describe() -> str:
            return (
                f"mode {'stream' if stream else 'v1'} on {database}; sent {reference.sent} "
                f"({len(reference.events)} unique, {reference.duplicates} re-sent, "
                f"{reference.late} late); actions: {', '.join(actions)}; "
                f"logs in {tmp_path}"
            )

        with seed_on_failure(seed, describe):
            worker = Stage(
                settings,
                ("aggregate", "--loglevel", "warning"),
                tmp_path / "worker.log",
                lambda: events_applied(engine),
            )
            stack.callback(worker.stop)
            reporter = Stage(
                settings, ("report",), tmp_path / "reporter.log", lambda: ledger_rows(engine)
            )
            stack.callback(reporter.stop)
            client = stack.enter_context(
                UsageClient(settings, catalogue=load_catalogue(catalogue_file))
            )
            sender = Sender(client, rng.randrange(2**32), customers)
            reference = sender.reference
            sender.start()
            stack.callback(sender.stop.set)
            victims = ["worker", "worker's child", "reporter", "reporter mid-call"] * (KILLS // 4)
            rng.shuffle(victims)
            for number, victim in enumerate(victims):
                delay_s = rng.uniform(0.0, 2.0)
                if victim == "worker's child":
                    victim += f" (x{worker.sigkill_child_when_busy(delay_s)})"
                elif victim == "reporter mid-call":
                    # Stripe holds a call; the reporter dies waiting for it; the call is done
                    # (the event recorded) only after the new reporter started resending.
                    held_before = emulator.fired().get("hold", 0)
                    emulator.hold_next_call(fault_path)

                    def call_held(before: int = held_before) -> bool:
                        return reporter.check_alive() or emulator.fired().get("hold", 0) > before

                    wait_until(
                        call_held, timeout_s=120, what="the reporter to make a call Stripe holds"
                    )
                    reporter.sigkill_and_restart()
                    time.sleep(delay_s)
                    emulator.release()
                else:
                    (worker if victim == "worker" else reporter).sigkill_when_busy_and_restart(
                        delay_s
                    )
                actions.append(f"SIGKILL {victim} after {delay_s:.2f} s")
                if number == len(victims) // 2:
                    # The stream makes few calls: one of each fault on the next calls, for sure.
                    for kind in rng.sample(FAULT_KINDS, len(FAULT_KINDS)):
                        emulator.inject(kind, None, fault_path)
            wait_until(
                lambda: reporter.check_alive() or set(FAULT_KINDS) <= set(emulator.fired()),
                timeout_s=120,
                what="every kind of fault to fire at Stripe while usage flows",
            )
            sender.stop.set()
            sender.join(timeout=120)
            if sender.failure is not None:
                raise sender.failure

            wait_until(
                lambda: worker.check_alive() or all_applied(settings, engine),
                timeout_s=180,
                what="the worker to apply every message",
            )
            stored, sent = database_totals(engine), reference.totals()
            assert stored == sent, (
                "the database's totals differ from the events sent: "
                + "; ".join(
                    f"{key}: database {stored.get(key)}, sent {sent.get(key)}"
                    for key in sorted(set(stored) | set(sent))
                    if stored.get(key) != sent.get(key)
                )
            )
            expected = reference.stripe_units()
            actions.append(f"faults fired {emulator.fired()}")
            emulator.clear_faults()
            wait_until(
                lambda: reporter.check_alive() or drained(engine),
                timeout_s=180,
                what="the reporter to drain the report queue and its pending rows",
            )
            assert emulator.totals() == expected, differences(expected, emulator.totals())
            worker.check_alive()
            reporter.stop()
            # One more cycle must find nothing to do and nothing for a person (exit 0).
            once = meterstream(env, "report", "--once")
            assert once.returncode == 0, once.stderr[-3000:]
            assert emulator.totals() == expected, "a cycle after the drain changed Stripe"
            statuses = ledger_statuses(engine)
            assert set(statuses) <= {"sent", "accepted", "carried"}, statuses
            assert held(engine) == []
            print(f"chaos seed {seed} passed: {describe()}; ledger {statuses}", file=sys.stderr)


def _environment(settings: Settings) -> dict[str, str]:
    from meterstream.settings import environment_of

    return environment_of(settings, os.environ)
