"""``serve``: start ``meterstream serve`` processes with their own topic and database."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from meterstream.settings import Settings
from tests.ingest.http.server import Server, running_server


@pytest.fixture
def serve(
    settings_factory: Callable[..., Settings], topic_factory: Callable[..., str], tmp_path: Path
) -> Iterator[Callable[..., Server]]:
    """Start ``meterstream serve`` with setting overrides, on a fresh topic; stopped at the end."""
    numbers = itertools.count()
    with ExitStack() as stack:

        def start(**overrides: object) -> Server:
            overrides.setdefault("topic", topic_factory())
            settings = settings_factory(**overrides)
            log = tmp_path / f"serve-{next(numbers)}.log"
            return stack.enter_context(running_server(settings, log))

        yield start
