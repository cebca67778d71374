"""The reporter tests' shared fixtures live in test_reporter.py; this makes them visible to
the other reporter test modules."""

from tests.reporters.test_reporter import bare_emulator, pg_world, world

__all__ = ["bare_emulator", "pg_world", "world"]
