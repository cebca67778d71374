"""A client never closed, or made before a fork: every event arrives or is reported by id.

The exit cases run a real interpreter (a script that records and exits without close()); the
fork cases fork for real, as gunicorn --preload and multiprocessing do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from ingest import UsageClient
from meterstream.embedded import free_port
from meterstream.settings import Settings, environment_of
from tests.conftest import read_topic

SettingsFactory = Callable[..., Settings]

# Records N events (customers c0..c6), prints their ids, and exits without close(). An atexit
# handler registered before the client runs after the client's own (last in, first out), so it
# sees the failed counter as the exit flush left it.
_RECORD_AND_EXIT = """
    import atexit, sys
    from ingest import UsageClient

    clients = []
    atexit.register(
        lambda: print(f"failed_total={clients[0].metrics.failed._value.get():g}", flush=True)
    )
    client = UsageClient()
    clients.append(client)
    ids = [client.record(f"c{i % 7}", "api_calls") for i in range(int(sys.argv[1]))]
    print("\\n".join(ids), flush=True)
"""

# A --preload server in miniature: the client is made, then two workers are forked; each records
# its events and exits normally (sys.exit, atexit hooks run); then the parent records and exits.
# Nobody calls close().
_PRELOAD_THEN_FORK = """
    import os, sys
    from ingest import UsageClient

    client = UsageClient()
    workers = []
    for worker in range(2):
        pid = os.fork()
        if pid == 0:
            ids = [client.record(f"w{worker}-{i % 3}", "api_calls") for i in range(20)]
            # One write() (under PIPE_BUF): the processes share stdout, lines must not mix.
            os.write(1, ("\\n".join(ids) + "\\n").encode())
            sys.exit(0)
        workers.append(pid)
    for pid in workers:
        assert os.waitpid(pid, 0)[1] == 0
    ids = [client.record(f"p{i % 3}", "api_calls") for i in range(20)]
    os.write(1, ("\\n".join(ids) + "\\n").encode())
"""


def _run_script(
    tmp_path: Path, source: str, settings: Settings, *arguments: str
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    # The timeout bounds a hang (a process that never exits fails the test); it is not a
    # measurement of how long the exit takes.
    return subprocess.run(
        [sys.executable, str(script), *arguments],
        env=environment_of(settings, os.environ),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=tmp_path,
    )


def _ids_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if len(line) == 32 and "=" not in line]


def _ids_on_topic(settings: Settings, expected: int) -> list[str]:
    messages = read_topic(settings.kafka_bootstrap, settings.topic, expected)
    return sorted(orjson.loads(message.value())["id"] for message in messages)


def test_a_client_never_closed_delivers_what_it_queued_when_the_interpreter_exits(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    # A long linger keeps the events in librdkafka's queue when the script's last line runs.
    settings = settings_factory(topic=topic_factory(4), producer_linger_ms=1_000)
    done = _run_script(tmp_path, _RECORD_AND_EXIT, settings, "300")
    assert done.returncode == 0, done.stderr
    recorded = _ids_in(done.stdout)
    assert len(recorded) == 300
    assert _ids_on_topic(settings, 300) == sorted(recorded)
    assert "failed_total=0" in done.stdout
    assert "not delivered" not in done.stderr


def test_a_client_dropped_without_close_still_delivers_at_exit(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    # The client object is gone (collected); its queue is not, and the exit hook holds no
    # strong reference to either.
    source = """
        import gc, sys
        from ingest import UsageClient

        def handle_requests(count):
            client = UsageClient()
            return [client.record(f"c{i % 7}", "api_calls") for i in range(count)]

        ids = handle_requests(int(sys.argv[1]))
        gc.collect()
        print("\\n".join(ids), flush=True)
    """
    settings = settings_factory(topic=topic_factory(2), producer_linger_ms=1_000)
    done = _run_script(tmp_path, source, settings, "100")
    assert done.returncode == 0, done.stderr
    recorded = _ids_in(done.stdout)
    assert len(recorded) == 100
    assert _ids_on_topic(settings, 100) == sorted(recorded)


def test_at_exit_an_unreachable_broker_is_waited_for_a_bounded_time_and_every_id_reported(
    settings_factory: SettingsFactory, tmp_path: Path
) -> None:
    # Nothing listens there; Kafka would keep retrying for producer_delivery_timeout_s (120 s),
    # longer than the script may take: the exit wait must be the bounded one.
    settings = settings_factory(
        kafka_bootstrap=f"127.0.0.1:{free_port()}", exit_flush_timeout_s=1.0
    )
    assert settings.producer_delivery_timeout_s > 90
    done = _run_script(tmp_path, _RECORD_AND_EXIT, settings, "25")
    recorded = _ids_in(done.stdout)
    assert len(recorded) == 25
    errors = [line for line in done.stderr.splitlines() if "not delivered to Kafka" in line]
    assert len(errors) == 1, done.stderr
    assert "METERSTREAM_EXIT_FLUSH_TIMEOUT_S=1 s" in errors[0]
    assert sorted(errors[0].rsplit("Undelivered ids: ", 1)[1].split(", ")) == sorted(recorded)
    assert "failed_total=25" in done.stdout


def test_a_closed_client_leaves_nothing_to_do_at_exit(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    source = _RECORD_AND_EXIT + "    client.close()\n"
    settings = settings_factory(topic=topic_factory(2))
    done = _run_script(tmp_path, source, settings, "10")
    assert done.returncode == 0, done.stderr
    assert _ids_on_topic(settings, 10) == sorted(_ids_in(done.stdout))
    assert "failed_total=0" in done.stdout


def test_a_client_made_before_fork_delivers_the_childs_events_from_the_child(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str]
) -> None:
    settings = settings_factory(topic=topic_factory(4))
    client = UsageClient(settings)
    before = [client.record(f"c{i % 5}", "api_calls") for i in range(50)]
    assert client.flush(30) == 0
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(read_end)
            ids = [client.record(f"child-{i % 3}", "api_calls") for i in range(100)]
            remaining = client.flush(15)
            client.close(timeout=15)
            os.write(write_end, "\n".join([*ids, f"remaining={remaining}"]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    status = _wait_for_child(child, timeout_s=60)
    with os.fdopen(read_end) as pipe:
        lines = pipe.read().splitlines()
    assert status == 0
    assert lines[-1] == "remaining=0"
    from_child = lines[:-1]
    # The parent's client is untouched by the fork: it records and delivers on.
    after = [client.record(f"c{i % 5}", "api_calls") for i in range(10)]
    client.close()
    assert _ids_on_topic(settings, 160) == sorted(before + from_child + after)


def test_preloaded_client_in_forked_workers_that_exit_without_close_loses_nothing(
    settings_factory: SettingsFactory, topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    settings = settings_factory(topic=topic_factory(4))
    done = _run_script(tmp_path, _PRELOAD_THEN_FORK, settings)
    assert done.returncode == 0, done.stderr
    recorded = _ids_in(done.stdout)
    assert len(recorded) == len(set(recorded)) == 60
    assert _ids_on_topic(settings, 60) == sorted(recorded)


def _wait_for_child(pid: int, timeout_s: float) -> int:
    """The child's exit status; kills it and fails when it has not exited by the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the forked child did not finish within {timeout_s:g} s")
