"""py-spy over the benchmark's own process, summarised as the top frames."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


class SpyProfile:
    """py-spy sampling this process (every thread, GIL holders only: where the CPU goes)
    while the ``with`` body runs; then the top frames by own and by total samples."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.out = Path(tempfile.mkdtemp(prefix="bench-report-spy-")) / "stacks.txt"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SpyProfile:
        spy = Path(sys.executable).with_name("py-spy")
        self.process = subprocess.Popen(
            [
                *(str(spy), "record", "--pid", str(os.getpid()), "--rate", "250", "--gil"),
                *("--format", "raw", "--output", str(self.out), "--nonblocking"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # let py-spy attach before the measured part starts
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        print(self.summary())
        shutil.rmtree(self.out.parent, ignore_errors=True)

    def summary(self, top: int = 12) -> str:
        if not self.out.exists():
            return f"{self.title}: py-spy wrote no profile (ptrace not allowed?)"
        own: Counter[str] = Counter()
        total: Counter[str] = Counter()
        samples = 0
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
            if not frames or not count.isdigit():
                continue
            n = int(count)
            samples += n
            own[_short(frames[-1])] += n
            for frame in {_short(f) for f in frames}:
                total[frame] += n
        ours = Counter({f: n for f, n in total.items() if f.split(" ")[-1].startswith("(rep")})
        lines = [f"\nprofile {self.title}: {samples} samples holding the GIL (py-spy --gil)"]
        lines.append("  by own samples:")
        lines += [f"    {n / samples:6.1%}  {f}" for f, n in own.most_common(top)]
        lines.append("  reporters/ frames by total samples:")
        lines += [f"    {n / samples:6.1%}  {f}" for f, n in ours.most_common(top)]
        return "\n".join(lines)


def _short(frame: str) -> str:
    """'name (path/to/site-packages/pkg/mod.py:12)' -> 'name (pkg/mod.py)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    for marker in ("site-packages", "main", "python3.11"):
        if marker in parts:
            parts = parts[len(parts) - parts[::-1].index(marker) :]
            break
    return f"{name} ({'/'.join(parts[-2:])})"
