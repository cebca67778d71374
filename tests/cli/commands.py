"""Running the installed ``meterstream`` command as a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

METERSTREAM = str(Path(sys.executable).parent / "meterstream")


def meterstream(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``meterstream ARGS`` with ``env``; its exit code, stdout and stderr."""
    return subprocess.run(
        [METERSTREAM, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
