"""Load time of the packaged trace files (the named workloads' first step).

Method: load each named file from the package (traces/data) N times (default 5) in this
process, and print the median and the fastest run per file. Reference: the Azure 2023
conversation trace (19,366 rows of 7-digit ISO timestamps, parsed in one vectorised pandas call)
loaded in well under the former test limit of 1.0 s on two idle cores; the limit was a
wall-clock assert that failed on busy machines, so it lives here now. Printed first, this
machine's bare SimPy and heapq event rates (benchmarks/baseline.py), so that times taken on
different machines or loads can be set side by side.
Usage: python benchmarks/trace_load.py [N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.baseline import describe, event_rates  # noqa: E402
from traces import load_trace  # noqa: E402
from traces.workload import NAMED_FILES, PACKAGED_DATA  # noqa: E402

REFERENCE_S = {"azure2023_conv.csv": 1.0}  # the former tests/test_traces.py wall-clock limit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="?", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(describe(event_rates()))
    for name, filename in NAMED_FILES.items():
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            load_trace(PACKAGED_DATA / filename)
            times.append(time.perf_counter() - t0)
        ref = REFERENCE_S.get(filename)
        against = f"  (reference {ref:.1f} s: {'within' if min(times) < ref else 'OVER'})" if ref else ""
        print(f"{name:<11} {filename:<40} median {statistics.median(times):.3f} s  "
              f"best {min(times):.3f} s over {args.runs} runs{against}")


if __name__ == "__main__":
    main()
