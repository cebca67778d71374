"""A bare faust agent that only decodes: the framework's ceiling, for bench/aggregate.py.

python -m bench.bare_faust BOOTSTRAP TOPIC GROUP EVENTS OUT_FILE
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faust
import mode.loop
import orjson


def main() -> None:
    bootstrap, topic, group, events, out = sys.argv[1:6]
    expected = int(events)
    mode.loop.use("uvloop")  # as the meterstream worker does
    faust_data = Path(tempfile.gettempdir()) / "meterstream-faust"
    faust_data.mkdir(exist_ok=True)  # faust creates only the last level (as build_app does)
    app = faust.App(
        group,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=faust_data / "{conf.name}",
        autodiscover=False,
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        consumer_auto_offset_reset="earliest",
        consumer_max_fetch_size=8 * 1024 * 1024,
    )
    source = app.topic(topic, key_serializer="raw", value_serializer="raw")
    state = {"seen": 0, "first": 0.0}

    async def decode(stream: Any) -> None:
        async for value in stream:
            orjson.loads(value)
            if not state["seen"]:
                state["first"] = time.perf_counter()
            state["seen"] += 1
            if state["seen"] == expected:
                elapsed = time.perf_counter() - state["first"]
                with open(out, "w") as handle:
                    handle.write(f"{expected / elapsed}\n")
                os._exit(0)  # measured; nothing to clean up in a bare baseline

    app.agent(source, name="bare")(decode)
    faust.Worker(app, loglevel="error").execute_from_commandline()


if __name__ == "__main__":
    main()
