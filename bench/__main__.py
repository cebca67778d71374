"""``make bench``: every benchmark in turn; figures in bench/results.json, a table at the end.

Besides the four benchmarks (given this command's arguments), two reporter figures on
PostgreSQL (METERSTREAM_BENCH_POSTGRES_URL, default the local server): the commands after
100,000 windows of history (the 1M and 10M figures take longer than a make bench run:
``python -m bench.report.history --sizes 1000000,10000000``), and the v2 stream in a catch-up
against Stripe's 10,000 events/s and the emulator's capacity in the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.common import RESULTS

BENCHMARKS = ("bench.ingest", "bench.aggregate", "bench.report", "bench.e2e", "bench.http")
POSTGRES = os.environ.get(
    "METERSTREAM_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# (module, its arguments): the reporter on PostgreSQL, at sizes that fit a make bench run.
POSTGRES_BENCHMARKS = (
    (
        "bench.report.history",
        ("--postgres", POSTGRES, "--sizes", "0,100000", "--section", "report_history_quick"),
    ),
    ("bench.report.stream", ("--postgres", POSTGRES, "--windows", "20000", "--rounds", "3")),
)


def main() -> None:
    failed = []
    runs = [(module, tuple(sys.argv[1:])) for module in BENCHMARKS]
    for module, arguments in [*runs, *POSTGRES_BENCHMARKS]:
        print(f"\n=== {module}", flush=True)
        if subprocess.run([sys.executable, "-m", module, *arguments], check=False).returncode:
            failed.append(module)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    print("\nsummary (bench/results.json)")
    for section, figures in sorted(results.items()):
        shown = {k: v for k, v in figures.items() if k not in ("targets", "machine", "measured_at")}
        print(f"  {section:<10} {json.dumps(shown)}")
    if failed:
        sys.exit(f"benchmarks that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
