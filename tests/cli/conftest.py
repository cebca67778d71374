"""The reporter fixtures serve the command tests too."""

from tests.reporters.test_reporter import bare_emulator, world

__all__ = ["bare_emulator", "world"]
