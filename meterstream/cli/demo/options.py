"""What ``meterstream demo`` is asked to do, and where it prints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from meterstream.meters import DEMO_CATALOGUE

Echo = Callable[[str], None]


@dataclass(frozen=True)
class DemoOptions:
    """The demo's traffic, and the real parts to use instead of the embedded ones (None: embed)."""

    customers: int = 200
    events: int = 20_000
    duplicate_share: float = 0.05
    late_share: float = 0.05
    seed: int = 7
    bootstrap: str | None = None
    database_url: str | None = None
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None
    # The catalogue shipped in the package, so the demo runs outside a checkout too.
    meters_file: Path = field(default=DEMO_CATALOGUE)
