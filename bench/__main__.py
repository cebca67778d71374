"""``make bench``: every benchmark in turn; figures in bench/results.json, a table at the end."""

from __future__ import annotations

import json
import subprocess
import sys

from bench.common import RESULTS

BENCHMARKS = ("bench.ingest", "bench.aggregate", "bench.report", "bench.e2e", "bench.http")


def main() -> None:
    failed = []
    for module in BENCHMARKS:
        print(f"\n=== {module}", flush=True)
        if subprocess.run([sys.executable, "-m", module, *sys.argv[1:]], check=False).returncode:
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
